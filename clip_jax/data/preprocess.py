"""The evaluation transform, with PIL and numpy only: the pixels open_clip's
`image_transform(S, is_train=False)` gives the image tower, exactly, and CLIP's pixel statistics.

`Preprocess` is one weights' evaluation protocol (open_clip's `PreprocessCfg`): resolution, resize
mode (`RESIZE_MODES`), filter (`INTERPOLATIONS`), mean and std. `Preprocess.decode(bytes)` is what
evaluation's input pipeline runs on every image file (inside tf.data, through
`tf.numpy_function`); `preprocess(images, image_size)` is the same for PIL images and arrays in
memory. Both do what open_clip does with `Image.open(file)`: resize in the file's own mode (PIL
decodes JPEG with libjpeg's accurate DCT, resamples palette images with the nearest pixel and
RGBA ones premultiplied), crop or pad, then convert to RGB.

CLIP_MEAN and CLIP_STD are OpenAI's statistics, which open_clip keeps as its default; the
training pipeline (`image_ops`) normalises with them.
"""

import dataclasses
import io
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
RESIZE_MODES = ("shortest", "longest", "squash")  # open_clip's `resize_mode`
INTERPOLATIONS = ("bicubic", "bilinear")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """One evaluation protocol (open_clip's `PreprocessCfg` for a pretrained tag).

    Attributes:
      size: S, the model's resolution; images become S x S.
      resize_mode: "shortest": the shorter side resized to S (torchvision's `Resize(S)`), the
        centre S x S cropped (OpenAI's protocol); "longest": the longer side resized to S, the
        rest padded with `fill` around the centre; "squash": resized to S x S, the aspect ratio
        not kept.
      interpolation: PIL's filter, "bicubic" or "bilinear" (antialiased when shrinking).
      mean, std: per-channel statistics of pixels in [0, 1] the weights were trained with.
      fill: the padding's value (0..255) in "longest" mode.
    """

    size: int
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    fill: int = 0

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise UsageError(f"resize_mode {self.resize_mode!r}: use one of {RESIZE_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(f"interpolation {self.interpolation!r}: use one of {INTERPOLATIONS}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3 or (name == "std" and min(value) <= 0):
                raise UsageError(
                    f"{name} {value}: three numbers (per RGB channel)"
                    + (", all positive" if name == "std" else "")
                )
            object.__setattr__(self, name, tuple(float(v) for v in value))

    def pixels(self, image: Any) -> np.ndarray:
        """A PIL image -> uint8 [S, S, 3], open_clip's arithmetic on PIL (see the class)."""
        from PIL import Image, ImageOps

        resample = (
            Image.Resampling.BICUBIC
            if self.interpolation == "bicubic"
            else Image.Resampling.BILINEAR
        )
        size, (w, h) = self.size, image.size
        if self.resize_mode == "squash":
            image = image.resize((size, size), resample)
        elif self.resize_mode == "shortest":
            image = image.resize(shorter_side_size(w, h, size), resample)
        else:  # open_clip's ResizeKeepRatio(longest=1): both sides rounded
            ratio = max(h / size, w / size)
            image = image.resize((round(w / ratio), round(h / ratio)), resample)
            w, h = image.size
            if w < size or h < size:  # CenterCropOrPad: the odd pixel right / at the bottom
                dw, dh = max(size - w, 0), max(size - h, 0)
                bands = len(image.getbands())
                fill = self.fill if image.mode == "P" or bands == 1 else (self.fill,) * bands
                image = ImageOps.expand(
                    image, (dw // 2, dh // 2, (dw + 1) // 2, (dh + 1) // 2), fill=fill
                )
        w, h = image.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        if (w, h) != (size, size):
            image = image.crop((left, top, left + size, top + size))
        return np.asarray(image.convert("RGB"))

    def decode(self, data: bytes, max_pixels: int = 0) -> np.ndarray:
        """Encoded image bytes -> uint8 [S, S, 3]; raises (ValueError, PIL's errors) on bytes
        that are no image and on an image whose header declares more than `max_pixels` pixels
        (default: `MAX_IMAGE_PIXELS`), before decoding it."""
        image = open_image(data, max_pixels or MAX_IMAGE_PIXELS)
        image.load()
        return self.pixels(image)


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's `Resize(size)`: (width, height) with the shorter side `size`, the longer
    one truncated."""
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def open_image(data: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """Encoded bytes (or a scalar array of them, as `tf.numpy_function` passes them) -> a PIL
    image, not yet decoded; raises on bytes that are no image, and on a header declaring more
    than `max_pixels` pixels (ValueError, before anything is decoded)."""
    from PIL import Image

    if isinstance(data, np.ndarray):
        data = data.item()
    try:
        image = Image.open(io.BytesIO(bytes(data)))
    except Image.DecompressionBombError as e:  # PIL's own limit, twice MAX_IMAGE_PIXELS
        raise ValueError(f"{e} (above max_pixels: not decoded)") from None
    w, h = image.size
    if w * h > max_pixels:
        raise ValueError(f"a {w}x{h} image, above max_pixels={max_pixels} (not decoded)")
    return image


def normalize(images: Any, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
    """uint8 pixels [..., 3] (numpy or JAX) -> float32 normalised with `mean` and `std` (of
    pixels in [0, 1]): how training and evaluation turn the batches the host sends into the image
    tower's input, on the device (a quarter of the bytes to send)."""
    mean = np.asarray(mean, np.float32) * np.float32(255)
    std = np.asarray(std, np.float32) * np.float32(255)
    return (images.astype(np.float32) - mean) / std


def preprocess(
    images: Any,
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
) -> np.ndarray:
    """open_clip's evaluation transform (`image_transform(S, is_train=False)`) on images in memory.

    Each image: resized and cropped as `Preprocess` says (by default OpenAI's protocol: the
    shorter side resized to S with PIL's bicubic filter, the centre S x S cropped), converted to
    RGB, scaled to [0, 1] and normalised with `mean` and `std`. Equal to open_clip's transform on
    the same images (tests/test_preprocess.py).

    Args:
      images: a PIL image or a list of them, or uint8 arrays: one image [H, W, 3] (or [H, W]
        grayscale, [H, W, 4] RGBA), a batch [B, H, W, 3], or a list of images of any sizes.
      image_size: S, the model's resolution (`model.vision["image_size"]`).
      mean: per-channel mean of pixels in [0, 1] the weights were trained with (CLIP's).
      std: per-channel standard deviation (CLIP's).
      resize_mode, interpolation: as `Preprocess`'s.

    Returns:
      float32 [B, S, S, 3] (NHWC), for `model.apply(variables, x, method="encode_image")`.
    """
    protocol = Preprocess(image_size, resize_mode, interpolation, tuple(mean), tuple(std))
    pils = [_to_pil(image) for image in _as_list(images)]
    if not pils:
        raise UsageError("preprocess() got no images")
    pixels = np.stack([protocol.pixels(image) for image in pils])  # uint8 [B, S, S, 3]
    x = pixels.astype(np.float32) / np.float32(255)  # torchvision's ToTensor, in float32
    return (x - np.asarray(protocol.mean, np.float32)) / np.asarray(protocol.std, np.float32)


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
