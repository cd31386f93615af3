"""The CLIP Vision Transformer (Radford et al. 2021, section 2.4), with FLIP's patch dropout
(Li et al. 2023) for training, and SigLIP's form of it (Zhai et al. 2023): no class token, the
tokens pooled by a multihead attention-pooling head (MAP)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.infra.errors import UsageError
from clip_jax.models.layers import (
    LN_EPS,
    MLP,
    DenseGeneral,
    DenseInit,
    Dtype,
    Transformer,
    check_init_scheme,
    constrain,
    layer_norm,
    partitioned,
    symmetric_uniform,
)
from clip_jax.parallel.fsdp import fsdp_add, fsdp_dot, kernel_layout

# How the tokens become one vector: "token", CLIP's class token (ln_pre before the blocks, ln_post
# on the class token, a projection); "map", SigLIP's (timm's `global_pool="map"`): no class token
# and no ln_pre, ln_post on every token, then `MAPHead`, whose output is the embedding.
POOL_TYPES = ("token", "map")


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

    `pool_type="map"` gives SigLIP's image tower (timm's `vit_*_siglip_*`): see `POOL_TYPES`.
    Its patch convolution has a bias (`patch_bias`), its LayerNorms eps 1e-6 (`ln_eps`) and some
    sizes GELU's tanh approximation (`gelu_tanh`); the embedding is the MAP head's output, of the
    tower's width, with no projection after it (`output_dim` must equal `width`).
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
    pool_type: str = "token"  # one of POOL_TYPES
    patch_bias: bool = False  # a bias in the patch convolution (SigLIP's towers have one)
    ln_eps: float = LN_EPS
    gelu_tanh: bool = False  # GELU's tanh approximation instead of exact GELU
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        train: bool = False,
        project: bool = True,
        grid: jax.Array | None = None,
    ) -> jax.Array:
        """Images [B, H, W, 3] -> [B, output_dim]; with `project=False` the features before the
        projection, [B, width]: the class token's (what the CLIP paper's linear probes of ViTs
        read), or for `pool_type="map"` the MAP head's, which have no projection after them.

        With `train` and `patch_dropout > 0`, patches are dropped (the class docstring), drawn
        from the "dropout" random stream (`rngs={"dropout": key}`).

        NaFlex (SigLIP 2, `pool_type="map"`): with `grid` [B, 2] (each image's patch rows and
        columns), `images` are patches [B, N, p*p*3] in row-major order (`naflex.patchify`),
        each image's first rows*columns real and the rest padding. The learned position grid is
        resampled to each image's grid (`naflex_positions`), padding is masked in every
        attention and in the MAP head, and the embedding does not depend on it."""
        if grid is not None:
            return self._naflex(images, grid)
        if not 0 <= self.patch_dropout < 1:
            raise UsageError(f"patch_dropout={self.patch_dropout!r}: use a number in [0, 1)")
        if self.pool_type not in POOL_TYPES:
            raise UsageError(f"unknown pool_type {self.pool_type!r}; choose one of {POOL_TYPES}")
        if self.pool_type == "map" and self.output_dim != self.width:
            raise UsageError(
                f"a MAP-pooled image tower has no projection: its embedding is its width "
                f"{self.width}, not {self.output_dim} (set embed_dim={self.width})"
            )
        if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
            raise ValueError(
                f"images are {images.shape[1]}x{images.shape[2]}, this model takes "
                f"{self.image_size}x{self.image_size}"
            )
        scale = self.width**-0.5
        x = self._patch_embedding(images.shape[-1])(images)  # [B, g*g, D]
        b = x.shape[0]
        dtype = jnp.dtype(self.dtype)
        token = self.pool_type == "token"  # a class token first
        if token:
            cls = self.param(
                "class_embedding",
                partitioned(nn.initializers.normal(scale), ("embed",)),
                (self.width,),
                self.param_dtype,
            )
            # Under FSDP each embedding is all-gathered in `dtype` and its gradient reduced in
            # float32 (fsdp.fsdp_add), as the blocks' kernels are.
            zeros = jnp.zeros((b, 1, self.width), dtype)
            x = jnp.concatenate([fsdp_add(zeros, cls, dtype, _layout(cls, ("embed",))), x], 1)
        side = self.image_size // self.patch_size
        pos = self.param(
            "positional_embedding",
            partitioned(nn.initializers.normal(scale), ("pos", "embed")),
            (side * side + token, self.width),
            self.param_dtype,
        )
        x = fsdp_add(x, pos, dtype, _layout(pos, ("pos", "embed")))  # [B, T, D]
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        if train and self.patch_dropout > 0:
            rng = self.make_rng("dropout")
            x = drop_patches(x, self.patch_dropout, rng, prefix=int(token))  # [B, kept (+1), D]
            x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        if token:
            x = layer_norm("ln_pre", self.dtype, self.param_dtype, self.ln_eps)(x)
        x = self._transformer()(x)
        ln_post = layer_norm("ln_post", self.dtype, self.param_dtype, self.ln_eps)
        if not token:
            return self._map_head()(ln_post(x))  # [B, D]
        x = ln_post(x[:, 0])  # [B, D]
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

    def _naflex(self, patches: jax.Array, grid: jax.Array) -> jax.Array:
        """NaFlex patches [B, N, p*p*3] and their grids [B, 2] -> [B, D] (see `__call__`)."""
        if self.pool_type != "map":
            raise UsageError("NaFlex inputs need a MAP-pooled image tower (SigLIP 2's)")
        _, n, flat = patches.shape
        if flat != self.patch_size**2 * 3:
            raise ValueError(f"patches of {flat} values; this tower's are {self.patch_size}^2 x 3")
        x = self._patch_embedding(3)(patches)  # [B, N, D]
        side = self.image_size // self.patch_size
        pos = self.param(
            "positional_embedding",
            partitioned(nn.initializers.normal(self.width**-0.5), ("pos", "embed")),
            (side * side, self.width),
            self.param_dtype,
        )
        x = x + naflex_positions(pos, grid, n).astype(self.dtype)
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        lengths = (grid[:, 0] * grid[:, 1]).astype(jnp.int32)  # real patches first, then padding
        x = self._transformer()(x, lengths)
        x = layer_norm("ln_post", self.dtype, self.param_dtype, self.ln_eps)(x)
        return self._map_head()(x, jnp.arange(n)[None, :] < lengths[:, None])

    # The parts both inputs (images, NaFlex patches) go through, created by the compact
    # __call__ under the same names.
    def _patch_embedding(self, channels: int) -> "PatchEmbedding":
        check_init_scheme(self.init_scheme)
        if self.init_scheme == "openai":  # nn.Conv2d's kaiming_uniform(a=sqrt(5))
            conv_init = symmetric_uniform((self.patch_size**2 * channels) ** -0.5)
        else:
            conv_init = nn.initializers.lecun_normal()
        return PatchEmbedding(
            self.patch_size,
            self.width,
            kernel_init=conv_init,
            use_bias=self.patch_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv1",
        )

    def _transformer(self) -> Transformer:
        return Transformer(
            self.layers,
            self.heads,
            mlp_ratio=self.mlp_ratio,
            quick_gelu=self.quick_gelu,
            gelu_tanh=self.gelu_tanh,
            ln_eps=self.ln_eps,
            remat_policy=self.remat_policy,
            block_init="pytorch_default" if self.init_scheme == "openai" else "scaled_normal",
            attn_impl=self.attn_impl,
            scan_layers=self.scan_layers,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="transformer",
        )

    def _map_head(self) -> "MAPHead":
        return MAPHead(
            self.heads,
            mlp_ratio=self.mlp_ratio,
            quick_gelu=self.quick_gelu,
            gelu_tanh=self.gelu_tanh,
            ln_eps=self.ln_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="map_head",
        )


def naflex_positions(pos: jax.Array, grid: jax.Array, tokens: int) -> jax.Array:
    """The learned position grid resampled to each image's patch grid, as SigLIP 2's NaFlex does
    (bilinear, half-pixel centres, antialiased where it shrinks: `jax.image.scale_and_translate`,
    PyTorch's `interpolate(..., "bilinear", antialias=True)`).

    Args:
      pos: [g*g, D], the square grid of the fixed-resolution tower, row by row.
      grid: int [B, 2], each image's patch rows and columns.
      tokens: N, the padded sequence length.
    Returns:
      [B, N, D]: token n of image b (row n // columns, column n % columns) gets its position;
      tokens past rows * columns get values that are never used.
    """
    side = round(pos.shape[0] ** 0.5)
    if side * side != pos.shape[0]:
        raise ValueError(f"a NaFlex position grid must be square, not {pos.shape[0]} positions")

    def matrix(size: jax.Array) -> jax.Array:  # [tokens, side]: resampling `side` onto `size`
        eye = jnp.eye(side, dtype=jnp.float32)
        scale = (size.astype(jnp.float32) / side)[None]
        return jax.image.scale_and_translate(
            eye, (tokens, side), (0,), scale, jnp.zeros((1,)), method="linear", antialias=True
        )

    def one(hw: jax.Array) -> jax.Array:
        n = jnp.arange(tokens)
        rows, cols = matrix(hw[0]), matrix(hw[1])
        r, c = n // jnp.maximum(hw[1], 1), n % jnp.maximum(hw[1], 1)
        weights = rows[r][:, :, None] * cols[c][:, None, :]  # [N, side, side]
        return weights.reshape(tokens, side * side)

    weights = jax.vmap(one)(grid)  # [B, N, g*g]
    return jnp.einsum(
        "bnk,kd->bnd", weights, pos.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )


def xavier_init(fan_in: int, fan_out: int) -> DenseInit:
    """Xavier-uniform weights (over the layer's whole fan-in and fan-out), zero biases: how
    big_vision initialises its MAP head."""
    return DenseInit(symmetric_uniform((6 / (fan_in + fan_out)) ** 0.5), nn.initializers.zeros)


class MAPHead(nn.Module):
    """Multihead attention pooling (Lee et al. 2019; big_vision's `MAPHead`, timm's
    `AttentionPoolLatent`): one learned query `latent` attends over the tokens, then a residual
    MLP on the LayerNormed result: `y = out(attn(q(latent), kv(x)))`, `y + mlp(ln(y))`.

    Parameters are named for the conversion to timm's `attn_pool`: `latent` [1, D], `q`
    [D, heads, head_dim], `kv` [D, 2, heads, head_dim] (keys then values, timm's fused order),
    `out` [heads, head_dim, D], `ln`, `mlp` (`c_fc`, `c_proj`).
    """

    heads: int
    mlp_ratio: float = 4.0
    quick_gelu: bool = False
    gelu_tanh: bool = False
    ln_eps: float = LN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Tokens [B, T, D] (and `mask` [B, T], True where a token is real: padding is never
        attended) -> [B, D]."""
        b, _, width = x.shape
        if width % self.heads:
            raise UsageError(f"width {width} is not divisible by heads {self.heads}")
        head_dim = width // self.heads
        latent = self.param(
            "latent",
            partitioned(nn.initializers.normal(width**-0.5), (None, "embed")),
            (1, width),
            self.param_dtype,
        )
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        query = jnp.broadcast_to(latent.astype(self.dtype), (b, 1, width))
        q = DenseGeneral(
            (self.heads, head_dim),
            kernel_axes=("embed", "heads", "kv"),
            bias_axes=("heads", "kv"),
            init=xavier_init(width, width),
            name="q",
            **common,
        )(query)  # [B, 1, H, K]
        kv = DenseGeneral(
            (2, self.heads, head_dim),
            kernel_axes=("embed", None, "heads", "kv"),
            bias_axes=(None, "heads", "kv"),
            init=xavier_init(width, 2 * width),
            name="kv",
            **common,
        )(x)  # [B, T, 2, H, K]
        k = constrain(kv[:, :, 0], ("act_batch", "act_seq", "act_heads", "act_kv"))
        v = constrain(kv[:, :, 1], ("act_batch", "act_seq", "act_heads", "act_kv"))
        attn_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, T]
        y = jax.nn.dot_product_attention(q, k, v, mask=attn_mask)  # [B, 1, H, K]
        y = DenseGeneral(
            (width,),
            kernel_axes=("heads", "kv", "embed"),
            bias_axes=("embed",),
            init=xavier_init(width, width),
            in_axes=2,
            name="out",
            **common,
        )(y)  # [B, 1, D]
        mlp_dim = int(width * self.mlp_ratio)
        y = y + MLP(
            mlp_dim,
            fc_init=xavier_init(width, mlp_dim),
            proj_init=xavier_init(mlp_dim, width),
            quick_gelu=self.quick_gelu,
            gelu_tanh=self.gelu_tanh,
            name="mlp",
            **common,
        )(layer_norm("ln", self.dtype, self.param_dtype, self.ln_eps)(y))
        return y[:, 0]


def _layout(param: jax.Array, names: tuple[str | None, ...]):
    return kernel_layout(names, param.shape)


class PatchEmbedding(nn.Module):
    """The patch convolution (kernel `patch_size`, stride `patch_size`, no bias) as what it is, a
    matrix product of each patch's pixels with a [p, p, 3, D] kernel (the layout of nn.Conv's,
    which this replaces bit for bit in its parameters): one dense product, all-gathered and
    reduced like the blocks' kernels (`fsdp.fsdp_dot`), instead of a strided convolution.

    Images [B, H, W, C] -> patch tokens [B, (H/p)*(W/p), D], row by row; NaFlex's patches
    [B, N, p*p*C] (each patch's pixels by row, column, channel) -> [B, N, D]."""

    patch_size: int
    width: int
    kernel_init: Any
    use_bias: bool = False  # a [D] bias after the product (timm's patch_embed.proj has one)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        if images.ndim == 3:  # NaFlex: patches [B, N, p*p*C] already cut, (row, column, channel)
            b, n, flat = images.shape
            images = images.reshape(b, n, 1, p, p, flat // (p * p))  # as [B, N, 1, p, p, C]
        b, h, w, c = images.shape[0], images.shape[1], images.shape[2], images.shape[-1]
        names = (None, None, "conv_in", "embed")
        kernel = self.param(
            "kernel", partitioned(self.kernel_init, names), (p, p, c, self.width), self.param_dtype
        )
        if images.ndim == 6:
            x = fsdp_dot(
                images.astype(self.dtype),
                kernel,
                3,
                jnp.dtype(self.dtype),
                kernel_layout(names, kernel.shape),
            )  # [B, N, 1, D]
            return self._bias(x.reshape(b, -1, self.width))
        # Pixels past the last whole patch are dropped, as a stride-p convolution drops them
        # (timm's `vit_so400m_patch14_siglip_384`: 27 patches of 14 over 384 pixels).
        h, w = h // p * p, w // p * p
        images = images[:, :h, :w]
        patches = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
        patches = patches.transpose(0, 1, 3, 2, 4, 5)  # [B, h/p, w/p, p, p, C]
        x = fsdp_dot(patches, kernel, 3, jnp.dtype(self.dtype), kernel_layout(names, kernel.shape))
        return self._bias(x.reshape(b, -1, self.width))

    def _bias(self, x: jax.Array) -> jax.Array:
        if not self.use_bias:
            return x
        bias = self.param(
            "bias", partitioned(nn.initializers.zeros, ("embed",)), (self.width,), self.param_dtype
        )
        return x + bias.astype(self.dtype)


def patches_kept(patches: int, patch_dropout: float) -> int:
    """How many of an image's `patches` tokens patch dropout keeps: open_clip's rule,
    max(1, int(patches * (1 - patch_dropout))), truncated (196 patches at 0.5: 98)."""
    return max(1, int(patches * (1 - patch_dropout)))


def drop_patches(x: jax.Array, patch_dropout: float, rng: jax.Array, prefix: int = 1) -> jax.Array:
    """The class token (the first `prefix` tokens) and a uniformly random subset of each row's
    patch tokens.

    Each row draws its own subset, `patches_kept` of them, distinct, in random order: the
    patches of the lowest independent uniform scores, gathered row by row. A sort along each row
    stays on the devices that hold the row when the batch is sharded (`lax.top_k` would not:
    XLA gathers the whole batch's scores for its CPU kernel).

    Args:
      x: tokens [B, prefix + n, D], the class token first, positions already added.
      patch_dropout: the fraction of the n patch tokens to drop, in [0, 1).
      rng: a key.
      prefix: the tokens before the patches, always kept: 1 (a class token) or 0.
    Returns:
      [B, prefix + patches_kept(n, patch_dropout), D].
    """
    b, n = x.shape[0], x.shape[1] - prefix
    scores = jax.random.uniform(rng, (b, n))  # [B, n]
    scores = constrain(scores, ("act_batch", "act_seq"))
    keep = jnp.argsort(scores, axis=-1)[:, : patches_kept(n, patch_dropout)]  # [B, kept]
    patches = jnp.take_along_axis(x[:, prefix:], keep[:, :, None], axis=1)  # [B, kept, D]
    return jnp.concatenate([x[:, :prefix], patches], axis=1)
