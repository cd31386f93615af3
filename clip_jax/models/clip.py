"""CLIP: an image tower and a text tower projected into one space, with a learned temperature."""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models import sizes
from clip_jax.models.layers import Dtype
from clip_jax.models.resnet import ModifiedResNet
from clip_jax.models.text import TextTransformer
from clip_jax.models.vit import VisionTransformer

INIT_LOGIT_SCALE = math.log(1 / 0.07)


def _dtype(name: Dtype) -> Dtype:
    return jnp.dtype(name) if isinstance(name, str) else name


def is_resnet(vision: Mapping[str, Any]) -> bool:
    """A vision config whose `layers` is a tuple of 4 stage depths is a ModifiedResNet."""
    return isinstance(vision["layers"], (tuple, list))


class CLIP(nn.Module):
    """The two towers and the temperature; config keys mirror these fields.

    `vision` holds either ViT fields (`image_size, patch_size, width, layers, heads`) or
    ResNet fields (`image_size, width, layers=(n1, n2, n3, n4), heads`), either optionally with
    `init_scheme` ("default" or "openai": see `VisionTransformer`, `ModifiedResNet`); `text` holds
    `context_length, vocab_size, width, layers, heads` and optionally `pool_type, eot_token_id`.
    The temperature is stored as `logit_scale = log(1/tau)`; `init_logit_bias` adds the learned
    bias of the sigmoid (SigLIP) loss.
    """

    embed_dim: int
    vision: Mapping[str, Any]
    text: Mapping[str, Any]
    quick_gelu: bool = False
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"
    remat_policy: str = "none"
    attn_impl: str | None = None
    init_logit_scale: float = INIT_LOGIT_SCALE
    init_logit_bias: float | None = None

    def setup(self):
        common = dict(dtype=_dtype(self.dtype), param_dtype=_dtype(self.param_dtype))
        vision = dict(self.vision)
        if is_resnet(vision):
            vision["layers"] = tuple(vision["layers"])
            self.visual = ModifiedResNet(
                output_dim=self.embed_dim, remat_policy=self.remat_policy, **vision, **common
            )
        else:
            self.visual = VisionTransformer(
                output_dim=self.embed_dim,
                quick_gelu=self.quick_gelu,
                remat_policy=self.remat_policy,
                attn_impl=self.attn_impl,
                **vision,
                **common,
            )
        self.text_tower = TextTransformer(
            output_dim=self.embed_dim,
            quick_gelu=self.quick_gelu,
            remat_policy=self.remat_policy,
            attn_impl=self.attn_impl,
            **dict(self.text),
            **common,
        )
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(self.init_logit_scale), ()),
            (),
            jnp.float32,
        )
        if self.init_logit_bias is not None:
            self.logit_bias = self.param(
                "logit_bias",
                nn.with_logical_partitioning(nn.initializers.constant(self.init_logit_bias), ()),
                (),
                jnp.float32,
            )

    def encode_image(
        self, images: jax.Array, train: bool = False, project: bool = True
    ) -> jax.Array:
        """Images [B, H, W, 3], normalised -> projected embeddings [B, E], float32, unnormalised.

        `project=False` gives the image tower's features before the projection into the joint
        space instead, [B, width] (the ViT's class token after ln_post; the ResNet's attention
        pool before its output projection): what linear probes read with `features=pre`.
        """
        return self.visual(images, train=train, project=project).astype(jnp.float32)

    def encode_text(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        """Tokens int32 [B, L] -> projected embeddings [B, E] float32, not normalised."""
        return self.text_tower(tokens, train=train).astype(jnp.float32)

    def __call__(
        self, images: jax.Array, tokens: jax.Array, train: bool = False
    ) -> dict[str, jax.Array]:
        """Returns L2-normalised `image` and `text` embeddings [B, E], `logit_scale` = exp of the
        stored log(1/tau), and `logit_bias` when the model has one."""
        out = {
            "image": l2_normalize(self.encode_image(images, train)),
            "text": l2_normalize(self.encode_text(tokens, train)),
            "logit_scale": jnp.exp(self.logit_scale),
        }
        if self.init_logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def create_model(name: str, **overrides: Any) -> CLIP:
    """A `CLIP` of a named size (`sizes.MODELS`): `create_model("ViT-B-16", dtype="bfloat16")`."""
    return CLIP(**model_config(name, **overrides))


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Every keyword argument of `CLIP` for a named size (`sizes.model_config`), its towers'
    included: what a config's `model` holds."""
    return complete_config(sizes.model_config(name, **overrides))


# What CLIP hands each tower itself, from its own fields.
_PASSED_TO_TOWERS = (
    "output_dim",
    "quick_gelu",
    "remat_policy",
    "attn_impl",
    "dtype",
    "param_dtype",
)


def complete_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """CLIP's keyword arguments with every field that `cfg` leaves out, its towers' included, set
    to the modules' own defaults: the modules are the one place those are stated, and a config,
    a saved run or an exported file then names every choice its model makes."""
    vision = dict(cfg["vision"])
    tower = ModifiedResNet if is_resnet(vision) else VisionTransformer
    return {
        **_field_defaults(CLIP, ("vision", "text")),
        **cfg,
        "vision": {**_field_defaults(tower, _PASSED_TO_TOWERS), **vision},
        "text": {**_field_defaults(TextTransformer, _PASSED_TO_TOWERS), **dict(cfg["text"])},
    }


def _field_defaults(module: type, skip: tuple[str, ...]) -> dict[str, Any]:
    fields = dataclasses.fields(module)
    return {
        f.name: f.default
        for f in fields
        if f.default is not dataclasses.MISSING and f.name not in ("parent", "name", *skip)
    }
