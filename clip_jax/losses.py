"""Contrastive losses over the global batch: CLIP's softmax loss and SigLIP's sigmoid loss, in a
plain form, a sharded form (all-gathered columns, O(b·N) memory per device) and a chunked form
(columns streamed in blocks, O(b·chunk)).

Embeddings enter L2-normalised, [N, D]; `logit_scale` is the temperature's inverse 1/τ (already
exponentiated); `logit_bias` is the sigmoid loss's learned bias. Everything is computed in float32.
"""

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clip_jax.errors import UsageError

LossFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]


def softmax_loss(
    zimg: jax.Array, ztxt: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array | None = None
) -> jax.Array:
    """CLIP's symmetric cross-entropy (Radford et al. 2021, Figure 3), over the whole batch.

    Args:
      zimg, ztxt: [N, D] normalised embeddings; row i of each is a matching pair.
      logit_scale: [] the inverse temperature 1/τ.
      logit_bias: unused (the signature is shared with `sigmoid_loss`).
    Returns:
      [] mean of the image->text and text->image cross-entropies over the N×N logits.
    """
    del logit_bias
    zimg, ztxt = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
    logits = logit_scale * zimg @ ztxt.T  # [N, N]
    positives = jnp.diagonal(logits)
    i2t = jax.nn.logsumexp(logits, axis=1) - positives
    t2i = jax.nn.logsumexp(logits, axis=0) - positives
    return (i2t.mean() + t2i.mean()) / 2


def sigmoid_loss(
    zimg: jax.Array, ztxt: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array | None
) -> jax.Array:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, Algorithm 1), over the whole batch.

    Args:
      zimg, ztxt: [N, D] normalised embeddings; row i of each is a matching pair.
      logit_scale: [] the scale t; logit_bias: [] the bias b.
    Returns:
      [] -(1/N) Σ_ij log σ(z_ij (t x_i·y_j + b)), z_ij = 1 if i = j else -1.
    """
    zimg, ztxt = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
    logits = logit_scale * zimg @ ztxt.T + _bias(logit_bias)  # [N, N]
    signs = 2 * jnp.eye(zimg.shape[0], dtype=jnp.float32) - 1
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / zimg.shape[0]


LOSSES = {"softmax": softmax_loss, "sigmoid": sigmoid_loss}


def _bias(logit_bias: jax.Array | None) -> jax.Array:
    if logit_bias is None:
        raise UsageError("the sigmoid loss needs a logit_bias: set model.init_logit_bias")
    return logit_bias


# ---------------------------------------------------------------------------------------------
# The per-device computation: b local rows against all N columns.


def _gather(x: jax.Array, axes: tuple[str, ...] | None) -> jax.Array:
    # The transpose of a tiled all-gather is a reduce-scatter: each device gets the gradient of
    # its own rows back from every device that used them as columns.
    return x if axes is None else jax.lax.all_gather(x, axes, axis=0, tiled=True)


def _psum(x: jax.Array, axes: tuple[str, ...] | None) -> jax.Array:
    return x if axes is None else jax.lax.psum(x, axes)


def _varying(x: jax.Array, axes: tuple[str, ...] | None) -> jax.Array:
    """Marks a replicated value as per-device, as scan carries and custom VJPs inside shard_map
    need; its gradient is then summed over the devices on the way back."""
    return x if axes is None else jax.lax.pcast(x, axes, to="varying")


def _softmax_body(zimg, ztxt, logit_scale, logit_bias, *, axes, chunk):
    del logit_bias
    zimg, ztxt = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
    all_img, all_txt = _gather(zimg, axes), _gather(ztxt, axes)  # [N, D]
    # Row r's positive is the other tower's local row r: no labels or gathers needed for it.
    positives = logit_scale * jnp.sum(zimg * ztxt, axis=-1)  # [b]
    if chunk:
        scale = _varying(logit_scale, axes)
        i2t = chunked_logsumexp(zimg, all_txt, scale, chunk)
        t2i = chunked_logsumexp(ztxt, all_img, scale, chunk)
    else:
        i2t = jax.nn.logsumexp(logit_scale * zimg @ all_txt.T, axis=1)  # [b]
        t2i = jax.nn.logsumexp(logit_scale * ztxt @ all_img.T, axis=1)
    local = jnp.sum(i2t - positives) + jnp.sum(t2i - positives)
    return _psum(local, axes) / (2 * all_img.shape[0])


def _sigmoid_body(zimg, ztxt, logit_scale, logit_bias, *, axes, chunk):
    zimg, ztxt = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
    all_txt = _gather(ztxt, axes)  # [N, D]
    b, n = zimg.shape[0], all_txt.shape[0]
    first = 0 if axes is None else jax.lax.axis_index(axes) * b  # global index of local row 0
    rows = first + jnp.arange(b)

    def block_sum(cols: jax.Array, col_ids: jax.Array) -> jax.Array:
        logits = logit_scale * zimg @ cols.T + logit_bias  # [b, c]
        signs = jnp.where(rows[:, None] == col_ids[None, :], 1.0, -1.0)
        valid = col_ids[None, :] < n  # padding columns of the last block
        return jnp.sum(jnp.where(valid, jax.nn.log_sigmoid(signs * logits), 0.0))

    if chunk:
        blocks, ids = _blocks(all_txt, chunk)
        body = jax.checkpoint(lambda acc, x: (acc + block_sum(*x), None))
        local, _ = jax.lax.scan(body, jnp.zeros_like(zimg[0, 0]), (blocks, ids))
    else:
        local = block_sum(all_txt, jnp.arange(n))
    return -_psum(local, axes) / n


def _blocks(cols: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """[N, D] -> [nblocks, chunk, D] zero-padded, and the global column ids [nblocks, chunk]."""
    n = cols.shape[0]
    nblocks = -(-n // chunk)
    padded = jnp.pad(cols, ((0, nblocks * chunk - n), (0, 0)))
    return padded.reshape(nblocks, chunk, -1), jnp.arange(nblocks * chunk).reshape(nblocks, chunk)


# ---------------------------------------------------------------------------------------------
# Blockwise log-sum-exp with a backward pass that recomputes blocks.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_logsumexp(x: jax.Array, cols: jax.Array, scale: jax.Array, chunk: int) -> jax.Array:
    """logsumexp over columns of `scale * x @ cols.T`, one block of `chunk` columns at a time.

    Args:
      x: [b, D] rows; cols: [N, D] columns (N need not be a multiple of chunk); scale: [].
    Returns:
      [b]. Temporaries are O(b·chunk) in both passes: the backward recomputes each block's
      logits from the saved log-sum-exp instead of storing them.
    """
    return _lse_forward(x, cols, scale, chunk)[0]


def _lse_forward(x, cols, scale, chunk):
    n = cols.shape[0]
    blocks, ids = _blocks(cols, chunk)

    def step(carry, block):
        running_max, running_sum = carry
        cols_blk, ids_blk = block
        logits = jnp.where(ids_blk[None, :] < n, scale * x @ cols_blk.T, -jnp.inf)  # [b, c]
        new_max = jnp.maximum(running_max, logits.max(axis=1))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(
            jnp.exp(logits - new_max[:, None]), axis=1
        )
        return (new_max, running_sum), None

    init = (jnp.full_like(x[:, 0], -jnp.inf), jnp.zeros_like(x[:, 0]))  # x's devices and dtype
    (running_max, running_sum), _ = jax.lax.scan(step, init, (blocks, ids))
    lse = running_max + jnp.log(running_sum)
    return lse, (x, cols, scale, lse)


def _lse_backward(chunk, residuals, g):
    x, cols, scale, lse = residuals
    n = cols.shape[0]
    blocks, ids = _blocks(cols, chunk)

    def step(carry, block):
        dx, dscale = carry
        cols_blk, ids_blk = block
        dots = x @ cols_blk.T  # [b, c]
        probs = jnp.where(ids_blk[None, :] < n, jnp.exp(scale * dots - lse[:, None]), 0.0)
        dlogits = g[:, None] * probs  # d lse / d logits, times the incoming cotangent
        dx = dx + scale * dlogits @ cols_blk
        dscale = dscale + jnp.sum(dlogits * dots)
        return (dx, dscale), scale * dlogits.T @ x  # [c, D]: this block's column gradient

    init = (jnp.zeros_like(x), jnp.zeros_like(x[0, 0]))
    (dx, dscale), dcols = jax.lax.scan(step, init, (blocks, ids))
    dcols = dcols.reshape(-1, cols.shape[1])[:n]
    return dx, dcols, dscale.astype(jnp.result_type(scale))


chunked_logsumexp.defvjp(_lse_forward, _lse_backward)


# ---------------------------------------------------------------------------------------------


def make_loss_fn(
    name: str,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    chunk_size: int = 0,
) -> LossFn:
    """`loss(zimg, ztxt, logit_scale, logit_bias) -> []` over the global batch.

    With a mesh, the embeddings' rows are split over `batch_axes` and each device computes its b
    local rows against all N all-gathered columns, in both directions for the softmax loss:
    O(b·N) memory per device, never N×N. `chunk_size > 0` streams the columns in blocks
    (O(b·chunk)). Every form equals the plain one on the whole batch.
    """
    if name not in LOSSES:
        raise UsageError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    if chunk_size < 0:
        raise UsageError(f"loss.chunk_size must be >= 0 (0: not chunked), got {chunk_size}")
    body = _softmax_body if name == "softmax" else _sigmoid_body
    if mesh is None:
        fn = functools.partial(body, axes=None, chunk=chunk_size)
    else:
        axes = tuple(batch_axes)
        fn = jax.shard_map(
            functools.partial(body, axes=axes, chunk=chunk_size),
            mesh=mesh,
            in_specs=(P(axes, None), P(axes, None), P(), P()),
            out_specs=P(),
        )

    def loss(zimg, ztxt, logit_scale, logit_bias=None):
        if name == "sigmoid":
            _bias(logit_bias)
        bias = jnp.zeros((), jnp.float32) if logit_bias is None else logit_bias
        return fn(zimg, ztxt, jnp.asarray(logit_scale, jnp.float32), bias)

    return loss
