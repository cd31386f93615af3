"""CLIP: an image tower and a text tower projected into one space, with a learned temperature."""

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.infra.errors import UsageError
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

    `patch_dropout` drops that fraction of a ViT's patch tokens per image in training (FLIP; see
    `VisionTransformer`); a ResNet has no patch tokens and refuses it. `scan_layers` runs each
    transformer stack as one `nn.scan` (`layers.Transformer`): the ViT's and the text tower's;
    a ResNet's stages differ in shape and are not scanned, its text tower is.
    """

    embed_dim: int
    vision: Mapping[str, Any]
    text: Mapping[str, Any]
    quick_gelu: bool = False
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"
    remat_policy: str = "none"
    attn_impl: str | None = None
    patch_dropout: float = 0.0
    scan_layers: bool = False
    init_logit_scale: float = INIT_LOGIT_SCALE
    init_logit_bias: float | None = None

    def setup(self):
        common = dict(dtype=_dtype(self.dtype), param_dtype=_dtype(self.param_dtype))
        vision = dict(self.vision)
        if is_resnet(vision):
            if self.patch_dropout:
                raise UsageError(
                    f"patch_dropout={self.patch_dropout!r} needs a ViT image tower: a ResNet has "
                    "no patch tokens to drop; use 0"
                )
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
                patch_dropout=self.patch_dropout,
                scan_layers=self.scan_layers,
                **vision,
                **common,
            )
        self.text_tower = TextTransformer(
            output_dim=self.embed_dim,
            quick_gelu=self.quick_gelu,
            remat_policy=self.remat_policy,
            attn_impl=self.attn_impl,
            scan_layers=self.scan_layers,
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
        self,
        images: jax.Array,
        train: bool = False,
        project: bool = True,
        grid: jax.Array | None = None,
    ) -> jax.Array:
        """Images [B, H, W, 3], normalised -> projected embeddings [B, E], float32, unnormalised.

        `project=False` gives the image tower's features before the projection into the joint
        space instead, [B, width] (the ViT's class token after ln_post; the ResNet's attention
        pool before its output projection): what linear probes read with `features=pre`.

        With `grid` [B, 2], `images` are NaFlex patches [B, N, p*p*3] of each image at its own
        aspect ratio (SigLIP 2's; `clip_jax.data.naflex`), padded to N: a MAP-pooled tower only.
        """
        if grid is not None:
            return self.visual(images, train=train, grid=grid).astype(jnp.float32)
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
    """Every keyword argument of `CLIP` for a named size (`sizes.size_config`), its towers'
    included: what a config's `model` holds."""
    return complete_config(sizes.size_config(name, **overrides))


# What CLIP hands each tower itself, from its own fields.
_PASSED_TO_TOWERS = (
    "output_dim",
    "quick_gelu",
    "remat_policy",
    "attn_impl",
    "patch_dropout",
    "scan_layers",
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


# The blocks of an unscanned transformer stack; a scanned stack is one subtree, "resblocks".
_BLOCK = re.compile(r"resblocks_(\d+)$")
_STACK = "resblocks"


def stack_layers(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Variables laid out for `scan_layers=False` -> for `scan_layers=True`: each group of
    `resblocks_{i}` subtrees becomes one `resblocks` subtree whose leaves hold the layers' leaves
    stacked on a leading axis, [layers, ...]. Numpy leaves stay numpy; a tree that has no
    unscanned stack (a scanned one) is returned as it is.
    """
    if not isinstance(tree, Mapping):
        return tree
    blocks = sorted((int(m.group(1)), k) for k in tree if (m := _BLOCK.match(k)))
    out = {k: stack_layers(v) for k, v in tree.items() if not _BLOCK.match(k)}
    if blocks:
        if [i for i, _ in blocks] != list(range(len(blocks))):
            raise ValueError(f"resblocks are not numbered 0 to {len(blocks) - 1}: {blocks}")
        out[_STACK] = jax.tree.map(_stack, *(tree[k] for _, k in blocks))
    return out


def unstack_layers(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `stack_layers`: each `resblocks` subtree of stacked leaves [layers, ...]
    becomes `resblocks_{i}` subtrees, one per layer; an unscanned tree is returned as it is."""
    if not isinstance(tree, Mapping):
        return tree
    out = {k: unstack_layers(v) for k, v in tree.items() if k != _STACK}
    if _STACK in tree:
        layers = jax.tree.leaves(tree[_STACK])[0].shape[0]
        for i in range(layers):
            out[f"resblocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], tree[_STACK])
    return out


def layers_layout(tree: Mapping[str, Any], scan_layers: bool) -> dict[str, Any]:
    """Variables of either layout in the one `CLIP(scan_layers=scan_layers)` takes."""
    return stack_layers(tree) if scan_layers else unstack_layers(tree)


def _stack(*leaves: Any) -> Any:
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)
