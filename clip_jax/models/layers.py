"""Building blocks shared by the towers: pre-LN residual attention blocks, MLP, activations.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, ...) that
`clip_jax.sharding` maps onto the device mesh; activations are constrained with
`act_batch`, `act_seq`, `act_embed`. Without a mesh these annotations are no-ops.
"""

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from clip_jax import sharding
from clip_jax.errors import UsageError

Dtype = Any
LN_EPS = 1e-5  # PyTorch's LayerNorm default, which every CLIP checkpoint was trained with.

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI's GELU approximation x * sigmoid(1.702 x), used by all their released models."""
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def activation(quick: bool) -> Callable[[jax.Array], jax.Array]:
    return quick_gelu if quick else exact_gelu


def partitioned(init: Callable, names: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(init, names)


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=LN_EPS,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=partitioned(nn.initializers.ones, ("norm",)),
        bias_init=partitioned(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, names)


class DenseInit(NamedTuple):
    """The initializers of a dense layer's kernel and bias, without axis names (the layer adds
    them)."""

    kernel: Callable
    bias: Callable


def symmetric_uniform(bound: float) -> Callable:
    """An initializer drawing from U(-bound, bound)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def pytorch_linear_init(fan_in: int) -> DenseInit:
    """PyTorch's nn.Linear default: kaiming_uniform(a=sqrt(5)) weights, which is
    U(+-1/sqrt(fan_in)), and biases from the same range."""
    bound = fan_in**-0.5
    return DenseInit(symmetric_uniform(bound), symmetric_uniform(bound))


def normal_init(std: float) -> DenseInit:
    """Normal weights of standard deviation `std`, zero biases."""
    return DenseInit(nn.initializers.normal(std), nn.initializers.zeros)


# How an image tower's weights start: "default" is this package's own choice, "openai" what
# OpenAI's code gives (see VisionTransformer and ModifiedResNet for the differences).
INIT_SCHEMES = ("default", "openai")


def check_init_scheme(init_scheme: str) -> None:
    if init_scheme not in INIT_SCHEMES:
        raise UsageError(f"unknown init_scheme {init_scheme!r}; choose one of {INIT_SCHEMES}")


# How a residual block's dense layers start: "scaled_normal" as OpenAI initialised their text
# transformer (clip/model.py, initialize_parameters); "pytorch_default" as PyTorch's modules
# start, which OpenAI's vision transformer keeps (its blocks are not re-initialised there).
BLOCK_INITS = ("scaled_normal", "pytorch_default")


def block_inits(kind: str, width: int, mlp_dim: int, layers: int) -> dict[str, DenseInit]:
    """The initializers of a residual block's `qkv`, `out`, `c_fc` and `c_proj` layers.

    Args:
      kind: one of `BLOCK_INITS`.
      width: the block's width D; mlp_dim: its MLP's hidden size; layers: the tower's depth.
    Returns:
      {"qkv", "out", "c_fc", "c_proj"} -> DenseInit.
    """
    if kind == "scaled_normal":
        # Normal weights, zero biases; the residual outputs shrink with depth, as in GPT-2.
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        return {
            "qkv": normal_init(width**-0.5),
            "out": normal_init(proj_std),
            "c_fc": normal_init((2 * width) ** -0.5),
            "c_proj": normal_init(proj_std),
        }
    if kind == "pytorch_default":
        # nn.MultiheadAttention: xavier_uniform over its in_proj_weight [3D, D] (fan_in D,
        # fan_out 3D), zero in_proj_bias; its out_proj is an nn.Linear whose bias it zeroes.
        xavier = symmetric_uniform((6 / (width + 3 * width)) ** 0.5)
        return {
            "qkv": DenseInit(xavier, nn.initializers.zeros),
            "out": DenseInit(symmetric_uniform(width**-0.5), nn.initializers.zeros),
            "c_fc": pytorch_linear_init(width),
            "c_proj": pytorch_linear_init(mlp_dim),
        }
    raise UsageError(f"unknown block init {kind!r}; choose one of {BLOCK_INITS}")


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


def _sum_over_devices(local: Callable, args: tuple, arg_specs: tuple, layout: KernelLayout):
    """`local(*args)` is this device's partial gradient of a parameter, in `layout.used`'s
    layout, from its rows of `args` (split over the batch axes as `arg_specs` say); the sum over
    all devices, in float32, in the parameter's stored layout: a psum over the batch axes that
    do not store it split, after a reduce-scatter over 'fsdp' when it does."""
    mesh = jax.sharding.get_abstract_mesh()
    scatter = layout.fsdp_dim is not None and mesh.shape["fsdp"] > 1
    summed = tuple(
        a for a in sharding.BATCH_AXES if mesh.shape[a] > 1 and not (scatter and a == "fsdp")
    )

    def body(*local_args):
        grad = local(*local_args).astype(jnp.float32)
        if scatter:  # first, so that the psum moves a shard
            grad = jax.lax.psum_scatter(grad, "fsdp", scatter_dimension=layout.fsdp_dim, tiled=True)
        return jax.lax.psum(grad, summed) if summed else grad

    return jax.shard_map(
        body,
        in_specs=arg_specs,
        out_specs=layout.stored if scatter else layout.used,
        check_vma=False,  # summed over every batch axis of more than one device
    )(*args)


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

    The product is taken of the two as matrices, [rows, in] and [rows, out]: a matrix library
    wants its left operand's contraction last, so XLA transposes xc first, and transposing a
    matrix is fast where transposing [B, T, in] (fused with the activation that made it) reads
    it a row of `in` apart at a time (on a CPU, the text tower's MLP backward took 1.3x longer).
    """

    def local(x, g):
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


def _as_matrices(layout: KernelLayout | None, in_axes: int, ndim: int) -> bool:
    """Whether a kernel [*in, *out] may be used as the matrix [prod(in), prod(out)] (and x as
    [..., prod(in)]): a CPU's matrix library takes its operands as matrices, and XLA's
    transpose of a matrix is fast where a [768, 3, 12, 64] one was 7x slower than its copy.
    Merging dimensions keeps a layout only if no dimension but the first of each group is
    split (the heads of `qkv`'s [3, heads, head_dim] under tensor parallelism are not)."""
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
        grad = _sum_over_devices(local, (tokens, dy), specs, layout)
    return None, grad.astype(table.dtype)


fsdp_embed.defvjp(_fsdp_embed_fwd, _fsdp_embed_bwd)


class DenseGeneral(nn.Module):
    """A dense layer over the last `in_axes` axes into `features`, e.g. [D] -> [3, heads, head_dim].

    Unlike `nn.DenseGeneral`, the kernel is created in its full shape [*in, *features], so that
    its logical axis names apply to it as created (nn.DenseGeneral initialises a flattened kernel,
    on which a sharding constraint of the full rank fails), and it is used through `fsdp_dot`:
    gathered in the compute dtype, its gradient reduced in float32.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    bias_axes: tuple[str | None, ...]
    init: DenseInit
    in_axes: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.in_axes :]
        shape = (*in_shape, *self.features)
        kernel = self.param(
            "kernel", partitioned(self.init.kernel, self.kernel_axes), shape, self.param_dtype
        )
        bias = self.param(
            "bias",
            partitioned(self.init.bias, self.bias_axes),
            self.features,
            self.param_dtype,
        )
        layout = kernel_layout(self.kernel_axes, shape)
        y = fsdp_dot(x, kernel, self.in_axes, jnp.dtype(self.dtype), layout)
        return y + bias.astype(self.dtype)


class MLP(nn.Module):
    """Two-layer MLP `c_fc -> act -> c_proj`, hidden size `mlp_dim`."""

    mlp_dim: int
    fc_init: DenseInit
    proj_init: DenseInit
    quick_gelu: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
        width = x.shape[-1]
        h = DenseGeneral(
            (self.mlp_dim,),
            kernel_axes=("embed", "mlp"),
            bias_axes=("mlp",),
            init=self.fc_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="c_fc",
        )(x)
        h = constrain(h, ("act_batch", "act_seq", "act_mlp"))
        h = activation(self.quick_gelu)(h)
        return DenseGeneral(
            (width,),
            kernel_axes=("mlp", "embed"),
            bias_axes=("embed",),
            init=self.proj_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="c_proj",
        )(h)


# cuDNN's flash attention takes some sequence lengths only (in some versions of JAX even
# lengths, in others multiples of 64); the towers' lengths are 50, 197, 257 (a class token
# and the patches) and 77. Sequences are padded to a multiple of this and the padding masked.
CUDNN_SEQ_MULTIPLE = 64


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    implementation: str | None,
    pad_to: int | None = None,
) -> jax.Array:
    """`jax.nn.dot_product_attention` of [B, T, H, K] queries, keys and values for any length T.

    With `implementation="cudnn"` (or any `pad_to`), the sequence is padded with zeros to a
    multiple of `pad_to` (`CUDNN_SEQ_MULTIPLE` for cuDNN), the padded keys masked out by their
    lengths, and the padded queries' rows dropped: the result is the unpadded attention's.
    """
    if pad_to is None and implementation == "cudnn":
        pad_to = CUDNN_SEQ_MULTIPLE
    length = q.shape[1]
    if pad_to is None or length % pad_to == 0:
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=implementation
        )
    padded = -(-length // pad_to) * pad_to
    widths = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
    lengths = jnp.full((q.shape[0],), length, jnp.int32)
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=causal,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )
    return out[:, :length]


class MultiHeadAttention(nn.Module):
    """Self-attention with a fused QKV projection and XLA's fused dot-product attention.

    The fused `qkv` kernel is [D, 3, heads, head_dim] (q, k, v in that order), which is
    PyTorch's `in_proj_weight` [3D, D] transposed and reshaped, so conversion is exact.
    """

    heads: int
    qkv_init: DenseInit
    out_init: DenseInit
    causal: bool = False
    attn_impl: str | None = None  # None lets JAX choose; "cudnn" for flash attention on GPU.
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
        width = x.shape[-1]
        if width % self.heads:
            raise UsageError(f"width {width} is not divisible by heads {self.heads}")
        head_dim = width // self.heads
        qkv = DenseGeneral(
            (3, self.heads, head_dim),
            kernel_axes=("embed", None, "heads", "kv"),
            bias_axes=(None, "heads", "kv"),
            init=self.qkv_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="qkv",
        )(x)  # [B, T, 3, H, K]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = constrain(q, ("act_batch", "act_seq", "act_heads", "act_kv"))
        k = constrain(k, ("act_batch", "act_seq", "act_heads", "act_kv"))
        v = constrain(v, ("act_batch", "act_seq", "act_heads", "act_kv"))
        out = attention(q, k, v, causal=self.causal, implementation=self.attn_impl)
        return DenseGeneral(
            (width,),
            kernel_axes=("heads", "kv", "embed"),
            bias_axes=("embed",),
            init=self.out_init,
            in_axes=2,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )(out)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    heads: int
    mlp_ratio: float = 4.0
    causal: bool = False
    quick_gelu: bool = False
    layers: int = 12  # depth of the tower, for the output-projection init scale
    block_init: str = "scaled_normal"  # one of BLOCK_INITS
    attn_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
        width = x.shape[-1]
        mlp_dim = int(width * self.mlp_ratio)
        inits = block_inits(self.block_init, width, mlp_dim, self.layers)
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        x = x + MultiHeadAttention(
            self.heads,
            qkv_init=inits["qkv"],
            out_init=inits["out"],
            causal=self.causal,
            attn_impl=self.attn_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attn",
        )(layer_norm("ln_1", self.dtype, self.param_dtype)(x))
        x = x + MLP(
            mlp_dim,
            fc_init=inits["c_fc"],
            proj_init=inits["c_proj"],
            quick_gelu=self.quick_gelu,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="mlp",
        )(layer_norm("ln_2", self.dtype, self.param_dtype)(x))
        return constrain(x, ("act_batch", "act_seq", "act_embed"))


class Transformer(nn.Module):
    """A stack of `layers` residual attention blocks.

    By default the blocks are `layers` modules named `resblocks_{i}`, traced one after another.
    With `scan_layers` they are one block named `resblocks` run by `nn.scan`: its parameters
    are stacked, with a leading [layers] axis that is replicated (no sharding rule needed), and
    XLA compiles the block once instead of `layers` times (MaxText's layer scan), which keeps
    the compile time of a deep tower short; `remat_policy` then applies inside the scan, per
    block. The two layouts hold the same numbers (`clip.stack_layers` maps one to the
    other) and compute the same function.
    """

    layers: int
    heads: int
    mlp_ratio: float = 4.0
    causal: bool = False
    quick_gelu: bool = False
    remat_policy: str = "none"
    block_init: str = "scaled_normal"  # one of BLOCK_INITS
    attn_impl: str | None = None
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
        if self.remat_policy not in REMAT_POLICIES:
            raise UsageError(
                f"unknown remat_policy {self.remat_policy!r}; "
                f"choose one of {sorted(REMAT_POLICIES)}"
            )
        block = ResidualAttentionBlock
        if self.remat_policy != "none":
            # Inside a scan no two blocks' recomputations can be merged, so the CSE barrier
            # that the unrolled stack needs would only cost speed there (MaxText does the same).
            block = nn.remat(
                block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan_layers
            )
        fields = dict(
            mlp_ratio=self.mlp_ratio,
            causal=self.causal,
            quick_gelu=self.quick_gelu,
            layers=self.layers,
            block_init=self.block_init,
            attn_impl=self.attn_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if self.scan_layers:
            stack = nn.scan(
                _scan_body,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                length=self.layers,
                metadata_params={nn.PARTITION_NAME: None},
            )
            x, _ = stack(block(self.heads, **fields, name="resblocks"), x, None)
            return x
        for i in range(self.layers):
            x = block(self.heads, **fields, name=f"resblocks_{i}")(x)
        return x


def _scan_body(block: nn.Module, x: jax.Array, _: None) -> tuple[jax.Array, None]:
    """One step of the scanned stack: the carry is the residual stream [B, T, D]."""
    return block(x), None
