"""The CLIP Vision Transformer (Radford et al. 2021, section 2.4), with FLIP's patch dropout
(Li et al. 2023) for training."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.infra.errors import UsageError
from clip_jax.models.layers import (
    Dtype,
    Transformer,
    check_init_scheme,
    constrain,
    layer_norm,
    partitioned,
    symmetric_uniform,
)
from clip_jax.parallel.fsdp import fsdp_add, fsdp_dot, kernel_layout


class VisionTransformer(nn.Module):
    """ViT with a bias-free patch conv, class token, ln_pre, ln_post on the class token, projection.

    Input images are NHWC float, already normalised; the output is [B, output_dim].

    `init_scheme` chooses how the weights start. In both, the class token, the positions and the
    projection are normal of std width^-0.5 and the LayerNorms ones and zeros, as in OpenAI's code.
    "default" draws the patch conv LeCun-normal and gives the blocks the scaled normal
    initialisation that OpenAI used for their text transformer only. "openai" is what OpenAI's
    vision transformer gets, whose blocks `initialize_parameters` leaves alone: PyTorch's defaults,
    U(+-1/sqrt(fan_in)) for the patch conv (nn.Conv2d) and the MLP's weights and biases
    (nn.Linear), nn.MultiheadAttention's Xavier-uniform qkv with zero biases and an nn.Linear
    output projection with its bias zeroed.

    `patch_dropout` is FLIP's masking (Li et al. 2023, "Scaling Language-Image Pre-training via
    Masking"): in training, each image keeps the class token and a random subset of its patch
    tokens (`patches_kept`), drawn after the positional embedding is added, as open_clip's
    PatchDropout does; the tower then runs on the shorter sequence, which is what makes a step
    cheaper. Evaluation (`train=False`) sees every patch.
    """

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    output_dim: int
    mlp_ratio: float = 4.0
    quick_gelu: bool = False
    init_scheme: str = "default"  # one of layers.INIT_SCHEMES; see the class docstring
    remat_policy: str = "none"
    attn_impl: str | None = None
    patch_dropout: float = 0.0  # fraction of patch tokens dropped per image in training
    scan_layers: bool = False  # see layers.Transformer
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, project: bool = True) -> jax.Array:
        """Images [B, H, W, 3] -> [B, output_dim]; with `project=False` the class token's features
        before the projection, [B, width] (what the CLIP paper's linear probes of ViTs read).

        With `train` and `patch_dropout > 0`, patches are dropped (the class docstring), drawn
        from the "dropout" random stream (`rngs={"dropout": key}`)."""
        if not 0 <= self.patch_dropout < 1:
            raise UsageError(f"patch_dropout={self.patch_dropout!r}: use a number in [0, 1)")
        if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
            raise ValueError(
                f"images are {images.shape[1]}x{images.shape[2]}, this model takes "
                f"{self.image_size}x{self.image_size}"
            )
        check_init_scheme(self.init_scheme)
        if self.init_scheme == "openai":  # nn.Conv2d's kaiming_uniform(a=sqrt(5))
            conv_init = symmetric_uniform((self.patch_size**2 * images.shape[-1]) ** -0.5)
        else:
            conv_init = nn.initializers.lecun_normal()
        scale = self.width**-0.5
        x = PatchEmbedding(
            self.patch_size,
            self.width,
            kernel_init=conv_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv1",
        )(images)  # [B, g*g, D]
        b = x.shape[0]
        cls = self.param(
            "class_embedding",
            partitioned(nn.initializers.normal(scale), ("embed",)),
            (self.width,),
            self.param_dtype,
        )
        grid = self.image_size // self.patch_size
        pos = self.param(
            "positional_embedding",
            partitioned(nn.initializers.normal(scale), ("pos", "embed")),
            (grid * grid + 1, self.width),
            self.param_dtype,
        )
        dtype = jnp.dtype(self.dtype)
        # Under FSDP each embedding is all-gathered in `dtype` and its gradient reduced in float32
        # (fsdp.fsdp_add), as the blocks' kernels are.
        cls = fsdp_add(jnp.zeros((b, 1, self.width), dtype), cls, dtype, _layout(cls, ("embed",)))
        x = jnp.concatenate([cls, x], axis=1)
        x = fsdp_add(x, pos, dtype, _layout(pos, ("pos", "embed")))  # [B, T, D]
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        if train and self.patch_dropout > 0:
            x = drop_patches(x, self.patch_dropout, self.make_rng("dropout"))  # [B, 1 + kept, D]
            x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        x = layer_norm("ln_pre", self.dtype, self.param_dtype)(x)
        x = Transformer(
            self.layers,
            self.heads,
            mlp_ratio=self.mlp_ratio,
            quick_gelu=self.quick_gelu,
            remat_policy=self.remat_policy,
            block_init="pytorch_default" if self.init_scheme == "openai" else "scaled_normal",
            attn_impl=self.attn_impl,
            scan_layers=self.scan_layers,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="transformer",
        )(x)
        x = layer_norm("ln_post", self.dtype, self.param_dtype)(x[:, 0])  # [B, D]
        if not project:
            return x
        proj = self.param(
            "proj",
            partitioned(nn.initializers.normal(scale), ("embed", "joint")),
            (self.width, self.output_dim),
            self.param_dtype,
        )
        layout = kernel_layout(("embed", "joint"), proj.shape)
        return fsdp_dot(x, proj, 1, jnp.dtype(self.dtype), layout)  # [B, E]


def _layout(param: jax.Array, names: tuple[str | None, ...]):
    return kernel_layout(names, param.shape)


class PatchEmbedding(nn.Module):
    """The patch convolution (kernel `patch_size`, stride `patch_size`, no bias) as what it is, a
    matrix product of each patch's pixels with a [p, p, 3, D] kernel (the layout of nn.Conv's,
    which this replaces bit for bit in its parameters): one dense product, all-gathered and
    reduced like the blocks' kernels (`fsdp.fsdp_dot`), instead of a strided convolution.

    Images [B, H, W, C] -> patch tokens [B, (H/p)*(W/p), D], row by row."""

    patch_size: int
    width: int
    kernel_init: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        p = self.patch_size
        names = (None, None, "conv_in", "embed")
        kernel = self.param(
            "kernel", partitioned(self.kernel_init, names), (p, p, c, self.width), self.param_dtype
        )
        patches = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
        patches = patches.transpose(0, 1, 3, 2, 4, 5)  # [B, h/p, w/p, p, p, C]
        x = fsdp_dot(patches, kernel, 3, jnp.dtype(self.dtype), kernel_layout(names, kernel.shape))
        return x.reshape(b, -1, self.width)


def patches_kept(patches: int, patch_dropout: float) -> int:
    """How many of an image's `patches` tokens patch dropout keeps: open_clip's rule,
    max(1, int(patches * (1 - patch_dropout))), truncated (196 patches at 0.5: 98)."""
    return max(1, int(patches * (1 - patch_dropout)))


def drop_patches(x: jax.Array, patch_dropout: float, rng: jax.Array) -> jax.Array:
    """The class token and a uniformly random subset of each row's patch tokens.

    Each row draws its own subset, `patches_kept` of them, distinct, in random order: the
    patches of the lowest independent uniform scores, gathered row by row. A sort along each row
    stays on the devices that hold the row when the batch is sharded (`lax.top_k` would not:
    XLA gathers the whole batch's scores for its CPU kernel).

    Args:
      x: tokens [B, 1 + n, D], the class token first, positions already added.
      patch_dropout: the fraction of the n patch tokens to drop, in [0, 1).
      rng: a key.
    Returns:
      [B, 1 + patches_kept(n, patch_dropout), D].
    """
    b, n = x.shape[0], x.shape[1] - 1
    scores = jax.random.uniform(rng, (b, n))  # [B, n]
    scores = constrain(scores, ("act_batch", "act_seq"))
    keep = jnp.argsort(scores, axis=-1)[:, : patches_kept(n, patch_dropout)]  # [B, kept]
    patches = jnp.take_along_axis(x[:, 1:], keep[:, :, None], axis=1)  # [B, kept, D]
    return jnp.concatenate([x[:, :1], patches], axis=1)
