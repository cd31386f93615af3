"""Contrastive losses over the global batch: CLIP's softmax loss and SigLIP's sigmoid loss, in a
plain form, a sharded form (all-gathered columns, O(b·N) memory per device) and a chunked form
(columns streamed in blocks, O(b·chunk)). The sharded and chunked forms compute their gradient
with the loss, each device for its own rows: their backward pass moves no embeddings.

Embeddings enter L2-normalised, [N, D]; `logit_scale` is the temperature's inverse 1/τ (already
exponentiated); `logit_bias` is the sigmoid loss's learned bias. Everything is computed in float32.
"""

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clip_jax.infra.errors import UsageError

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
# The global-batch loss and its gradient, computed together.
#
# Device d holds rows R of both embedding sets X (images) and Y (texts) and all-gathers the
# columns. The N×N logits S = s·X Yᵀ (+ b) never exist whole: d computes its images against every
# text, S[R, :], and its texts against every image, S[:, R]ᵀ. The loss's gradient G = dL/dS splits
# the same way: dL/dX[R] = s·G[R, :] Y and dL/dY[R] = s·G[:, R]ᵀ X. So each device computes the
# gradients of its own rows from the two blocks it already has, and no embedding-sized gradient
# moves between devices. (Autodiff through the all-gathers would reduce-scatter two [N, D] float32
# gradients, which the TPU compiler writes as two full all-reduces, and would differentiate each
# block by its columns too: 4 [b, N, D] matmuls where 2 are needed.) The softmax loss's G needs
# every row's and every column's log-sum-exp, so devices exchange those: N floats a direction.
#
#   softmax: G = (softmax_rows(S) + softmax_cols(S) - 2I) / 2N
#   sigmoid: G = (σ(S) - I) / N
#
# A custom VJP computes the gradient in the forward pass, while the [b, N] blocks exist; what
# waits for the backward pass is two [b, D] gradients and two scalars, and the backward pass
# only scales them by the incoming cotangent. (So the loss has no forward-mode derivative.)


def _gather(x: jax.Array, axes: tuple[str, ...] | None) -> jax.Array:
    return x if axes is None else jax.lax.all_gather(x, axes, axis=0, tiled=True)


def _psum(x: jax.Array, axes: tuple[str, ...] | None) -> jax.Array:
    return x if axes is None else jax.lax.psum(x, axes)


def _blocks(a: jax.Array, chunk: int, fill: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """[N, ...] -> [nblocks, chunk, ...] padded with `fill`, and the global row ids
    [nblocks, chunk] (ids >= N are padding)."""
    n = a.shape[0]
    nblocks = -(-n // chunk)
    pad = [(0, nblocks * chunk - n)] + [(0, 0)] * (a.ndim - 1)
    padded = jnp.pad(a, pad, constant_values=fill)
    ids = jnp.arange(nblocks * chunk).reshape(nblocks, chunk)
    return padded.reshape(nblocks, chunk, *a.shape[1:]), ids


def _blockwise_lse(x: jax.Array, cols: jax.Array, scale: jax.Array, chunk: int) -> jax.Array:
    """[b] logsumexp over columns of `scale * x @ cols.T`, a block of `chunk` columns at a time
    with a running maximum: O(b·chunk) temporaries."""
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
    return running_max + jnp.log(running_sum)


def _sigmoid_sum(x, cols, first, scale, bias, chunk, logits=None):
    """Σ log σ(z·(scale·x·cols + bias)) over the [b, N] block whose row r's positive is column
    first + r, in blocks of `chunk` columns when chunk > 0 (else from the block's `logits`)."""
    rows = first + jnp.arange(x.shape[0])
    n = cols.shape[0]

    def block_sum(logits_blk, col_ids):
        signs = jnp.where(rows[:, None] == col_ids[None, :], 1.0, -1.0)
        terms = jax.nn.log_sigmoid(signs * logits_blk)
        return jnp.sum(jnp.where(col_ids[None, :] < n, terms, 0.0))

    if not chunk:
        return block_sum(logits, jnp.arange(n))
    blocks, ids = _blocks(cols, chunk)
    step = lambda acc, blk: (acc + block_sum(scale * x @ blk[0].T + bias, blk[1]), None)  # noqa: E731
    total, _ = jax.lax.scan(step, jnp.zeros_like(x[0, 0]), (blocks, ids))
    return total


def _row_terms(name, x, cols, logits, *, scale, bias, row_lse, col_lse, chunk):
    """For the block of logits `scale * x @ cols.T + bias` (b rows against all N columns) and P
    its part of G without the identity, times 2N or N: (P @ cols [b, D], Σ P·x·cols, Σ P).

    softmax: P = exp(logits - row_lse) + exp(logits - col_lse); sigmoid: P = σ(logits). From
    the block's `logits` when chunk is 0, else recomputed a block of columns at a time."""

    def terms(logits_blk, cols_blk, col_lse_blk, valid):
        if name == "softmax":
            p = jnp.exp(logits_blk - row_lse[:, None]) + jnp.exp(logits_blk - col_lse_blk[None, :])
        else:
            p = jax.nn.sigmoid(logits_blk)
        if valid is not None:
            p = jnp.where(valid, p, 0.0)
        return p @ cols_blk, jnp.sum(p * logits_blk), jnp.sum(p)

    if not chunk:
        out = terms(logits, cols, col_lse, None)
    else:
        n = cols.shape[0]
        blocks, ids = _blocks(cols, chunk)
        lse_blocks, _ = _blocks(col_lse, chunk, fill=jnp.inf)

        def step(carry, blk):
            cols_blk, ids_blk, lse_blk = blk
            logits_blk = scale * x @ cols_blk.T + bias
            out = terms(logits_blk, cols_blk, lse_blk, ids_blk[None, :] < n)
            return jax.tree.map(jnp.add, carry, out), None

        init = (jnp.zeros_like(x), jnp.zeros_like(x[0, 0]), jnp.zeros_like(x[0, 0]))
        out, _ = jax.lax.scan(step, init, (blocks, ids, lse_blocks))
    p_cols, p_logits, p_sum = out
    return p_cols, (p_logits - bias * p_sum) / scale, p_sum  # Σ P·logits -> Σ P·dots


def _value(zimg, ztxt, scale, bias, name, axes, chunk):
    """The loss from this device's rows, and what its gradient needs: (value, intermediates)."""
    if name == "softmax":
        bias = jnp.zeros_like(bias)  # the logits' bias is the sigmoid loss's alone
    all_img, all_txt = _gather(zimg, axes), _gather(ztxt, axes)  # [N, D]
    n = all_img.shape[0]
    positives = jnp.sum(zimg * ztxt, axis=-1)  # [b]: row r's positive is the other's local row r
    # [b, N]: this device's images x all texts, and its texts x all images.
    logits_img = logits_txt = None
    if not chunk:
        logits_img = scale * zimg @ all_txt.T + bias
        if name == "softmax" or axes is None:
            logits_txt = logits_img.T if axes is None else scale * ztxt @ all_img.T + bias
    if name == "softmax":
        if chunk:
            lse_img = _blockwise_lse(zimg, all_txt, scale, chunk)
            lse_txt = _blockwise_lse(ztxt, all_img, scale, chunk)
        else:
            lse_img = jax.nn.logsumexp(logits_img, axis=1)
            lse_txt = jax.nn.logsumexp(logits_txt, axis=1)
        value = _psum(jnp.sum(lse_img + lse_txt - 2 * scale * positives), axes) / (2 * n)
        stats = (lse_img, lse_txt)
    else:
        first = 0 if axes is None else jax.lax.axis_index(axes) * zimg.shape[0]
        local = _sigmoid_sum(zimg, all_txt, first, scale, bias, chunk, logits_img)
        value = -_psum(local, axes) / n
        stats = None
    return value, (bias, all_img, all_txt, positives, logits_img, logits_txt, stats)


def _gradients(zimg, ztxt, scale, name, axes, chunk, intermediates):
    """d loss / d (zimg, ztxt, scale, bias) for this device's rows."""
    bias, all_img, all_txt, positives, logits_img, logits_txt, stats = intermediates
    n = all_img.shape[0]
    if name == "softmax":
        lse_img, lse_txt = stats
        img_col_lse, txt_col_lse = _gather(lse_txt, axes), _gather(lse_img, axes)  # [N] each
        k, denom = 2.0, 2 * n  # each positive sits in a row and in a column of S
    else:
        img_col_lse = txt_col_lse = lse_img = lse_txt = jnp.zeros_like(all_img[:, 0])
        k, denom = 1.0, n
        if not chunk and logits_txt is None:
            logits_txt = scale * ztxt @ all_img.T + bias
    terms = functools.partial(_row_terms, name, scale=scale, bias=bias, chunk=chunk)
    a_img, b_img, c_img = terms(zimg, all_txt, logits_img, row_lse=lse_img, col_lse=img_col_lse)
    a_txt, _, _ = terms(ztxt, all_img, logits_txt, row_lse=lse_txt, col_lse=txt_col_lse)
    dzimg = scale * (a_img - k * ztxt) / denom
    dztxt = scale * (a_txt - k * zimg) / denom
    dscale = _psum(b_img - k * jnp.sum(positives), axes) / denom
    if name == "softmax":
        dbias = jnp.zeros_like(bias)
    else:
        dbias = _psum(c_img - zimg.shape[0], axes) / denom
    return dzimg, dztxt, dscale, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _global_loss(zimg, ztxt, scale, bias, name, axes, chunk):
    """The loss over the global batch from this device's rows (inside shard_map over `axes`, or
    the whole batch when axes is None); float32 inputs. Same value on every device."""
    return _value(zimg, ztxt, scale, bias, name, axes, chunk)[0]


def _global_forward(zimg, ztxt, scale, bias, name, axes, chunk):
    value, intermediates = _value(zimg, ztxt, scale, bias, name, axes, chunk)
    return value, _gradients(zimg, ztxt, scale, name, axes, chunk, intermediates)


def _global_backward(name, axes, chunk, gradients, g):
    del name, axes, chunk
    return tuple(g * x for x in gradients)


_global_loss.defvjp(_global_forward, _global_backward)


def make_loss_fn(
    name: str,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    chunk_size: int = 0,
) -> LossFn:
    """`loss(zimg, ztxt, logit_scale, logit_bias) -> []` over the global batch.

    With a mesh, the embeddings' rows are split over `batch_axes` and each device computes its b
    local rows against all N all-gathered columns, in both directions: O(b·N) memory per device,
    never N×N, and the gradient of its own rows with no collective in the backward pass.
    `chunk_size > 0` streams the columns in blocks (O(b·chunk)). Every form equals the plain one
    on the whole batch, value and gradients. Reverse mode only (jax.grad, jax.vjp).
    """
    if name not in LOSSES:
        raise UsageError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    if chunk_size < 0:
        raise UsageError(f"loss.chunk_size must be >= 0 (0: not chunked), got {chunk_size}")
    axes = None if mesh is None else tuple(batch_axes)

    def body(zimg, ztxt, logit_scale, logit_bias):
        f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
        args = (f32(zimg), f32(ztxt), f32(logit_scale), f32(logit_bias))
        return _global_loss(*args, name, axes, chunk_size)

    if mesh is None:
        fn = body
    else:
        fn = jax.shard_map(
            body, mesh=mesh, in_specs=(P(axes, None), P(axes, None), P(), P()), out_specs=P()
        )

    def loss(zimg, ztxt, logit_scale, logit_bias=None):
        if name == "sigmoid":
            _bias(logit_bias)
        bias = jnp.zeros((), jnp.float32) if logit_bias is None else logit_bias
        return fn(zimg, ztxt, logit_scale, bias)

    return loss
