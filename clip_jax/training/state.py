"""The one place that builds a model and its train state from a config: the model, the optimizer,
the abstract train state and its shardings over a mesh, and a fresh state born sharded.
Training, evaluation, the benchmark, AOT compiles, export and tests all call these, so that none
of them rebuilds the layout on its own (a run's checkpoints are read back by `runs`).

    spec = state.build(config, mesh)        # model, optimizer, abstract state, shardings, and
                                            # the jitted train and init steps, touching no device
    step, flops = state.compile_train_step(spec, batch_size)   # what training runs
    train_state = state.init(spec, seed)    # parameters created in place, already sharded
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clip_jax.models.clip import CLIP, complete_config, is_resnet
from clip_jax.parallel import sharding
from clip_jax.training import losses, optim
from clip_jax.training.train_step import TrainState, create_state, make_train_step


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """Everything about a run's state that does not depend on parameter values."""

    model: CLIP
    model_config: dict[str, Any]  # CLIP's keyword arguments
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    abstract: TrainState  # ShapeDtypeStructs
    shardings: TrainState  # NamedShardings on `mesh`
    mesh: Mesh
    rules: sharding.Rules  # logical axes -> `mesh`'s axes (config.mesh.rules)
    # `train_step(state, batch) -> (state, metrics)`, jitted with the state's and the batch's
    # shardings and the state donated; lower it in `mesh` under `rules` (`lower_train_step`).
    train_step: Any
    # `init_step(seed) -> state`, jitted so that every parameter is created in its sharding.
    init_step: Any

    def abstract_with_shardings(self) -> TrainState:
        """ShapeDtypeStructs that carry their shardings: what a checkpoint restores into."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            self.abstract,
            self.shardings,
        )


def model_kwargs(model: Mapping[str, Any]) -> dict[str, Any]:
    """`config.model` (a ConfigDict, or a dict read back from JSON) -> CLIP's keyword arguments;
    JSON turns the ResNet's stage tuple into a list, which is turned back here."""
    cfg = model.to_dict() if isinstance(model, ml_collections.ConfigDict) else dict(model)
    cfg["vision"], cfg["text"] = dict(cfg["vision"]), dict(cfg["text"])
    if is_resnet(cfg["vision"]):
        cfg["vision"]["layers"] = tuple(cfg["vision"]["layers"])
    return complete_config(cfg)


def example_inputs(model_cfg: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    """One image and one token row (zeros, made where they are traced): parameters do not depend
    on the batch size."""
    size, length = model_cfg["vision"]["image_size"], model_cfg["text"]["context_length"]
    return jnp.zeros((1, size, size, 3)), jnp.zeros((1, length), jnp.int32)


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    """Where a training batch's arrays live: rows over the batch axes."""
    return {"image": sharding.batch_sharding(mesh, 4), "text": sharding.batch_sharding(mesh, 2)}


def abstract_batch(spec: "StateSpec", batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """A global training batch of `batch_size` as shapes: uint8 pixels and int32 tokens, as
    every source yields them, with their shardings."""
    cfg, shardings = spec.model_config, batch_shardings(spec.mesh)
    size, length = cfg["vision"]["image_size"], cfg["text"]["context_length"]
    return {
        "image": jax.ShapeDtypeStruct(
            (batch_size, size, size, 3), jnp.uint8, sharding=shardings["image"]
        ),
        "text": jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=shardings["text"]),
    }


def check_text_pooling(config: ml_collections.ConfigDict, tokenizer: Any) -> None:
    """A UsageError, naming the settings that fix it, unless `config`'s text tower pools at the
    token where `tokenizer` (the run's, `train_data.tokenizer`) ends each caption."""
    from clip_jax.data import tokenizers

    tokenizers.check_pooling(tokenizer, config.model.text, repr(config.train_data.tokenizer))


def build(config: ml_collections.ConfigDict, mesh: Mesh) -> StateSpec:
    """The model, optimizer, abstract train state, its shardings and the jitted train and init
    steps for `config` on `mesh`: training, the benchmark and `clip_jax.aot` all start here.

    Nothing is allocated and no device is touched (`mesh` may be a TPU topology's devices on a
    CPU machine): the state is traced abstractly and the steps are only wrapped by `jax.jit`.
    """
    cfg = model_kwargs(config.model)
    model = CLIP(**cfg)
    optim_cfg = config.optim.to_dict() if hasattr(config.optim, "to_dict") else dict(config.optim)
    tx, lr_schedule = optim.make_optimizer(config.total_steps, **optim_cfg)
    rules = sharding.check_rules(config.mesh.rules)

    def fresh(rng):
        return create_state(model, tx, rng, *example_inputs(cfg))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(cfg)))
        params = sharding.logical_to_sharding(boxed["params"], mesh, rules)
        abstract = jax.eval_shape(lambda: fresh(jax.random.key(0)))
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(
        step=replicated,
        params=params,
        batch_stats=jax.tree.map(lambda _: replicated, abstract.batch_stats),
        opt_state=sharding.like_params(abstract.opt_state, params, mesh),
        nonfinite_steps=replicated,
        first_nonfinite_step=replicated,
    )
    loss_fn = losses.make_loss_fn(
        config.loss.name, mesh, sharding.BATCH_AXES, chunk_size=config.loss.chunk_size
    )
    step_fn = make_train_step(
        model,
        tx,
        loss_fn,
        lr_schedule,
        mesh,
        accum_steps=config.optim.accum_steps,
        max_logit_scale=config.loss.max_logit_scale,
        frozen=config.optim.frozen,
        seed=config.seed,
    )
    train_step = jax.jit(
        step_fn,
        in_shardings=(shardings, batch_shardings(mesh)),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )
    init_step = jax.jit(lambda seed: fresh(jax.random.key(seed)), out_shardings=shardings)
    return StateSpec(
        model, cfg, tx, lr_schedule, abstract, shardings, mesh, rules, train_step, init_step
    )


def lower_train_step(spec: StateSpec, batch_size: int) -> jax.stages.Lowered:
    """The train step traced and lowered for global batches of `batch_size`, from shapes alone
    (what `clip_jax.aot` compiles for a topology it does not have)."""
    with jax.set_mesh(spec.mesh), nn.logical_axis_rules(spec.rules):
        return spec.train_step.lower(
            spec.abstract_with_shardings(), abstract_batch(spec, batch_size)
        )


def compile_train_step(spec: StateSpec, batch_size: int) -> tuple[Any, float | None]:
    """The train step compiled ahead of time for global batches of `batch_size`, and its FLOPs
    on all the mesh's devices (XLA's cost analysis; None when XLA gives none). Training, the
    benchmark and `clip_jax.aot` run this one step."""
    compiled = lower_train_step(spec, batch_size).compile()
    return compiled, compiled_flops(compiled, spec.mesh.size)


def compiled_flops(compiled: Any, devices: int) -> float | None:
    """FLOPs of one call on the mesh's `devices`, from XLA's cost analysis of a compiled step
    (XLA counts one device's program)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
    flops = float(cost.get("flops", 0.0))
    return flops * devices if flops > 0 else None


def init(spec: StateSpec, seed: int) -> TrainState:
    """A fresh train state, each parameter created directly in its sharding."""
    with jax.set_mesh(spec.mesh), nn.logical_axis_rules(spec.rules):
        return spec.init_step(seed)


def variables_of(train_state: TrainState) -> dict[str, Any]:
    """The model's variables in a train state: `{"params"}`, plus `"batch_stats"` for ResNets."""
    variables = {"params": train_state.params}
    if train_state.batch_stats:
        variables["batch_stats"] = train_state.batch_stats
    return variables
