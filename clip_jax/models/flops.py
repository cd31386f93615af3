"""The model FLOPs of a CLIP train step, counted from the architecture (what MFU is measured
against), not from a compiler: XLA's cost analysis misses the library calls of GPUs (cuBLAS,
cuDNN) and counts what a backend adds or removes.

Conventions, as PaLM's appendix B and the MFU figures of OpenCLIP and MaxText: 2 FLOPs per
multiply-add; every matrix product of the forward pass, attention's two included at full
length (a causal mask's skipped half is not subtracted); the backward pass twice the forward,
so a train step is 3x the forward; norms, activations, softmax and the optimizer are not
counted (they are memory-bound and small).
"""

from collections.abc import Mapping
from typing import Any


def _transformer(tokens: int, width: int, layers: int, mlp_dim: int) -> float:
    """Forward FLOPs of `layers` pre-LN blocks over a sequence of `tokens`."""
    projections = 2 * tokens * (4 * width * width + 2 * width * mlp_dim)  # qkv, out, MLP
    attention = 2 * 2 * tokens * tokens * width  # q.k^T and the weighted sum of the values
    return layers * (projections + attention)


def vision_forward_flops(vision: Mapping[str, Any], embed_dim: int) -> float | None:
    """Forward FLOPs of one image through a ViT (None for a ResNet: not counted here)."""
    if "patch_size" not in vision or not isinstance(vision["layers"], int):
        return None
    patch, width = vision["patch_size"], vision["width"]
    patches = (vision["image_size"] // patch) ** 2
    mlp_dim = int(width * vision["mlp_ratio"])
    embed = 2 * patches * patch * patch * 3 * width
    return (
        embed + _transformer(patches + 1, width, vision["layers"], mlp_dim) + 2 * width * embed_dim
    )


def text_forward_flops(text: Mapping[str, Any], embed_dim: int) -> float:
    """Forward FLOPs of one caption through the text transformer (the lookup is free)."""
    width = text["width"]
    mlp_dim = int(width * text["mlp_ratio"])
    tower = _transformer(text["context_length"], width, text["layers"], mlp_dim)
    return tower + 2 * width * embed_dim


def train_step_flops(model: Mapping[str, Any], batch_size: int) -> float | None:
    """Model FLOPs of one train step of `batch_size` pairs (3x the forward of both towers and of
    the [batch, batch] logits); None where an image tower is not counted (ResNets)."""
    vision = vision_forward_flops(model["vision"], model["embed_dim"])
    if vision is None:
        return None
    text = text_forward_flops(model["text"], model["embed_dim"])
    logits = 2 * batch_size * batch_size * model["embed_dim"]
    return 3 * (batch_size * (vision + text) + logits)
