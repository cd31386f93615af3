"""NaFlex inputs (SigLIP 2, Tschannen et al. 2025): each image at its own aspect ratio, cut into
patches within a token budget, padded to that budget.

An H x W image is resized (PIL's bilinear, antialiased where it shrinks, as SigLIP 2's image
processor does) to h x w, both multiples of the patch size p and as large as the budget allows:
the largest scale s for which ceil(s*H/p) * ceil(s*W/p) <= `max_patches` (found by bisection,
each side at least one patch). Its (h/p) * (w/p) patches, row by row, each patch's pixels by row,
column and channel, fill the first rows of a [max_patches, p*p*3] array; the rest is padding.
The image tower (`models.vit.VisionTransformer`, `grid=`) masks the padding and resamples its
position grid to (h/p, w/p).

Every batch of any mix of sizes has the one shape [B, max_patches, p*p*3], so one compiled
program per (batch, budget) covers them all.

    patches, grid = naflex.batch(images, patch_size=16, max_patches=256, mean=(.5,)*3, std=(.5,)*3)
    embeddings = model.apply(variables, patches, grid=grid, method="encode_image")
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from clip_jax.infra.errors import UsageError

SIGLIP_MEAN = (0.5, 0.5, 0.5)  # SigLIP's pixel statistics: [0, 1] -> [-1, 1]
SIGLIP_STD = (0.5, 0.5, 0.5)


def target_size(
    height: int, width: int, patch_size: int, max_patches: int, eps: float = 1e-5
) -> tuple[int, int]:
    """The h x w (multiples of `patch_size`) an image of `height` x `width` is resized to: the
    largest scale whose patch grid fits `max_patches` (see the module)."""
    if height < 1 or width < 1:
        raise UsageError(f"an image of {height}x{width} pixels has nothing to cut into patches")
    if max_patches < 1:
        raise UsageError(f"max_patches={max_patches}: use a positive number of patches")

    def side(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(scale * size / patch_size) * patch_size)

    def fits(scale: float) -> bool:
        return (side(scale, height) // patch_size) * (
            side(scale, width) // patch_size
        ) <= max_patches

    low, high = eps / 10, 100.0
    while high - low >= eps:
        mid = (low + high) / 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return side(low, height), side(low, width)


def patchify(pixels: np.ndarray, patch_size: int) -> np.ndarray:
    """[h, w, C] -> [(h/p) * (w/p), p*p*C]: the patches row by row, each one's pixels by row,
    column and channel (the patch embedding's kernel layout [p, p, C, D])."""
    h, w, c = pixels.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"{h}x{w} pixels are not whole {p}-pixel patches")
    grid = pixels.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4)
    return grid.reshape((h // p) * (w // p), p * p * c)


def image_patches(
    image: Any,
    patch_size: int,
    max_patches: int,
    mean: Sequence[float] = SIGLIP_MEAN,
    std: Sequence[float] = SIGLIP_STD,
) -> tuple[np.ndarray, tuple[int, int]]:
    """One image (PIL, or uint8 [H, W, 3]) -> (patches float32 [max_patches, p*p*3], normalised
    and zero-padded; (rows, columns) of its patch grid)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, np.uint8))
    image = image if image.mode == "RGB" else image.convert("RGB")
    h, w = target_size(image.height, image.width, patch_size, max_patches)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    mean = np.asarray(mean, np.float32) * 255
    std = np.asarray(std, np.float32) * 255
    pixels = (np.asarray(image, np.float32) - mean) / std
    patches = patchify(pixels, patch_size)
    out = np.zeros((max_patches, patches.shape[1]), np.float32)
    out[: len(patches)] = patches
    return out, (h // patch_size, w // patch_size)


def batch(
    images: Sequence[Any],
    patch_size: int,
    max_patches: int,
    mean: Sequence[float] = SIGLIP_MEAN,
    std: Sequence[float] = SIGLIP_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """Images of any sizes -> (patches float32 [B, max_patches, p*p*3], grid int32 [B, 2]), what
    `CLIP.encode_image(patches, grid=grid)` takes."""
    pairs = [image_patches(im, patch_size, max_patches, mean, std) for im in images]
    patches = np.stack([p for p, _ in pairs])
    grid = np.asarray([g for _, g in pairs], np.int32).reshape(len(pairs), 2)
    return patches, grid
