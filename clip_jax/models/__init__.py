"""Flax (linen) modules of the CLIP family."""

from clip_jax.models.clip import CLIP, complete_config, create_model, l2_normalize, model_config
from clip_jax.models.sizes import MODELS

__all__ = ["CLIP", "complete_config", "create_model", "MODELS", "l2_normalize", "model_config"]
