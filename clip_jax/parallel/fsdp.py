"""FSDP made explicit: a parameter stored split over the mesh's 'fsdp' axis is cast to the
compute dtype and all-gathered right where a layer uses it (again in the backward pass), and its
gradient is each device's float32 partial product, reduce-scattered into the stored shard and
summed over 'data' at shard size. Without a mesh, or on one device, these are plain products.

    layout = kernel_layout(("embed", "mlp"), kernel.shape)   # None outside a mesh
    y = fsdp_dot(x, kernel, 1, jnp.bfloat16, layout)          # dense layers, patch embedding
    x = fsdp_add(x, pos_embedding, dtype, layout)             # class and positional embeddings
    t = fsdp_embed(tokens, table, dtype, layout)              # the token table

docs/performance.md shows the collectives this compiles to; tests/test_collectives.py counts them.
"""

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from clip_jax.parallel import sharding

Dtype = Any


class KernelLayout(NamedTuple):
    """How a kernel is laid out under the active mesh and rules: `stored`, its sharding in the
    train state (`sharding.param_axes`); `used`, the same without 'fsdp' (what a layer
    multiplies with); `fsdp_dim`, the dimension split over 'fsdp' alone (None: not split)."""

    used: PartitionSpec
    stored: PartitionSpec
    fsdp_dim: int | None


def kernel_layout(names: tuple[str | None, ...], shape: tuple[int, ...]) -> KernelLayout | None:
    """The layout of a kernel with logical axes `names`; None outside a mesh or without rules
    (a plain apply), where there is nothing to lay out."""
    mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
    if mesh.empty or not rules or mesh.size == 1:  # one device: nothing to gather or sum
        return None
    stored = sharding.param_axes(names, shape, dict(mesh.shape), rules)
    split = [i for i, axis in enumerate(stored) if "fsdp" in sharding.as_axes(axis)]
    if mesh.shape["fsdp"] == 1:
        split = []  # stored whole on each device: used as it is
    # A dimension split over 'fsdp' and another axis at once is left to XLA (fsdp_dim None).
    fsdp_dim = split[0] if len(split) == 1 and stored[split[0]] in ("fsdp", ("fsdp",)) else None
    if split and fsdp_dim is None:
        return KernelLayout(PartitionSpec(*stored), PartitionSpec(*stored), None)
    return KernelLayout(
        PartitionSpec(*sharding.gathered_axes(stored)), PartitionSpec(*stored), fsdp_dim
    )


def _gather(kernel: jax.Array, layout: KernelLayout | None) -> jax.Array:
    """The kernel (already in the compute dtype) all-gathered over 'fsdp'."""
    if layout is None or layout.fsdp_dim is None:
        return kernel
    return jax.shard_map(
        lambda k: jax.lax.all_gather(k, "fsdp", axis=layout.fsdp_dim, tiled=True),
        in_specs=layout.stored,
        out_specs=layout.used,
        check_vma=False,  # a tiled all-gather's result is the same on every 'fsdp' device
    )(kernel)


def _sum_over_devices(
    local: Callable,
    args: tuple,
    arg_specs: tuple,
    layout: KernelLayout,
    *,
    parts_as_rows: bool = False,
):
    """`local(*args)` is this device's partial gradient of a parameter, in `layout.used`'s
    layout, from its rows of `args` (split over the batch axes as `arg_specs` say); the sum over
    all devices, in float32, in the parameter's stored layout: a psum over the batch axes that
    do not store it split, after a reduce-scatter over 'fsdp' when it does (`_reduce_scatter`)."""
    mesh = jax.sharding.get_abstract_mesh()
    scatter = layout.fsdp_dim is not None and mesh.shape["fsdp"] > 1
    summed = tuple(
        a for a in sharding.BATCH_AXES if mesh.shape[a] > 1 and not (scatter and a == "fsdp")
    )

    def body(*local_args):
        grad = local(*local_args).astype(jnp.float32)
        if scatter:  # first, so that the psum moves a shard
            grad = _reduce_scatter(grad, layout.fsdp_dim, mesh.shape["fsdp"], parts_as_rows)
        return jax.lax.psum(grad, summed) if summed else grad

    return jax.shard_map(
        body,
        in_specs=arg_specs,
        out_specs=layout.stored if scatter else layout.used,
        check_vma=False,  # summed over every batch axis of more than one device
    )(*args)


def _reduce_scatter(grad: jax.Array, dim: int, parts: int, parts_as_rows: bool) -> jax.Array:
    """`grad` summed over 'fsdp', each device keeping its block of dimension `dim`.

    `parts_as_rows` first stacks the blocks along the leading dimension, [.., d, ..] ->
    [parts·rows, .., d/parts, ..], and scatters that: the same sum in another arrangement. It is
    there for the token table, whose gradient (a scatter's [vocab, width] output, split along
    its width) libtpu compiles as an all-reduce of the whole table on a v5e:2x2, and as a
    reduce-scatter once so arranged (tests/test_aot.py). On larger slices libtpu chooses for
    itself: B/16 on a v5e-256 at data=16 x fsdp=16 all-reduces the table either way
    (docs/performance.md). Kernels are left as they come out of their matmuls: so arranged,
    some of theirs became all-reduces."""
    if parts_as_rows and dim > 0:
        shape = grad.shape
        blocks = grad.reshape(*shape[:dim], parts, shape[dim] // parts, *shape[dim + 1 :])
        grad = jnp.moveaxis(blocks, dim, 0).reshape(
            parts * shape[0], *blocks.shape[1:dim], *blocks.shape[dim + 1 :]
        )
        dim = 0
    return jax.lax.psum_scatter(grad, "fsdp", scatter_dimension=dim, tiled=True)


def _rows_split(x: jax.Array, layout: KernelLayout | None) -> bool:
    """Whether `x`'s leading dimension (its rows) splits over the mesh's batch axes, as the
    batch of training does; elsewhere the gradient is left to XLA."""
    if layout is None:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return x.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0


def _row_spec(x: jax.Array, trailing: tuple) -> PartitionSpec:
    lead = x.ndim - len(trailing)
    return PartitionSpec(sharding.BATCH_AXES, *([None] * (lead - 1)), *trailing)


def _kernel_gradient(
    xc: jax.Array, dy: jax.Array, batch: int, layout: KernelLayout | None
) -> jax.Array:
    """sum over the rows of xc [rows..., *in] (x) dy [rows..., *out] -> [*in, *out] in float32,
    summed over the devices into the kernel's stored layout (`_sum_over_devices`).

    On a CPU the product is taken of the two as matrices, [rows, in] and [rows, out]: its matrix
    library wants the left operand's contraction last, so XLA transposes xc first, and a matrix
    transposes fast where [B, T, in] (fused with the activation that made it) is read a row of
    `in` apart at a time (the text tower's MLP backward took 1.3x longer). Elsewhere the arrays
    stay as they are: a TPU would copy [B, 197, in] into another tiling to merge its rows.
    """

    def local(x, g):
        if not _on_cpu():
            dims = ((tuple(range(batch)), tuple(range(batch))), ((), ()))
            return jax.lax.dot_general(x, g, dims, preferred_element_type=jnp.float32)
        rows = math.prod(x.shape[:batch])
        product = jax.lax.dot_general(
            x.reshape(rows, -1),
            g.reshape(rows, -1),
            (((0,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        return product.reshape(x.shape[batch:] + g.shape[batch:])

    if not _rows_split(xc, layout):
        return local(xc, dy)  # no mesh: XLA sums the rows
    n_in = xc.ndim - batch
    specs = (_row_spec(xc, tuple(layout.used[:n_in])), _row_spec(dy, tuple(layout.used[n_in:])))
    return _sum_over_devices(local, (xc, dy), specs, layout)


def fsdp_dot(
    x: jax.Array, kernel: jax.Array, in_axes: int, dtype: Dtype, layout: KernelLayout | None
) -> jax.Array:
    """x [..., *in] . kernel [*in, *out] -> [..., *out] in `dtype`, accumulated in float32.

    This is where FSDP happens. The kernel is cast to `dtype` and then all-gathered over 'fsdp'
    (the gather moves compute-dtype bytes), used and dropped; the backward pass gathers it again,
    and computes the kernel's gradient as a float32 product of this device's rows, summed over
    the devices by a reduce-scatter straight into the kernel's stored layout (a psum over
    'data'): the gradient is reduced in float32 and never all-reduced at full size. `layout`
    is `kernel_layout`'s, None outside a mesh (then this is a plain dot).
    """
    return _fsdp_dot(x.astype(dtype), kernel, in_axes, dtype, layout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _fsdp_dot(x, kernel, in_axes, dtype, layout):
    return _fsdp_dot_fwd(x, kernel, in_axes, dtype, layout)[0]


def _on_cpu() -> bool:
    """Whether what is being traced will run on a CPU: the active mesh's devices say (a TPU
    program compiled ahead of time on a CPU host is a TPU's), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return (device.platform if device is not None else jax.default_backend()) == "cpu"


def _as_matrices(layout: KernelLayout | None, in_axes: int, ndim: int) -> bool:
    """Whether a kernel [*in, *out] is used as the matrix [prod(in), prod(out)] (and x as
    [..., prod(in)]): on a CPU, whose matrix library takes its operands as matrices, and where
    XLA's transpose of a matrix is fast but a [768, 3, 12, 64] one was 7x slower than a copy.
    Merging dimensions keeps a layout only if no dimension but the first of each group is
    split (the heads of `qkv`'s [3, heads, head_dim] under tensor parallelism are not).
    Accelerators multiply the arrays as they are (a TPU would re-tile them to merge them)."""
    if not _on_cpu():
        return False
    if layout is None:
        return True
    used = tuple(layout.used) + (None,) * (ndim - len(layout.used))
    return all(axis is None for axis in used[1:in_axes] + used[in_axes + 1 :])


def _fsdp_dot_fwd(x, kernel, in_axes, dtype, layout):
    used, xc = _gather(kernel.astype(dtype), layout), x
    lead, out = x.shape[: x.ndim - in_axes], kernel.shape[in_axes:]
    if _as_matrices(layout, in_axes, kernel.ndim):
        n_in = math.prod(kernel.shape[:in_axes])
        x, used = x.reshape(*lead, n_in), used.reshape(n_in, math.prod(out))
        in_axes = 1
    y = jax.lax.dot_general(
        x,
        used,
        ((tuple(range(x.ndim - in_axes, x.ndim)), tuple(range(in_axes))), ((), ())),
        preferred_element_type=jnp.float32,
    )
    return y.reshape(*lead, *out).astype(dtype), (xc, kernel)


def _fsdp_dot_bwd(in_axes, dtype, layout, residuals, dy):
    xc, kernel = residuals
    used, dy = _gather(kernel.astype(dtype), layout), dy.astype(dtype)  # gathered again
    lead, n_out = dy.shape[: xc.ndim - in_axes], kernel.ndim - in_axes
    g, k = dy, used
    if _as_matrices(layout, in_axes, kernel.ndim):
        n_in = math.prod(kernel.shape[:in_axes])
        g, k = dy.reshape(*lead, -1), used.reshape(n_in, -1)
        n_out = 1
    dx = jax.lax.dot_general(
        g,
        k,
        ((tuple(range(g.ndim - n_out, g.ndim)), tuple(range(k.ndim - n_out, k.ndim))), ((), ())),
        preferred_element_type=jnp.float32,
    )
    dk = _kernel_gradient(xc, dy, len(lead), layout)
    return dx.reshape(xc.shape).astype(xc.dtype), dk.astype(kernel.dtype)


_fsdp_dot.defvjp(_fsdp_dot_fwd, _fsdp_dot_bwd)


def fsdp_add(x: jax.Array, param: jax.Array, dtype: Dtype, layout: KernelLayout | None):
    """x [rows..., *p] + param [*p] (broadcast over the leading rows) in `dtype`: a positional
    or class embedding, all-gathered in `dtype` like `fsdp_dot`'s kernels, its gradient (the
    sum of the output gradient over the rows) reduced in float32 into its stored layout."""
    return _fsdp_add(x.astype(dtype), param, dtype, layout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fsdp_add(x, param, dtype, layout):
    return _fsdp_add_fwd(x, param, dtype, layout)[0]


def _fsdp_add_fwd(x, param, dtype, layout):
    return x + _gather(param.astype(dtype), layout), param


def _fsdp_add_bwd(dtype, layout, param, dy):
    rows = dy.shape[: dy.ndim - param.ndim]
    ones = jnp.ones(rows, dy.dtype)  # the gradient: dy summed over the rows, ones (x) dy
    dp = _kernel_gradient(ones, dy, len(rows), layout)
    return dy, dp.astype(param.dtype)


_fsdp_add.defvjp(_fsdp_add_fwd, _fsdp_add_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fsdp_embed(tokens: jax.Array, table: jax.Array, dtype: Dtype, layout: KernelLayout | None):
    """Rows of `table` [vocab, width] at `tokens` [rows..., T] in `dtype`: the table all-gathered
    over 'fsdp' in `dtype`, its gradient scattered into a float32 table on each device from its
    own rows and reduce-scattered into the stored layout. A vocabulary split over mesh axes is
    left to XLA (a plain lookup)."""
    return _fsdp_embed_fwd(tokens, table, dtype, layout)[0]


def _plain_lookup(layout: KernelLayout | None) -> bool:
    """Whether a table is looked up as it is: outside a mesh, or with its vocabulary split."""
    if layout is None:
        return True
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in sharding.as_axes(layout.used[0])) > 1


def _fsdp_embed_fwd(tokens, table, dtype, layout):
    used = table.astype(dtype) if _plain_lookup(layout) else _gather(table.astype(dtype), layout)
    return jnp.take(used, tokens, axis=0), (tokens, table)


def _fsdp_embed_bwd(dtype, layout, residuals, dy):
    tokens, table = residuals

    def local(t, g):  # the rows' gradient, a whole [vocab, width] table
        zeros = jnp.zeros(table.shape[:1] + g.shape[-1:], jnp.float32)
        return zeros.at[t].add(g.astype(jnp.float32))

    if _plain_lookup(layout) or not _rows_split(tokens, layout):
        grad = local(tokens, dy)
    else:
        specs = (_row_spec(tokens, ()), _row_spec(dy, (layout.used[1],)))
        grad = _sum_over_devices(local, (tokens, dy), specs, layout, parts_as_rows=True)
    return None, grad.astype(table.dtype)


fsdp_embed.defvjp(_fsdp_embed_fwd, _fsdp_embed_bwd)
