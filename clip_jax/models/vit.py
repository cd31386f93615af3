"""The CLIP Vision Transformer (Radford et al. 2021, section 2.4)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import Dtype, Transformer, constrain, layer_norm, partitioned


class VisionTransformer(nn.Module):
    """ViT with a bias-free patch conv, class token, ln_pre, ln_post on the class token, projection.

    Input images are NHWC float, already normalised; the output is [B, output_dim].
    """

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    output_dim: int
    mlp_ratio: float = 4.0
    quick_gelu: bool = False
    remat_policy: str = "none"
    attn_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, project: bool = True) -> jax.Array:
        """Images [B, H, W, 3] -> [B, output_dim]; with `project=False` the class token's features
        before the projection, [B, width] (what the CLIP paper's linear probes of ViTs read)."""
        del train  # no dropout or batch statistics in the ViT
        if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
            raise ValueError(
                f"images are {images.shape[1]}x{images.shape[2]}, this model takes "
                f"{self.image_size}x{self.image_size}"
            )
        scale = self.width**-0.5
        x = nn.Conv(
            self.width,
            (self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(
                nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")
            ),
            name="conv1",
        )(images.astype(self.dtype))  # [B, g, g, D]
        b = x.shape[0]
        x = x.reshape(b, -1, self.width)  # [B, g*g, D]
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
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)  # [B, T, D]
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        x = layer_norm("ln_pre", self.dtype, self.param_dtype)(x)
        x = Transformer(
            self.layers,
            self.heads,
            mlp_ratio=self.mlp_ratio,
            quick_gelu=self.quick_gelu,
            remat_policy=self.remat_policy,
            attn_impl=self.attn_impl,
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
        return x @ proj.astype(self.dtype)  # [B, E]
