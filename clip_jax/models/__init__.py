"""Flax (linen) modules of the CLIP family."""

from clip_jax.models.clip import CLIP, create_model, l2_normalize
from clip_jax.models.sizes import MODELS, model_config

__all__ = ["CLIP", "create_model", "MODELS", "l2_normalize", "model_config"]
