"""The training state and the jitted train step: forward, contrastive loss, backward, AdamW, the
temperature clamp, exact gradient accumulation and the non-finite guard, as pure functions."""

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from clip_jax.data.preprocess import normalize
from clip_jax.infra.errors import UsageError
from clip_jax.models import l2_normalize
from clip_jax.parallel.sharding import BATCH_AXES

LossFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any
    batch_stats: Any  # BatchNorm running statistics ({} for ViTs)
    opt_state: Any
    nonfinite_steps: jax.Array  # int32 []: updates skipped for a non-finite loss or gradient
    first_nonfinite_step: jax.Array  # int32 []: -1, or the first such step


def create_state(
    model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, images: Any, tokens: Any
) -> TrainState:
    """Fresh state; jit it with `out_shardings` so that parameters are born sharded."""
    variables = nn.unbox(model.init(rng, images, tokens))
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        nonfinite_steps=jnp.zeros((), jnp.int32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def make_loss_and_grad(
    model: nn.Module, loss_fn: LossFn, mesh: Mesh, *, accum_steps: int, frozen: Sequence[str]
) -> Callable[[Any, Any, dict[str, jax.Array]], tuple[jax.Array, Any, Any]]:
    """`loss_and_grad(params, batch_stats, batch, rng) -> (loss, grads, new_batch_stats)`.

    `rng` is the step's key for the towers' randomness (the `"dropout"` stream: FLIP's patch
    dropout); each micro-batch gets its own, the same in both of its passes.

    With `accum_steps = k > 1` the batch is cut into k micro-batches and the gradient is exactly
    that of the whole batch (GradCache, Gao et al. 2021): all micro-batches are embedded first
    without gradient, the loss over the whole batch gives the gradient w.r.t. every embedding, and
    each micro-batch is then re-embedded and back-propagated with its slice of that gradient.
    Every micro-batch so meets the negatives of the whole batch; activations of one micro-batch
    are alive at a time. `mesh` is the mesh the batch is sharded over.

    `frozen` names the top-level parameter groups that are not trained (`optim.frozen`; the
    optimizer gives them no update): a frozen tower is embedded without gradient, and a frozen
    image tower runs in evaluation mode, BatchNorm on its running statistics (LiT, Zhai et al.
    2022: `("visual",)`).
    """
    freeze_image, freeze_text = "visual" in frozen, "text_tower" in frozen

    def embed(params, batch_stats, images, tokens, rng):
        if images.dtype == jnp.uint8:  # pixels, as the sources send them: normalised here
            images = normalize(images)
        variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
        zimg, updates = model.apply(
            variables,
            images,
            train=not freeze_image,
            method="encode_image",
            mutable=["batch_stats"],
            rngs={"dropout": rng},
        )
        if freeze_image:
            zimg = jax.lax.stop_gradient(zimg)
        ztxt = model.apply(variables, tokens, train=True, method="encode_text")
        if freeze_text:
            ztxt = jax.lax.stop_gradient(ztxt)
        new_stats = updates.get("batch_stats", batch_stats)
        return (l2_normalize(zimg), l2_normalize(ztxt)), new_stats

    def contrastive(zimg, ztxt, params):
        return loss_fn(zimg, ztxt, jnp.exp(params["logit_scale"]), params.get("logit_bias"))

    def whole_batch(params, batch_stats, batch, rng):
        def full(p):
            (zimg, ztxt), new_stats = embed(p, batch_stats, batch["image"], batch["text"], rng)
            return contrastive(zimg, ztxt, p), new_stats

        (loss, new_stats), grads = jax.value_and_grad(full, has_aux=True)(params)
        return loss, grads, new_stats

    def accumulated(params, batch_stats, batch, rng):
        micro = jax.tree.map(lambda x: split_micro_batches(x, accum_steps, mesh), batch)
        rngs = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(accum_steps))

        def forward(stats, xs):
            mb, key = xs
            (zimg, ztxt), stats = embed(params, stats, mb["image"], mb["text"], key)
            return stats, (zimg, ztxt)

        _, (zimg, ztxt) = jax.lax.scan(forward, batch_stats, (micro, rngs))  # [k, n, E] each
        zimg, ztxt = zimg.reshape(-1, zimg.shape[-1]), ztxt.reshape(-1, ztxt.shape[-1])
        temps = {k: v for k, v in params.items() if k in _TEMPERATURE}
        towers = {k: v for k, v in params.items() if k not in _TEMPERATURE}
        loss, (g_img, g_txt, g_temps) = jax.value_and_grad(contrastive, argnums=(0, 1, 2))(
            zimg, ztxt, temps
        )
        g_img = g_img.reshape(accum_steps, -1, g_img.shape[-1])
        g_txt = g_txt.reshape(accum_steps, -1, g_txt.shape[-1])

        def backward(carry, xs):
            grads, stats = carry
            mb, key, gi, gt = xs
            _, vjp, new_stats = jax.vjp(
                lambda p: embed({**p, **temps}, stats, mb["image"], mb["text"], key),
                towers,
                has_aux=True,
            )
            (g,) = vjp((gi, gt))
            return (jax.tree.map(jnp.add, grads, g), new_stats), None

        zeros = jax.tree.map(jnp.zeros_like, towers)
        (g_towers, new_stats), _ = jax.lax.scan(
            backward, (zeros, batch_stats), (micro, rngs, g_img, g_txt)
        )
        return loss, {**g_towers, **g_temps}, new_stats

    return accumulated if accum_steps > 1 else whole_batch


_TEMPERATURE = ("logit_scale", "logit_bias")


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    lr_schedule: optax.Schedule,
    mesh: Mesh,
    *,
    accum_steps: int,
    max_logit_scale: float,
    frozen: Sequence[str],
    seed: int,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """`train_step(state, batch) -> (state, metrics)` for `batch = {"image", "text"}`.

    A step whose loss or gradient is not finite leaves parameters and optimizer state untouched
    and is counted in `nonfinite_steps`; the loop decides whether to halt. The temperature is
    clamped at `max_logit_scale` after each update. The towers' randomness of a step is
    `fold_in(key(seed), step)`: a resumed run draws what an uninterrupted one would. The other
    arguments are
    `make_loss_and_grad`'s.
    """
    loss_and_grad = make_loss_and_grad(model, loss_fn, mesh, accum_steps=accum_steps, frozen=frozen)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        loss, grads, new_stats = loss_and_grad(state.params, state.batch_stats, batch, rng)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update():
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            # Clamp the temperature after the update, never inside the forward pass, so that
            # its gradient is never cut.
            params = {
                **params,
                "logit_scale": jnp.minimum(params["logit_scale"], math.log(max_logit_scale)),
            }
            return params, new_stats, opt_state

        # The update is one branch taken, not a select per array between the new state and the
        # old: a select keeps the old state until the new one is written, so XLA copied every
        # parameter and optimizer moment each step (for B/32, 608 arrays and 2.4 GB); the
        # branch updates the donated buffers in place.
        params, new_stats, opt_state = jax.lax.cond(
            ok, update, lambda: (state.params, state.batch_stats, state.opt_state)
        )
        state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=new_stats,
            opt_state=opt_state,
            nonfinite_steps=state.nonfinite_steps + (~ok).astype(jnp.int32),
            first_nonfinite_step=jnp.where(
                (state.first_nonfinite_step < 0) & ~ok, state.step, state.first_nonfinite_step
            ),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": lr_schedule(state.step - 1),
            "logit_scale": jnp.exp(state.params["logit_scale"]),
            "nonfinite_steps": state.nonfinite_steps,  # skipped updates so far, this one included
        }
        if "logit_bias" in state.params:  # the sigmoid loss's learned bias (SigLIP)
            metrics["logit_bias"] = state.params["logit_bias"]
        return state, metrics

    return train_step


def split_micro_batches(x: jax.Array, k: int, mesh: Mesh) -> jax.Array:
    """[N, ...] -> [k, N/k, ...] where every micro-batch takes its share of each device's rows
    on `mesh`, so that micro-batches stay spread over all devices and the split moves no data."""
    n = x.shape[0]
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if n % (shards * k):
        raise UsageError(
            f"batch_size {n} must be divisible by accum_steps {k} x batch shards {shards}"
        )
    # Rows are laid out shard-major; cutting each shard's rows into k keeps the split local.
    x = x.reshape(shards, k, n // shards // k, *x.shape[1:])
    x = jnp.swapaxes(x, 0, 1).reshape(k, n // k, *x.shape[3:])
    return nn.with_logical_constraint(x, (None, "act_batch", *([None] * (x.ndim - 2))))
