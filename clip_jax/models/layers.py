"""Building blocks shared by the towers: pre-LN residual attention blocks, MLP, activations.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, ...) that
`clip_jax.parallel.sharding` maps onto the device mesh; activations are constrained with
`act_batch`, `act_seq`, `act_embed`. Without a mesh these annotations are no-ops.
"""

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.infra.errors import UsageError
from clip_jax.parallel.fsdp import Dtype, fsdp_dot, kernel_layout

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


def tanh_gelu(x: jax.Array) -> jax.Array:
    """GELU's tanh approximation (PyTorch's `approximate="tanh"`, timm's "gelu_tanh"), what
    big_vision's SigLIP towers use."""
    return jax.nn.gelu(x, approximate=True)


def activation(quick: bool, tanh: bool = False) -> Callable[[jax.Array], jax.Array]:
    """QuickGELU, GELU's tanh approximation, or exact GELU; asking for both approximations is a
    mistake."""
    if quick and tanh:
        raise UsageError("quick_gelu and gelu_tanh are two different activations: choose one")
    if quick:
        return quick_gelu
    return tanh_gelu if tanh else exact_gelu


def partitioned(init: Callable, names: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(init, names)


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype, eps: float = LN_EPS) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
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
    gelu_tanh: bool = False
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
        h = activation(self.quick_gelu, self.gelu_tanh)(h)
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
    lengths: jax.Array | None = None,
) -> jax.Array:
    """`jax.nn.dot_product_attention` of [B, T, H, K] queries, keys and values for any length T.

    With `implementation="cudnn"` (or any `pad_to`), the sequence is padded with zeros to a
    multiple of `pad_to` (`CUDNN_SEQ_MULTIPLE` for cuDNN), the padded keys masked out by their
    lengths, and the padded queries' rows dropped: the result is the unpadded attention's.

    `lengths` [B] (NaFlex's padded patch sequences): row b's keys past `lengths[b]` are masked,
    so padding never reaches a real token (the padding's own rows are computed and ignored).
    """
    if pad_to is None and implementation == "cudnn":
        pad_to = CUDNN_SEQ_MULTIPLE
    length = q.shape[1]
    if pad_to is None or length % pad_to == 0:
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, key_value_seq_lengths=lengths, implementation=implementation
        )
    padded = -(-length // pad_to) * pad_to
    widths = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
    full = jnp.full((q.shape[0],), length, jnp.int32)
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=causal,
        query_seq_lengths=full,
        key_value_seq_lengths=full if lengths is None else lengths,
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
    def __call__(self, x: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """[B, T, D] -> [B, T, D]; `lengths` [B]: the real tokens of each row (`attention`)."""
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
        out = attention(q, k, v, causal=self.causal, implementation=self.attn_impl, lengths=lengths)
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
    gelu_tanh: bool = False
    ln_eps: float = LN_EPS
    layers: int = 12  # depth of the tower, for the output-projection init scale
    block_init: str = "scaled_normal"  # one of BLOCK_INITS
    attn_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """[B, T, D] -> [B, T, D]; `lengths` [B]: the real tokens of each row (`attention`)."""
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
        )(layer_norm("ln_1", self.dtype, self.param_dtype, self.ln_eps)(x), lengths)
        x = x + MLP(
            mlp_dim,
            fc_init=inits["c_fc"],
            proj_init=inits["c_proj"],
            quick_gelu=self.quick_gelu,
            gelu_tanh=self.gelu_tanh,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="mlp",
        )(layer_norm("ln_2", self.dtype, self.param_dtype, self.ln_eps)(x))
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
    gelu_tanh: bool = False
    ln_eps: float = LN_EPS
    remat_policy: str = "none"
    block_init: str = "scaled_normal"  # one of BLOCK_INITS
    attn_impl: str | None = None
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """[B, T, D] -> [B, T, D]; `lengths` [B]: the real tokens of each row (`attention`)."""
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
            gelu_tanh=self.gelu_tanh,
            ln_eps=self.ln_eps,
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
                in_axes=nn.broadcast,
                metadata_params={nn.PARTITION_NAME: None},
            )
            x, _ = stack(block(self.heads, **fields, name="resblocks"), x, lengths)
            return x
        for i in range(self.layers):
            x = block(self.heads, **fields, name=f"resblocks_{i}")(x, lengths)
        return x


def _scan_body(block: nn.Module, x: jax.Array, lengths: jax.Array | None) -> tuple[jax.Array, None]:
    """One step of the scanned stack: the carry is the residual stream [B, T, D]; `lengths`
    (or None) is the same for every layer."""
    return block(x, lengths), None
