"""Building blocks shared by the towers: pre-LN residual attention blocks, MLP, activations.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, ...) that
`clip_jax.sharding` maps onto the device mesh; activations are constrained with
`act_batch`, `act_seq`, `act_embed`. Without a mesh these annotations are no-ops.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


class DenseGeneral(nn.Module):
    """A dense layer over the last `in_axes` axes into `features`, e.g. [D] -> [3, heads, head_dim].

    Unlike `nn.DenseGeneral`, the kernel is created in its full shape [*in, *features], so that
    its logical axis names apply to it as created (nn.DenseGeneral initialises a flattened kernel,
    on which a sharding constraint of the full rank fails).
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    bias_axes: tuple[str | None, ...]
    in_axes: int = 1
    std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.in_axes :]
        kernel = self.param(
            "kernel",
            partitioned(nn.initializers.normal(self.std), self.kernel_axes),
            (*in_shape, *self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            partitioned(nn.initializers.zeros, self.bias_axes),
            self.features,
            self.param_dtype,
        )
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        contract = (tuple(range(x.ndim - self.in_axes, x.ndim)), tuple(range(self.in_axes)))
        return jax.lax.dot_general(x, kernel, (contract, ((), ()))) + bias


class MLP(nn.Module):
    """Two-layer MLP `c_fc -> act -> c_proj`, hidden size `mlp_dim`."""

    mlp_dim: int
    quick_gelu: bool = False
    fc_std: float = 0.02
    proj_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
        width = x.shape[-1]
        h = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(nn.initializers.normal(self.fc_std), ("embed", "mlp")),
            bias_init=partitioned(nn.initializers.zeros, ("mlp",)),
            name="c_fc",
        )(x)
        h = constrain(h, ("act_batch", "act_seq", "act_mlp"))
        h = activation(self.quick_gelu)(h)
        return nn.Dense(
            width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(nn.initializers.normal(self.proj_std), ("mlp", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="c_proj",
        )(h)


class MultiHeadAttention(nn.Module):
    """Self-attention with a fused QKV projection and XLA's fused dot-product attention.

    The fused `qkv` kernel is [D, 3, heads, head_dim] (q, k, v in that order), which is
    PyTorch's `in_proj_weight` [3D, D] transposed and reshaped, so conversion is exact.
    """

    heads: int
    causal: bool = False
    qkv_std: float = 0.02
    out_std: float = 0.02
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
            std=self.qkv_std,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="qkv",
        )(x)  # [B, T, 3, H, K]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = constrain(q, ("act_batch", "act_seq", "act_heads", "act_kv"))
        k = constrain(k, ("act_batch", "act_seq", "act_heads", "act_kv"))
        v = constrain(v, ("act_batch", "act_seq", "act_heads", "act_kv"))
        out = jax.nn.dot_product_attention(
            q, k, v, is_causal=self.causal, implementation=self.attn_impl
        )  # [B, T, H, K]
        return DenseGeneral(
            (width,),
            kernel_axes=("heads", "kv", "embed"),
            bias_axes=("embed",),
            in_axes=2,
            std=self.out_std,
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
    attn_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
        width = x.shape[-1]
        # The initialisation of OpenAI's text transformer, used for both towers here.
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * self.layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        x = x + MultiHeadAttention(
            self.heads,
            causal=self.causal,
            qkv_std=attn_std,
            out_std=proj_std,
            attn_impl=self.attn_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attn",
        )(layer_norm("ln_1", self.dtype, self.param_dtype)(x))
        x = x + MLP(
            int(width * self.mlp_ratio),
            quick_gelu=self.quick_gelu,
            fc_std=fc_std,
            proj_std=proj_std,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="mlp",
        )(layer_norm("ln_2", self.dtype, self.param_dtype)(x))
        return constrain(x, ("act_batch", "act_seq", "act_embed"))


class Transformer(nn.Module):
    """A stack of `layers` residual attention blocks named `resblocks_{i}`."""

    layers: int
    heads: int
    mlp_ratio: float = 4.0
    causal: bool = False
    quick_gelu: bool = False
    remat_policy: str = "none"
    attn_impl: str | None = None
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
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=True)
        for i in range(self.layers):
            x = block(
                self.heads,
                mlp_ratio=self.mlp_ratio,
                causal=self.causal,
                quick_gelu=self.quick_gelu,
                layers=self.layers,
                attn_impl=self.attn_impl,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"resblocks_{i}",
            )(x)
        return x
