"""The training run, top to bottom: mesh, model and optimizer, shardings and state, step, data,
loop. Every piece of mathematics is an imported pure function (losses, optim, train_step); this
file only puts them in order. `run(config, workdir)` is what `python -m clip_jax.main` calls, and
what tests and notebooks call directly.
"""

import collections
import os
import time
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clip_jax import checkpoint, convert, losses, optim, sharding
from clip_jax.data import pipeline
from clip_jax.metrics import MetricsWriter, Progress
from clip_jax.models import CLIP
from clip_jax.train_step import TrainState, create_state, make_train_step

NONFINITE_POLICIES = ("halt", "skip")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient stopped being finite under `nonfinite='halt'`."""


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the last
    logged metrics (empty when there was nothing left to do)."""
    # --- Checks and logging ------------------------------------------------------------------
    nonfinite = config.get("nonfinite", "halt")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite={nonfinite!r}; choose one of {NONFINITE_POLICIES}")
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    logging.info(
        "devices: %d (%d per process), processes: %d",
        jax.device_count(),
        jax.local_device_count(),
        jax.process_count(),
    )

    # --- Mesh --------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh)
    rows = sharding.local_rows(mesh, config.batch_size)
    logging.info("mesh: %s", dict(mesh.shape))

    # --- Model and optimizer -----------------------------------------------------------------
    model = CLIP(**config.model.to_dict())
    tx, lr_schedule = optim.make_optimizer(config.total_steps, **config.optim.to_dict())
    loss_fn = losses.make_loss_fn(
        config.loss.name, mesh, sharding.BATCH_AXES, chunk_size=config.loss.get("chunk_size", 0)
    )
    size, length = config.model.vision.image_size, config.model.text.context_length
    # Parameters do not depend on the batch: initialise from one example.
    images, tokens = jnp.zeros((1, size, size, 3)), jnp.zeros((1, length), jnp.int32)

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        # --- Shardings and state: restored, or born sharded -----------------------------------
        state_shardings, abstract_state = _state_layout(model, tx, mesh, images, tokens)
        ckpt = checkpoint.Checkpointer(
            workdir, keep=config.get("keep_checkpoints", 3), keep_period=config.get("keep_period")
        )
        latest = ckpt.latest_step()
        if latest is not None and latest >= config.total_steps:
            logging.info(
                "%s already reached step %d of %d: nothing to do",
                workdir,
                latest,
                config.total_steps,
            )
            ckpt.close()
            return {}
        if latest is not None:
            logging.info("resuming from the checkpoint at step %d in %s", latest, ckpt.directory)
            state, data_state = ckpt.restore(
                latest, checkpoint.abstract_with_shardings(abstract_state, state_shardings)
            )
        else:
            state = jax.jit(
                lambda rng: create_state(model, tx, rng, images, tokens),
                out_shardings=state_shardings,
            )(jax.random.key(config.seed))
            data_state = None
            if config.get("init_from"):
                state = _init_from(state, state_shardings, config)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        logging.info("model: %.2fM parameters", n_params / 1e6)

        # --- The step ----------------------------------------------------------------------------
        step_fn = make_train_step(
            model,
            tx,
            loss_fn,
            lr_schedule,
            accum_steps=config.optim.get("accum_steps", 1),
            max_logit_scale=config.loss.get("max_logit_scale", 100.0),
            freeze_image="visual" in config.optim.get("frozen", ()),
        )
        batch_shardings = {
            "image": sharding.batch_sharding(mesh, 4),
            "text": sharding.batch_sharding(mesh, 2),
        }
        train_step = jax.jit(
            step_fn,
            in_shardings=(state_shardings, batch_shardings),
            out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
            donate_argnums=(0,),
        )

        # --- Data ----------------------------------------------------------------------------
        source = pipeline.make_source(
            config.train_data,
            seed=config.seed,
            image_size=size,
            context_length=length,
            vocab_size=config.model.text.vocab_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        batches = prefetch_to_devices(
            source.batches(config.batch_size, rows, state=data_state), mesh, config.batch_size
        )

        # --- Loop ----------------------------------------------------------------------------
        writer = MetricsWriter(workdir, enabled=is_main)
        watcher = checkpoint.PreemptionWatcher()
        try:
            return _loop(config, state, train_step, batches, ckpt, watcher, writer)
        finally:
            watcher.close()
            writer.close()
            ckpt.close()  # waits for an asynchronous save in flight


def _state_layout(model, tx, mesh: Mesh, images, tokens) -> tuple[TrainState, TrainState]:
    """(shardings, abstract shapes) of the train state, computed without allocating it."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), images, tokens))
    params = sharding.logical_to_sharding(boxed["params"], mesh)
    abstract = jax.eval_shape(lambda: create_state(model, tx, jax.random.key(0), images, tokens))
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(
        step=replicated,
        params=params,
        batch_stats=jax.tree.map(lambda _: replicated, abstract.batch_stats),
        opt_state=sharding.like_params(abstract.opt_state, params, mesh),
        nonfinite_steps=replicated,
        first_nonfinite_step=replicated,
    )
    return shardings, abstract


def _init_from(state: TrainState, shardings: TrainState, config) -> TrainState:
    """Parameters (and BatchNorm statistics) from OpenAI / OpenCLIP / clip_jax weights."""
    sd, _ = convert.read_state_dict(config.init_from)
    variables = convert.from_state_dict(sd, config.model.to_dict())
    logging.info("initialised parameters from %s", config.init_from)
    return state.replace(
        params=jax.device_put(variables["params"], shardings.params),
        batch_stats=jax.device_put(variables.get("batch_stats", {}), shardings.batch_stats),
    )


def prefetch_to_devices(
    batches: Iterator[tuple[dict, dict]], mesh: Mesh, global_size: int, depth: int = 2
) -> Iterator[tuple[dict, dict]]:
    """Keeps `depth` batches on their way to the devices ahead of the one being trained on."""
    queue: collections.deque = collections.deque()
    for local, data_state in batches:
        queue.append((sharding.global_batch(local, mesh, global_size), data_state))
        if len(queue) > depth:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def _loop(config, state, train_step, batches, ckpt, watcher, writer) -> dict:
    start = int(state.step)
    progress = Progress(config.total_steps, start)
    last: dict[str, Any] = {}
    window_t0, window_steps, wait_s, save_s = time.perf_counter(), 0, 0.0, 0.0
    pending = None  # the previous step's non-finite guard, read while the current step runs
    for step in range(start + 1, config.total_steps + 1):
        t = time.perf_counter()
        batch, data_state = next(batches)
        wait_s += time.perf_counter() - t
        state, metrics = train_step(state, batch)
        window_steps += 1
        if pending is not None:
            _check_finite(pending, config.get("nonfinite", "halt"))
        pending = metrics.pop("first_nonfinite_step")

        preempted = watcher.reached(step)
        if step % config.checkpoint_every_steps == 0 or step == config.total_steps or preempted:
            blocked = ckpt.save(step, state, data_state)
            save_s += blocked
            logging.info("checkpoint at step %d (blocked the loop for %.2fs)", step, blocked)
        if step % config.log_every_steps == 0 or step == config.total_steps or preempted:
            metrics = jax.device_get(metrics)
            _check_finite(pending, config.get("nonfinite", "halt"))
            elapsed = time.perf_counter() - window_t0
            pairs_per_sec = window_steps * config.batch_size / elapsed
            last = {
                **{k: float(v) for k, v in metrics.items()},
                "pairs_per_sec": pairs_per_sec,
                "step_time": elapsed / window_steps,
                "input_wait_fraction": wait_s / elapsed,
                "checkpoint_blocking_s": save_s,
                "skipped_examples": _total_skipped(data_state["skipped_examples"]),
                "nonfinite_steps": int(state.nonfinite_steps),
            }
            writer.write(step, last)
            progress.log(step, last["loss"], pairs_per_sec)
            window_t0, window_steps, wait_s, save_s = time.perf_counter(), 0, 0.0, 0.0
        if preempted:
            logging.warning("preempted: saved step %d and stopping; rerun to resume", step)
            break
    return last


def _total_skipped(mine: int) -> int:
    """Bad records skipped up to the current batch by all processes together."""
    mine = np.array([int(mine)], np.int64)
    if jax.process_count() == 1:
        return int(mine[0])
    from jax.experimental import multihost_utils

    return int(multihost_utils.process_allgather(mine).sum())


def _check_finite(first_nonfinite_step: jax.Array, policy: str) -> None:
    step = int(first_nonfinite_step)
    if step >= 0 and policy == "halt":
        raise NonFiniteLossError(
            f"the loss or gradient became non-finite at step {step + 1} (the update was not "
            "applied); lower optim.learning_rate, enable optim.grad_clip_norm, or set "
            "nonfinite=skip to skip such steps"
        )
