"""The training run, top to bottom: mesh, data, model and evaluators, state (restored or born
sharded), the restored step's interrupted evals, step, loop, close. Every piece of mathematics is
an imported pure function (losses, optim, train_step); this file only puts them in order.
`run(config, workdir)` is what `python -m clip_jax.main` calls, and what tests and notebooks call
directly.
"""

import collections
import contextlib
import copy
import json
import time
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from clip_jax.data import pipeline
from clip_jax.evals import runner
from clip_jax.infra import paths, runlock
from clip_jax.infra.errors import UsageError
from clip_jax.parallel import sharding
from clip_jax.training import checkpoint, recovery, runs, validate
from clip_jax.training import state as state_lib
from clip_jax.training.metrics import MetricsWriter, Progress
from clip_jax.training.summary import end_summary, format_flops, start_summary
from clip_jax.training.train_step import TrainState
from clip_jax.weights import files as weight_files
from clip_jax.weights import state_dicts


def run(
    config: ml_collections.ConfigDict, workdir: str, *, config_change_ok: bool = False
) -> dict[str, float]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the last
    logged metrics (empty when there was nothing left to do).

    Args:
      config: the run's config (`configs/*.py`).
      workdir: where checkpoints, metrics and `config.json` go; created when missing.
      config_change_ok: train on in a workdir whose `config.json` has another model, data or
        batch size; without it that is a UsageError (the workdir holds another run).
    """
    validate.validate(config)
    lock = runlock.lock_workdir(workdir)  # one run per workdir, for the run's whole life
    try:
        return _train(config, workdir, config_change_ok)
    finally:
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def _closing(*closers):
    """Runs every closer when the block ends. After an error in the block, theirs are logged
    and the block's is raised (the error that stopped the run); otherwise the first of theirs
    is raised once all have run, a checkpoint write's before the others, as it says which
    checkpoint is kept (a full disk fails the metrics' last flush too)."""
    errors = []
    try:
        yield
    except BaseException:
        for close in closers:
            try:
                close()
            except Exception as e:  # noqa: BLE001 - the block's own error is being raised
                logging.warning("while stopping after an error: %s", " ".join(str(e).split()))
        raise
    for close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - raised below, after the others have run
            errors.append(e)
    if errors:
        raise next((e for e in errors if isinstance(e, checkpoint.CheckpointWriteError)), errors[0])


def _train(config, workdir: str, config_change_ok: bool) -> dict[str, float]:
    is_main = jax.process_index() == 0
    if not config_change_ok:
        runs.check_same_run(config, workdir)

    # --- Mesh --------------------------------------------------------------------------------
    mesh = sharding.config_mesh(config.mesh)
    shard = sharding.data_shard(mesh, config.batch_size)
    accum_steps = config.optim.accum_steps
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % (shards * accum_steps):
        raise UsageError(
            f"batch_size {config.batch_size} does not split into optim.accum_steps={accum_steps} "
            f"micro-batches over the {shards} batch shards of the mesh (data x fsdp)"
        )

    # --- Data: opened before the model is built, so that a bad source fails in seconds ------
    size, length = config.model.vision.image_size, config.model.text.context_length
    source = pipeline.make_source(
        config.train_data,
        seed=config.seed,
        image_size=size,
        context_length=length,
        vocab_size=config.model.text.vocab_size,
        process_index=shard.index,
        process_count=shard.count,
    )
    if source.tokenizer is not None:  # synthetic captions have none
        state_lib.check_text_pooling(config, source.tokenizer)  # pooled where captions end

    # --- Model, optimizer, shardings and evaluators ------------------------------------------
    spec = state_lib.build(config, mesh)
    evaluators = runner.make_evaluators(config, spec.model, mesh, spec.rules)

    with jax.set_mesh(mesh), nn.logical_axis_rules(spec.rules):
        ckpt = checkpoint.Checkpointer(
            workdir, keep=recovery.keep_count(config), keep_period=config.keep_period
        )
        logging.info(
            "%s", start_summary(config, mesh, spec, workdir, ckpt.latest_step(), accum_steps)
        )

        # --- State: the latest readable checkpoint, or born sharded --------------------------
        start = _restore_or_init(config, spec, ckpt, evaluators, workdir)
        if start is None:  # the run had finished, its last evals too
            if is_main:
                mark_done(workdir, ckpt.latest_step())
            ckpt.close()
            return {}
        step, state, data_state, record, skip = start
        if is_main and step < config.total_steps:  # accepted: it restored (or started) the run
            runs.write_run_config(config, workdir)
            (paths.path(workdir) / DONE_FILE).unlink(missing_ok=True)  # more steps to come
        writer = MetricsWriter(workdir, enabled=is_main, start_step=step)
        with _closing(writer.close, ckpt.close):  # ckpt: waits for a save in flight
            # --- The restored step's evals that a preemption interrupted (at the last step,
            # they are all that is left to do) ----------------------------------------------
            last = _resumed_evals(evaluators, state, step, config.total_steps, workdir, writer)
            train_s = 0.0
            if step < config.total_steps:
                # --- The step: compiled ahead of time, so that its FLOPs are known before it
                # runs and the pace of the first steps leaves the compilation out -------------
                logging.info("compiling the train step ...")
                t0 = time.perf_counter()
                lr_scale = float((record or {}).get("lr_scale", 1.0))
                train_step, flops = _compile(config, spec, lr_scale)
                logging.info(
                    "compiled the train step in %.1fs: %s per step (XLA's cost analysis)",
                    time.perf_counter() - t0,
                    format_flops(flops),
                )

                # --- Loop ------------------------------------------------------------------
                local = source.batches(config.batch_size, shard.rows, state=data_state)
                for _ in range(skip):  # a rollback's skipped batches, as the run skipped them
                    next(local)
                batches = prefetch_to_devices(local, mesh, config.batch_size)
                keeper = recovery.Recovery(
                    config,
                    ckpt,
                    writer,
                    workdir,
                    step,
                    int(state.nonfinite_steps),
                    record,
                    lambda s: ckpt.restore(s, spec.abstract_with_shardings()),
                )
                watcher = checkpoint.PreemptionWatcher()
                with _closing(watcher.close):
                    last, step, train_s = _loop(
                        config,
                        state,
                        train_step,
                        batches,
                        ckpt,
                        watcher,
                        writer,
                        evaluators,
                        workdir,
                        keeper,
                        lambda scale: _compile(config, spec, scale)[0],
                    )

    # --- Close: done once the last step and its evals are (a preemption at the last step skips
    # them) ----------------------------------------------------------------------------------
    done = step >= config.total_steps and not runner.missing(
        evaluators, workdir, step, config.total_steps
    )
    if is_main:
        if done:
            mark_done(workdir, step)
        logging.info("%s", end_summary(config, workdir, ckpt.directory, last, step, train_s))
    return last


def _restore_or_init(config, spec, ckpt, evaluators, workdir) -> tuple | None:
    """(step, state, data position, trainer record, batches to skip) the run goes on from: the
    checkpoint `resume_step` names (the newer ones moved aside), else its latest readable one,
    else a fresh state born sharded (with `init_from`'s weights) at step 0. None when the run
    had reached its last step and run that step's evals: nothing is left."""
    total = config.total_steps
    chosen = recovery.resume_step_target(config, ckpt, workdir)
    if chosen is not None:
        recovery.abandon_after(workdir, ckpt, chosen, {"kind": "resume_step"})
        state, data_state = ckpt.restore(chosen, spec.abstract_with_shardings())
        logging.info("resuming from the checkpoint at step %d (resume_step)", chosen)
        return chosen, state, data_state, ckpt.trainer_record(chosen), 0
    latest = ckpt.latest_step()
    finished = latest is not None and latest >= total
    if finished and not runner.missing(evaluators, workdir, latest, total):
        logging.info("%s already reached step %d of %d: nothing to do", workdir, latest, total)
        return None
    if latest is not None:  # an unreadable checkpoint gives way to the one before it
        step, state, data_state = ckpt.restore_latest(spec.abstract_with_shardings())
        if step is not None:
            logging.info("resuming from the checkpoint at step %d in %s", step, ckpt.directory)
            rolled = recovery.pending_skip(workdir, step)
            if rolled is not None:  # rolled back to `step` and stopped before the next save
                logging.info(
                    "the run had rolled back to step %d: skipping the %d batches it skipped",
                    step,
                    rolled["skipped_batches"],
                )
                return step, state, data_state, rolled["trainer"], rolled["skipped_batches"]
            return step, state, data_state, ckpt.trainer_record(step), 0
    logging.info("initialising the parameters ...")
    state = state_lib.init(spec, config.seed)
    if config.init_from:
        state = _init_from(state, spec.shardings, config)
    return 0, state, None, None, 0


DONE_FILE = "done.json"


def mark_done(workdir: str, step: int) -> None:
    """`workdir/done.json`: the run reached its last step and ran its final evals (what the
    launchers wait for before they stop relaunching)."""
    paths.write_text(
        paths.path(workdir) / DONE_FILE, json.dumps({"step": int(step), "time": time.time()})
    )


def _run_evals(evaluators, state: TrainState, step: int, workdir: str) -> dict:
    """Runs `evaluators` on the state's weights at `step`; training's state is only read, so
    evaluation never changes what training does."""
    if not evaluators:
        return {}
    results = runner.run(evaluators, state_lib.variables_of(state), step, workdir)
    for key, value in sorted(results.items()):
        logging.info("step %d %s = %.4f", step, key, value)
    return results


def _resumed_evals(evaluators, state, step: int, total_steps: int, workdir: str, writer) -> dict:
    """Runs the evals of the restored `step` that a preemption interrupted, and logs all of that
    step's eval values again (those that had finished, from their result files, and the new
    ones); a fresh run (step 0) has none."""
    if step == 0:
        return {}
    missing = runner.missing(evaluators, workdir, step, total_steps)
    if not missing:
        return {}
    new = _run_evals(missing, state, step, workdir)
    done = [e for e in runner.due(evaluators, step, total_steps) if e not in missing]
    writer.write(step, {**runner.stored(done, workdir, step), **new})
    return new


def _init_from(state: TrainState, shardings: TrainState, config) -> TrainState:
    """Parameters (and BatchNorm statistics) from OpenAI / OpenCLIP / clip_jax weights."""
    sd, _ = weight_files.read_state_dict(
        config.init_from, allow_torchscript_code=config.init_from_allow_torchscript_code
    )
    variables = state_dicts.from_state_dict(sd, config.model.to_dict())
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


def _compile(config, spec: state_lib.StateSpec, lr_scale: float):
    """The train step (and its FLOPs) at `lr_scale` times the configured learning rate: lower
    after rollbacks under rollback_lr_scale < 1."""
    if lr_scale != 1.0:
        config = copy.deepcopy(config)
        config.optim.learning_rate *= lr_scale
        logging.info("learning rate scaled by %g after rollbacks", lr_scale)
        spec = state_lib.build(config, spec.mesh)
    return state_lib.compile_train_step(spec, config.batch_size)


def _loop(
    config,
    state,
    train_step,
    batches,
    ckpt,
    watcher,
    writer,
    evaluators,
    workdir,
    keeper,
    recompile,
) -> tuple[dict, int, float]:
    """Trains from the state's step on; returns the last logged metrics, the step reached and
    the seconds spent training (evals excluded). `keeper` (recovery.Recovery) reads each step's
    loss and non-finite count and may halt the run or roll it back to an earlier checkpoint;
    `recompile(lr_scale)` is the step at a rollback's lower learning rate."""
    start = step = int(state.step)
    progress = Progress(config.total_steps, start, config.batch_size)
    last: dict[str, Any] = {}
    window_t0, window_steps, wait_s, save_s = time.perf_counter(), 0, 0.0, 0.0
    config_dict = json.loads(config.to_json_best_effort())  # saved with each checkpoint
    lr_scale = keeper.lr_scale
    pending = None  # the previous step's loss and non-finite count, read while this step runs
    postponed = False  # a periodic checkpoint waiting for the previous one to be written
    while step < config.total_steps:
        step += 1
        t = time.perf_counter()
        batch, data_state = next(batches)
        wait_s += time.perf_counter() - t
        state, metrics = train_step(state, batch)
        window_steps += 1
        back = keeper.check(*pending, now=step) if pending is not None else None
        pending = (step, metrics.pop("nonfinite_steps"), metrics["loss"])

        preempted = False if back else watcher.reached(step)
        # A periodic save while the previous one is still being written would wait for it:
        # it moves to the first step after that one is done. The last step, a preemption and
        # the steps kept for good (keep_period) save at once, waiting if they must.
        wants = postponed or step % config.checkpoint_every_steps == 0
        keep_period = config.keep_period
        must = step == config.total_steps or preempted or (keep_period and step % keep_period == 0)
        save_now = back is None and (must or (wants and not ckpt.busy()))
        if save_now:
            back = keeper.check(*pending, now=step)  # never save a step that halts or rolls back
        if save_now and back is None:
            record = keeper.record()
            blocked = ckpt.save(step, state, data_state, config=config_dict, trainer=record)
            save_s += blocked
            postponed = False
            writer.flush()  # an object store's metrics up to the checkpoint, before a kill
            logging.info("saving step %d in the background (the loop waited %.2fs)", step, blocked)
        elif back is None and wants and not postponed:
            postponed = True
            logging.info(
                "step %d: the previous checkpoint is still being written; this one is saved at "
                "the first step after it",
                step,
            )
        due = [] if preempted or back else runner.due(evaluators, step, config.total_steps)
        log = step % config.log_every_steps == 0 or step == config.total_steps or preempted or due
        if back is None and log:
            back = keeper.check(*pending, now=step)
        if back is None and log:
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - window_t0
            pairs_per_sec = window_steps * config.batch_size / elapsed
            last = {
                **{k: float(v) for k, v in metrics.items()},
                "pairs_per_sec": pairs_per_sec,
                "step_time": elapsed / window_steps,
                "input_wait_fraction": wait_s / elapsed,
                "checkpoint/blocking_seconds": save_s,
                "skipped_examples": _total_skipped(data_state["skipped_examples"]),
                "nonfinite_steps": int(state.nonfinite_steps),
                **keeper.metrics(),
            }
            writer.write(step, last)
            progress.log(step, last["loss"])
            if due:  # a row of their own, once they have all run; their time is not training's
                t = time.perf_counter()
                evals = _run_evals(due, state, step, workdir)
                writer.write(step, evals)
                last = {**last, **evals}
                progress.exclude(time.perf_counter() - t)
            window_t0, window_steps, wait_s, save_s = time.perf_counter(), 0, 0.0, 0.0
        elif back is None and progress.due(step):  # early and regular signs of life
            progress.log(step, float(metrics["loss"]))
        if back is not None:  # rolled back: on from the restored step, the batches between skipped
            step, state, rollback = back
            if rollback["rollback/lr_scale"] != lr_scale:
                lr_scale = rollback["rollback/lr_scale"]
                train_step = recompile(lr_scale)
            writer.write(step, {**rollback, **keeper.metrics()})
            writer.flush()
            pending, postponed = None, False
            progress = Progress(config.total_steps, step, config.batch_size)
            window_t0, window_steps, wait_s, save_s = time.perf_counter(), 0, 0.0, 0.0
            continue
        if preempted:
            logging.warning("%s: saved step %d and stopping; rerun to resume", watcher.reason, step)
            break
    return last, step, progress.elapsed()


def _total_skipped(mine: int) -> int:
    """Bad records skipped up to the current batch by all processes together."""
    mine = np.array([int(mine)], np.int64)
    if jax.process_count() == 1:
        return int(mine[0])
    from jax.experimental import multihost_utils

    return int(multihost_utils.process_allgather(mine).sum())
