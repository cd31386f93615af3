"""The optax chain of the CLIP recipe: global-norm clipping, AdamW with decoupled weight decay on
matrices and embedding tables only, linear warmup then cosine decay.

Gradient accumulation lives in `train.py`, not here: averaging micro-batch gradients (optax's
MultiSteps) would give each micro-batch only its own negatives, which is not the gradient of the
large batch for a contrastive loss.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from clip_jax.infra.errors import UsageError

# Leaves never decayed (the paper: "gains or biases" are excluded; so are the class token and the
# temperature, whose decay would pull them to zero for no reason).
_NO_DECAY = frozenset({"bias", "scale", "class_embedding", "logit_scale", "logit_bias"})


def make_schedule(
    learning_rate: float, warmup_steps: int, total_steps: int, schedule: str
) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine decay to 0 at
    `total_steps` (or constant)."""
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), 0.0
        )
    if schedule == "constant":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, learning_rate, warmup_steps),
                optax.constant_schedule(learning_rate),
            ],
            [warmup_steps],
        )
    raise UsageError(f"unknown optim.schedule {schedule!r}; choose 'cosine' or 'constant'")


def decay_mask(params: Any) -> Any:
    """True for the leaves weight decay applies to: kernels, embedding tables, positional
    embeddings and projections; False for biases, norm scales, the class token, the temperature."""

    def decayed(path: tuple, leaf: Any) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        return name not in _NO_DECAY and leaf.ndim >= 2

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(
    total_steps: int,
    *,
    learning_rate: float,
    warmup_steps: int,
    schedule: str,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    grad_clip_norm: float,
    mu_dtype: str,
    accum_steps: int,
    frozen: Sequence[str],
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its learning-rate schedule, from `config.optim` as keyword arguments.

    `mu_dtype` stores AdamW's first moment in that dtype ("bfloat16" halves its memory; the
    second moment, whose small values bfloat16 would flush, stays float32). `frozen` names
    top-level parameter groups that are not trained (`train_step` embeds them
    without gradient); they get no update and no optimizer state. `accum_steps` is accepted so that
    `make_optimizer(total, **config.optim)` works; the train step uses it (module docstring).
    """
    del accum_steps
    lr = make_schedule(learning_rate, warmup_steps, total_steps, schedule)
    chain = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
    chain.append(
        optax.adamw(
            lr,
            b1=b1,
            b2=b2,
            eps=eps,
            mu_dtype=jnp.dtype(mu_dtype),
            weight_decay=weight_decay,
            mask=decay_mask,
        )
    )
    tx = optax.chain(*chain)
    if not frozen:
        return tx, lr
    frozen = tuple(frozen)

    def labels(params: Any) -> Any:
        return {
            group: jax.tree.map(lambda _, g=group: "frozen" if g in frozen else "train", tree)
            for group, tree in params.items()
        }

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels), lr
