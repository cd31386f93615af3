"""Model sizes as data: the published CLIP architectures, keyed by open_clip's names.

`size_config("ViT-B-32")` returns the fields a size sets (`models.model_config` fills in the rest
of `CLIP`'s keyword arguments); a `-quickgelu` suffix selects QuickGELU as OpenAI trained with
(and as open_clip's `*-quickgelu` names do).
"""

import copy
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
