"""CLIP's pixel statistics, without TensorFlow: what every image is normalised with before the
image tower (OpenAI's values, which open_clip keeps). The tf.data pipeline (`image_ops`) and
evaluation's on-device normalisation both read them from here.

`preprocess(images, image_size)` is OpenAI's evaluation transform for PIL images and uint8
arrays (numpy and PIL only), for using a model outside the tf.data pipeline."""

from collections.abc import Sequence
from typing import Any

import numpy as np

from clip_jax.infra.errors import UsageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # RGB, of pixels in [0, 1]
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Images declaring more pixels than this are not decoded: PIL's Image.MAX_IMAGE_PIXELS, the
# limit past which PIL (which open_clip's loaders use) warns of a decompression bomb.
MAX_IMAGE_PIXELS = 89_478_485
AUGMENTATIONS = ("random_resized_crop", "random_square_crop")  # `image_ops.augment`'s


def preprocess(
    images: Any,
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """OpenAI's evaluation transform (open_clip's `image_transform(S, is_train=False)`).

    Each image: the shorter side resized to S with PIL's bicubic filter (as torchvision's `Resize`
    does on PIL images), the centre S x S cropped (torchvision's `CenterCrop` rounding), converted
    to RGB, scaled to [0, 1] and normalised with `mean` and `std`. Equal to open_clip's transform
    on the same images (tests/test_preprocess.py).

    Args:
      images: a PIL image or a list of them, or uint8 arrays: one image [H, W, 3] (or [H, W]
        grayscale, [H, W, 4] RGBA), a batch [B, H, W, 3], or a list of images of any sizes.
      image_size: S, the model's resolution (`model.vision["image_size"]`).
      mean: per-channel mean of pixels in [0, 1] the weights were trained with (CLIP's).
      std: per-channel standard deviation (CLIP's).

    Returns:
      float32 [B, S, S, 3] (NHWC), for `model.apply(variables, x, method="encode_image")`.
    """
    pils = [_to_pil(image) for image in _as_list(images)]
    if not pils:
        raise UsageError("preprocess() got no images")
    pixels = np.stack([_resize_crop_rgb(image, image_size) for image in pils])  # uint8 [B, S, S, 3]
    x = pixels.astype(np.float32) / np.float32(255)  # torchvision's ToTensor, in float32
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _as_list(images: Any) -> list[Any]:
    from PIL import Image

    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)


def _to_pil(image: Any) -> Any:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise UsageError(
            f"preprocess() takes PIL images or uint8 arrays (0..255), not {array.dtype} arrays; "
            "convert floats in [0, 1] with (x * 255).round().astype(np.uint8)"
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise UsageError(
            "an image array must be [H, W], [H, W, 3] or [H, W, 4], or a batch [B, H, W, 3]; "
            f"got shape {array.shape}"
        )
    return Image.fromarray(array)  # L, RGB or RGBA: resized in its own mode, as torchvision does


def _resize_crop_rgb(image: Any, size: int) -> np.ndarray:
    """Resize(size, BICUBIC), CenterCrop(size), convert("RGB"): torchvision's arithmetic on PIL."""
    from PIL import Image

    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)).convert("RGB"))
