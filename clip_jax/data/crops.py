"""Training crops with PIL and numpy: encoded image bytes -> uint8 [S, S, 3], run inside tf.data
through `tf.numpy_function` (`image_ops.augment`; the pipeline crops groups of examples per call,
`image_ops.augment_group`).

The two augmentations (`AUGMENTATIONS`):
- "random_resized_crop": open_clip's form of the CLIP paper's crop. A window covering a random
  share `scale` of the area with an aspect ratio (w / h) in [3/4, 4/3] (`window`), resized to
  S x S with PIL's bicubic filter, antialiased as open_clip's `RandomResizedCrop` on PIL images.
- "random_square_crop": the paper's words taken literally ("A random square crop from resized
  images is the only data augmentation used during training", section 2.3): the shorter side
  resized to S, then an S x S square at a random place.

Speed. Decoding a JPEG whole dominates, so where the window (or, for the square crop, the
image) is at least twice the output size, the JPEG is decoded at reduced scale, 1/2, 1/4 or 1/8
(libjpeg's DCT scaling, PIL's `draft`), never below S; the resize then maps the window's exact
position in the reduced image onto the output, so the crop is the same one. The pixels move a
little from full decoding (docs/performance.md, "The host pipeline"). PIL decodes and resizes
without holding Python's lock, so the tf.data threads run in parallel.

Every crop is a pure function of the bytes and the draws `u` (uniform in [0, 1), made by tf.data
from the example's seed): the same example gives the same crop after a resume. Bytes that are no
image raise (the pipeline skips and counts the record), and so does an image whose header
declares more than `max_pixels` pixels, before it is decoded.
"""

import math

import numpy as np

from clip_jax.data.preprocess import AUGMENTATIONS, open_image, shorter_side_size

CROP_RATIO = (3 / 4, 4 / 3)
DCT_SCALES = (8, 4, 2)  # libjpeg's reductions, tried largest first


def window(
    width: int, height: int, u: np.ndarray, scale: tuple[float, float], ratio=CROP_RATIO
) -> tuple[int, int, int, int]:
    """A random window (left, top, w, h) of `scale` of the area and aspect `ratio` (w / h).

    One draw, clipped to the image, instead of torchvision's ten tries and a centre fallback:
    with the scales CLIP uses (>= 0.9 of the area) the clip changes the window by a few pixels.

    Args:
      width, height: the image's size.
      u: four uniform draws in [0, 1): area, aspect, top, left.
    """
    area = width * height * (scale[0] + (scale[1] - scale[0]) * float(u[0]))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = math.exp(log_lo + (log_hi - log_lo) * float(u[1]))
    w = min(max(round(math.sqrt(area * aspect)), 1), width)
    h = min(max(round(math.sqrt(area / aspect)), 1), height)
    top = min(int(float(u[2]) * (height - h + 1)), height - h)
    left = min(int(float(u[3]) * (width - w + 1)), width - w)
    return left, top, w, h


def _reduce(image, shortest: float, size: int) -> int:
    """Sets a JPEG to decode at the largest DCT reduction r that keeps `shortest / r >= size`
    (`shortest`: the shorter side of what will be resized to `size`); returns r (1: none)."""
    if image.format != "JPEG":
        return 1
    for r in DCT_SCALES:
        if shortest >= r * size:
            w, h = image.size
            image.draft(None, (w // r, h // r))  # PIL picks this reduction exactly
            return r
    return 1


def _rgb(image):
    """The image in RGB: itself when it is (`convert` would copy every decoded pixel)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def random_resized_crop(
    data: bytes, size: int, u: np.ndarray, scale: tuple[float, float], max_pixels: int
) -> np.ndarray:
    """Encoded bytes -> the random resized crop: uint8 [size, size, 3] (see the module)."""
    from PIL import Image

    image = open_image(data, max_pixels)
    left, top, w, h = window(*image.size, u, scale)
    r = _reduce(image, min(w, h), size)
    box = (left / r, top / r, (left + w) / r, (top + h) / r)  # libjpeg's pixel i covers r*i..
    return np.asarray(_rgb(image).resize((size, size), Image.Resampling.BICUBIC, box=box))


def random_square_crop(data: bytes, size: int, u: np.ndarray, max_pixels: int) -> np.ndarray:
    """Encoded bytes -> the paper's crop: the shorter side resized to `size` (bicubic, the longer
    side truncated as torchvision's `Resize(int)`), then a square at a random place."""
    from PIL import Image

    image = open_image(data, max_pixels)
    width, height = image.size
    new = shorter_side_size(width, height, size)
    r = _reduce(image, min(width, height), size)
    box = (0.0, 0.0, width / r, height / r)
    resized = _rgb(image).resize(new, Image.Resampling.BICUBIC, box=box)
    top = min(int(float(u[2]) * (new[1] - size + 1)), new[1] - size)
    left = min(int(float(u[3]) * (new[0] - size + 1)), new[0] - size)
    return np.asarray(resized)[top : top + size, left : left + size]


def augment(
    data: bytes,
    u: np.ndarray,
    *,
    size: int,
    augmentation: str,
    scale: tuple[float, float],
    max_pixels: int,
) -> np.ndarray:
    """One of `AUGMENTATIONS` of encoded bytes, with draws `u` (float32 [4] in [0, 1))."""
    if augmentation == "random_resized_crop":
        return random_resized_crop(data, size, u, scale, max_pixels)
    if augmentation == "random_square_crop":
        return random_square_crop(data, size, u, max_pixels)
    raise ValueError(f"unknown augmentation {augmentation!r}; choose one of {AUGMENTATIONS}")


def augment_group(
    data: np.ndarray, u: np.ndarray, usable: np.ndarray, *, size: int, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """`augment` of a group of k examples in one call (one `tf.numpy_function` call per group
    instead of one per image, whose own cost was a tenth of a 500x375 photo's crop).

    Args:
      data: k encoded images (bytes).
      u: float32 [k, 4], each example's draws.
      usable: bool [k]; the others are not decoded (records without a caption, epoch markers).
      size, kwargs: `augment`'s.
    Returns:
      (uint8 [k, size, size, 3], bool [k]): the crops, and which examples have one. An image
      that raises (bytes that are no image, a truncated file, a header above `max_pixels`) is
      bad data of the record, whatever its exception: it is left out, and the pipeline counts it.
    """
    images = np.empty((len(data), size, size, 3), np.uint8)
    done = np.zeros(len(data), bool)
    for i in np.flatnonzero(usable):
        try:
            images[i] = augment(data[i], u[i], size=size, **kwargs)
        except Exception:  # noqa: BLE001 - any failure of untrusted bytes drops the record
            continue
        done[i] = True
    images[~done] = 0  # rows without a crop (dropped downstream) hold zeros, not stale memory
    return images, done
