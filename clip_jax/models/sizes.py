"""Model sizes as data: the published CLIP architectures, keyed by open_clip's names.

`size_config("ViT-B-32")` returns the fields a size sets (`models.model_config` fills in the rest
of `CLIP`'s keyword arguments); a `-quickgelu` suffix selects QuickGELU as OpenAI trained with
(and as open_clip's `*-quickgelu` names do).
"""

import copy
import math
from typing import Any

from clip_jax.infra.errors import UsageError

_OPENAI_TEXT = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)


def _text(**overrides: Any) -> dict[str, Any]:
    return {**_OPENAI_TEXT, **overrides}


# A ResNet's attention pool has 64-wide heads over its width * 32 features (heads = width // 2),
# as in OpenAI's models; head counts are not stored in checkpoints, so they are fixed here.
MODELS: dict[str, dict[str, Any]] = {
    "RN50": dict(
        embed_dim=1024,
        vision=dict(image_size=224, layers=(3, 4, 6, 3), width=64, heads=32),
        text=_text(),
    ),
    "RN101": dict(
        embed_dim=512,
        vision=dict(image_size=224, layers=(3, 4, 23, 3), width=64, heads=32),
        text=_text(),
    ),
    "RN50x4": dict(
        embed_dim=640,
        vision=dict(image_size=288, layers=(4, 6, 10, 6), width=80, heads=40),
        text=_text(width=640, heads=10),
    ),
    "RN50x16": dict(
        embed_dim=768,
        vision=dict(image_size=384, layers=(6, 8, 18, 8), width=96, heads=48),
        text=_text(width=768, heads=12),
    ),
    "RN50x64": dict(
        embed_dim=1024,
        vision=dict(image_size=448, layers=(3, 15, 36, 10), width=128, heads=64),
        text=_text(width=1024, heads=16),
    ),
    "ViT-B-32": dict(
        embed_dim=512,
        vision=dict(image_size=224, patch_size=32, width=768, layers=12, heads=12),
        text=_text(),
    ),
    "ViT-B-16": dict(
        embed_dim=512,
        vision=dict(image_size=224, patch_size=16, width=768, layers=12, heads=12),
        text=_text(),
    ),
    "ViT-L-14": dict(
        embed_dim=768,
        vision=dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16),
        text=_text(width=768, heads=12),
    ),
    "ViT-L-14-336": dict(
        embed_dim=768,
        vision=dict(image_size=336, patch_size=14, width=1024, layers=24, heads=16),
        text=_text(width=768, heads=12),
    ),
    # Seconds on a CPU: for tests and smoke runs. Full BPE vocabulary, so real tokens work.
    "tiny": dict(
        embed_dim=32,
        vision=dict(image_size=32, patch_size=8, width=32, layers=2, heads=2),
        text=_text(context_length=16, width=32, heads=2, layers=2),
    ),
    "tiny-rn": dict(
        embed_dim=32,
        vision=dict(image_size=32, layers=(1, 1, 1, 1), width=8, heads=2),
        text=_text(context_length=16, width=32, heads=2, layers=2),
    ),
}


# SigLIP (Zhai et al. 2023) and SigLIP 2 (Tschannen et al. 2025), as open_clip's model configs
# name them: timm's `vit_*_siglip_*` image towers (no class token, MAP head, LayerNorm eps 1e-6, a
# patch bias, no projection: the embedding is the image tower's width) and open_clip's SigLIP text
# tower (bidirectional, pooled at the last position, a projection with a bias). The logit scale
# and bias start where SigLIP's do: t' = log 10, b = -10.
_SIGLIP_VIT = dict(pool_type="map", patch_bias=True, ln_eps=1e-6)
_SIGLIP_TEXT = dict(context_length=64, causal=False, pool_type="last", proj_bias=True, ln_eps=1e-6)
_SO400M_MLP = 3.7362  # 1152 * 3.7362 -> 4304 hidden units, as timm and open_clip compute it
# The image towers by timm's name: patch, width, depth, heads, mlp_ratio, tanh GELU.
_SIGLIP_TOWERS = {
    "B-16": dict(patch_size=16, width=768, layers=12, heads=12),
    "B-32": dict(patch_size=32, width=768, layers=12, heads=12),
    "L-16": dict(patch_size=16, width=1024, layers=24, heads=16),
    "SO400M-14": dict(patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=_SO400M_MLP),
    "SO400M-16": dict(patch_size=16, width=1152, layers=27, heads=16, mlp_ratio=_SO400M_MLP),
    "gopt-16": dict(patch_size=16, width=1536, layers=40, heads=16),
}
# The text towers: SigLIP's English 32k sentencepiece (exact GELU), SigLIP's multilingual 250k,
# SigLIP 2's Gemma 256k (tanh GELU).
_SIGLIP_VOCAB = {"SigLIP": 32000, "SigLIP-i18n": 250000, "SigLIP2": 256000}
# timm's towers that use GELU's tanh approximation (the others, exact GELU).
_TANH_TOWERS = {
    ("B-32", 256),
    ("L-16", 512),
    ("SO400M-16", 256),
    ("SO400M-16", 384),
    ("SO400M-16", 512),
    ("gopt-16", 256),
    ("gopt-16", 384),
}
_TEXT_WIDTHS = {  # the text tower's width, heads, depth and MLP ratio for each image tower
    "B-16": dict(width=768, heads=12, layers=12),
    "B-32": dict(width=768, heads=12, layers=12),
    "L-16": dict(width=1024, heads=16, layers=24),
    "SO400M-14": dict(width=1152, heads=16, layers=27, mlp_ratio=_SO400M_MLP),
    "SO400M-16": dict(width=1152, heads=16, layers=27, mlp_ratio=_SO400M_MLP),
    "gopt-16": dict(width=1152, heads=16, layers=27, mlp_ratio=_SO400M_MLP),
}


def _siglip(tower: str, family: str, image_size: int, **text: Any) -> dict[str, Any]:
    vision = {**_SIGLIP_TOWERS[tower], **_SIGLIP_VIT, "image_size": image_size}
    if (tower, image_size) in _TANH_TOWERS:
        vision["gelu_tanh"] = True
    text_cfg = {**_SIGLIP_TEXT, **_TEXT_WIDTHS[tower], "vocab_size": _SIGLIP_VOCAB[family]}
    if family == "SigLIP2":
        text_cfg["gelu_tanh"] = True
    return dict(
        embed_dim=vision["width"],
        vision=vision,
        text={**text_cfg, **text},
        init_logit_scale=math.log(10),
        init_logit_bias=-10.0,
    )


# open_clip's name -> (tower, family, resolution, text overrides).
_SIGLIP_SIZES = {
    "ViT-B-16-SigLIP": ("B-16", "SigLIP", 224, {}),
    "ViT-B-16-SigLIP-256": ("B-16", "SigLIP", 256, {}),
    "ViT-B-16-SigLIP-384": ("B-16", "SigLIP", 384, {}),
    "ViT-B-16-SigLIP-512": ("B-16", "SigLIP", 512, {}),
    "ViT-B-16-SigLIP-i18n-256": ("B-16", "SigLIP-i18n", 256, {}),
    "ViT-L-16-SigLIP-256": ("L-16", "SigLIP", 256, {}),
    "ViT-L-16-SigLIP-384": ("L-16", "SigLIP", 384, {}),
    "ViT-SO400M-14-SigLIP": ("SO400M-14", "SigLIP", 224, dict(context_length=16)),
    "ViT-SO400M-14-SigLIP-378": ("SO400M-14", "SigLIP", 378, {}),
    "ViT-SO400M-14-SigLIP-384": ("SO400M-14", "SigLIP", 384, {}),
    "ViT-SO400M-16-SigLIP-i18n-256": (
        "SO400M-16",
        "SigLIP-i18n",
        256,
        dict(proj_type="none", proj_bias=False),
    ),
    "ViT-B-16-SigLIP2": ("B-16", "SigLIP2", 224, {}),
    "ViT-B-16-SigLIP2-256": ("B-16", "SigLIP2", 256, {}),
    "ViT-B-16-SigLIP2-384": ("B-16", "SigLIP2", 384, {}),
    "ViT-B-16-SigLIP2-512": ("B-16", "SigLIP2", 512, {}),
    "ViT-B-32-SigLIP2-256": ("B-32", "SigLIP2", 256, {}),
    "ViT-L-16-SigLIP2-256": ("L-16", "SigLIP2", 256, {}),
    "ViT-L-16-SigLIP2-384": ("L-16", "SigLIP2", 384, {}),
    "ViT-L-16-SigLIP2-512": ("L-16", "SigLIP2", 512, {}),
    "ViT-SO400M-14-SigLIP2": ("SO400M-14", "SigLIP2", 224, {}),
    "ViT-SO400M-14-SigLIP2-378": ("SO400M-14", "SigLIP2", 378, {}),
    "ViT-SO400M-16-SigLIP2-256": ("SO400M-16", "SigLIP2", 256, {}),
    "ViT-SO400M-16-SigLIP2-384": ("SO400M-16", "SigLIP2", 384, {}),
    "ViT-SO400M-16-SigLIP2-512": ("SO400M-16", "SigLIP2", 512, {}),
    "ViT-gopt-16-SigLIP2-256": ("gopt-16", "SigLIP2", 256, {}),
    "ViT-gopt-16-SigLIP2-384": ("gopt-16", "SigLIP2", 384, {}),
}
MODELS.update({name: _siglip(*args[:3], **args[3]) for name, args in _SIGLIP_SIZES.items()})
# A SigLIP of seconds on a CPU, for tests and the demo: the towers' forms at tiny widths.
MODELS["tiny-siglip"] = dict(
    embed_dim=32,
    vision=dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, **_SIGLIP_VIT),
    text=dict(_SIGLIP_TEXT, context_length=16, vocab_size=32000, width=32, heads=2, layers=2),
    init_logit_scale=math.log(10),
    init_logit_bias=-10.0,
)


def is_siglip(cfg: dict[str, Any]) -> bool:
    """A model config whose image tower is SigLIP's (MAP-pooled, timm's layout)."""
    return cfg["vision"].get("pool_type") == "map"


def size_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The fields a named size sets (`MODELS`), with top-level overrides; `clip.model_config`
    completes them into every keyword argument of `CLIP`."""
    quick_gelu = name.endswith("-quickgelu")
    base = name.removesuffix("-quickgelu")
    if base not in MODELS:
        raise UsageError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    cfg = copy.deepcopy(MODELS[base])
    if quick_gelu:
        cfg["quick_gelu"] = True
    cfg.update(overrides)
    return cfg
