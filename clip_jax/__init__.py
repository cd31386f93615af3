"""clip_jax: contrastive language-image pretraining in JAX, from a laptop to a TPU pod.

    model, variables = clip_jax.load_pretrained("ViT-B-32", pretrained="openai")  # or a path
    emb = model.apply(variables, clip_jax.preprocess(pil_images, 224), method="encode_image")

The public names load lazily, so `import clip_jax` is quick and pulls in neither JAX's compiler
nor TensorFlow nor PyTorch until they are used.
"""

import importlib
import sys
from typing import Any

__version__ = "0.1.0"

if sys.argv[:1] == ["-m"]:  # `python -m clip_jax.X` starting, before any other thread exists
    from clip_jax.infra import allocator

    allocator.tune()

_LAZY = {
    "load_pretrained": "clip_jax.inference.load",
    "save_pretrained": "clip_jax.inference.load",
    "list_pretrained": "clip_jax.weights.pretrained",
    "create_model_and_transforms": "clip_jax.inference.load",
    "preprocess": "clip_jax.data.preprocess",
    "CLIP": "clip_jax.models.clip",
    "create_model": "clip_jax.models.clip",
    "model_config": "clip_jax.models.clip",
    "get_tokenizer": "clip_jax.data.tokenizers",
    "ClipBpeTokenizer": "clip_jax.data.tokenizers",
    "SentencePieceTokenizer": "clip_jax.data.tokenizers",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clip_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
