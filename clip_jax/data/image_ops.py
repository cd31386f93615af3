"""Training images as TensorFlow ops, so that they are made inside the tf.data graph
(evaluation's pixels are PIL's, `preprocess.Preprocess`).

Training images get one of two augmentations (`AUGMENTATIONS`): "random_resized_crop", open_clip's
form of the CLIP paper's crop (a random crop covering `scale` of the area, aspect ratio in
[3/4, 4/3], resized to the model's resolution), or "random_square_crop", the paper's words taken
literally ("A random square crop from resized images is the only data augmentation used during
training", section 2.3): the shorter side resized to the model's resolution, then a square of that
size at a random place. Crops are rounded to uint8, as PIL's are in the reference transforms,
and then get CLIP's mean/std normalisation; the input pipeline normalises whole batches at once
(cheaper per example than one image at a time).

Decoding handles whatever `tf.io.decode_image` reads: JPEG, PNG, GIF (first frame), BMP and, in
the TensorFlow versions we support, WebP. Undecodable or truncated bytes raise an error inside
the graph; the pipeline turns such errors into skipped, counted records. So do images whose
header declares more than `max_pixels` (width x height): a few hundred KB of PNG can declare
20000 x 20000 pixels, 1.2 GB once decoded, so the size is read from the header first (JPEG's by
`tf.image.extract_jpeg_shape`, the others' fixed header fields) and such images never decode.
"""

import math

import tensorflow as tf

from clip_jax.data.preprocess import AUGMENTATIONS, CLIP_MEAN, CLIP_STD, MAX_IMAGE_PIXELS

CROP_RATIO = (3 / 4, 4 / 3)
DCT_SCALES = (1, 2, 4, 8)  # libjpeg decodes at 1/1, 1/2, 1/4 or 1/8 of the size
# Downscaling by more than this gets an antialiasing filter, as PIL's resize (which OpenAI and
# open_clip use) always applies; below it, the filter changes little and costs 3-4x the time.
ANTIALIAS_ABOVE = 1.25
_HEADER_BYTES = 32


def header_pixels(data: tf.Tensor) -> tf.Tensor:
    """Width x height as the header of encoded image bytes declares it, without decoding: int64
    scalar; 0 for a format not recognised (`tf.io.decode_image` then refuses it anyway)."""
    head = tf.strings.substr(data + b"\0" * _HEADER_BYTES, 0, _HEADER_BYTES)
    b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)  # [32]

    def le(start: int, n: int) -> tf.Tensor:  # little-endian unsigned integer at b[start:]
        return sum(b[start + i] * 256**i for i in range(n))

    def be(start: int, n: int) -> tf.Tensor:
        return sum(b[start + i] * 256 ** (n - 1 - i) for i in range(n))

    def starts(prefix: bytes, at: int = 0) -> tf.Tensor:
        return tf.reduce_all(tf.equal(b[at : at + len(prefix)], list(prefix)))

    def signed32(v: tf.Tensor) -> tf.Tensor:
        return tf.abs(tf.where(v >= 2**31, v - 2**32, v))

    vp8l = le(21, 4)
    sizes = [  # (format test, width, height)
        (starts(b"\x89PNG\r\n\x1a\n"), be(16, 4), be(20, 4)),
        (starts(b"GIF8"), le(6, 2), le(8, 2)),
        (starts(b"BM"), signed32(le(18, 4)), signed32(le(22, 4))),
        (starts(b"WEBPVP8X", 8), 1 + le(24, 3), 1 + le(27, 3)),
        (starts(b"WEBPVP8 ", 8), le(26, 2) % 2**14, le(28, 2) % 2**14),
        (starts(b"WEBPVP8L", 8), 1 + vp8l % 2**14, 1 + vp8l // 2**14 % 2**14),
    ]
    pixels = tf.constant(0, tf.int64)
    for test, width, height in reversed(sizes):
        pixels = tf.where(test, width * height, pixels)
    return tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.reduce_prod(tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64)),
        lambda: pixels,
    )


def decode_rgb(data: tf.Tensor, max_pixels: int = MAX_IMAGE_PIXELS) -> tf.Tensor:
    """Encoded image bytes (a scalar tf.string) -> uint8 [H, W, 3]; raises on bad bytes, and on
    an image whose header declares more than `max_pixels` pixels, before decoding it."""
    small = tf.debugging.assert_less_equal(
        header_pixels(data),
        tf.constant(max_pixels, tf.int64),
        message=f"an image above max_pixels={max_pixels} (not decoded)",
    )
    with tf.control_dependencies([small]):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize(image: tf.Tensor, height: tf.Tensor | int, width: tf.Tensor | int) -> tf.Tensor:
    """Bicubic resize of [H, W, 3] to [height, width, 3] float32, antialiased when it shrinks
    either side by more than `ANTIALIAS_ABOVE`."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    target = tf.cast(tf.stack([height, width]), tf.float32)
    shrink = tf.reduce_max(shape / target)
    return tf.cond(
        shrink > ANTIALIAS_ABOVE,
        lambda: tf.image.resize(image, [height, width], method="bicubic", antialias=True),
        lambda: tf.image.resize(image, [height, width], method="bicubic"),
    )


def resize_shorter(image: tf.Tensor, size: int) -> tf.Tensor:
    """[H, W, 3] -> float32 [H', W', 3] with min(H', W') = `size`: torchvision's Resize(int),
    bicubic (see `resize`), the longer side truncated."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    short = tf.minimum(shape[0], shape[1])
    new = tf.maximum(tf.cast(shape * size / short, tf.int32), size)
    return resize(image, new[0], new[1])


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    """Float pixels (a resize's output may overshoot [0, 255]) -> rounded, clipped uint8."""
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def normalize(image: tf.Tensor) -> tf.Tensor:
    """uint8 pixels [..., 3] -> CLIP-normalised float32 [..., 3]: (x / 255 - mean) / std."""
    scale = tf.constant([1 / (255 * s) for s in CLIP_STD])
    offset = tf.constant([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)])
    return tf.cast(image, tf.float32) * scale + offset


def random_crop_window(
    height: tf.Tensor,
    width: tf.Tensor,
    seed: tf.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """A random window (top, left, h, w) of `scale` of the area and aspect `ratio` (w / h).

    One draw, clipped to the image, instead of torchvision's ten tries and a center-crop fallback:
    with the scales CLIP uses (>= 0.9 of the area) the clip changes the window by a few pixels.

    Args:
      height, width: int32 scalars, the image size.
      seed: int32 or int64 [2], a stateless seed; the same seed gives the same window.
    Returns:
      int32 scalars top, left, crop_height, crop_width.
    """
    u = tf.random.stateless_uniform([4], seed=seed)
    area = tf.cast(height * width, tf.float32) * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_lo + (log_hi - log_lo) * u[1])
    crop_w = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32), 1, width)
    crop_h = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32), 1, height)
    top = tf.cast(tf.floor(u[2] * tf.cast(height - crop_h + 1, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(u[3] * tf.cast(width - crop_w + 1, tf.float32)), tf.int32)
    return tf.minimum(top, height - crop_h), tf.minimum(left, width - crop_w), crop_h, crop_w


def train_crop(
    data: tf.Tensor,
    size: int,
    seed: tf.Tensor,
    scale: tuple[float, float],
    max_pixels: int,
) -> tf.Tensor:
    """Encoded bytes -> a random resized crop: uint8 [size, size, 3].

    Args:
      data: scalar tf.string, encoded image bytes.
      size: output resolution.
      seed: int [2] stateless seed (the crop is a pure function of the bytes and the seed).
      scale: range of the crop's share of the image area.
      max_pixels: larger images (by their header) raise instead of being decoded.
    """
    small = tf.debugging.assert_less_equal(
        header_pixels(data),
        tf.constant(max_pixels, tf.int64),
        message=f"an image above max_pixels={max_pixels} (not decoded)",
    )
    with tf.control_dependencies([small]):
        return to_uint8(
            tf.cond(
                tf.io.is_jpeg(data),
                lambda: _jpeg_crop(data, size, seed, scale),
                lambda: _other_crop(data, size, seed, scale),
            )
        )


def _other_crop(data: tf.Tensor, size: int, seed: tf.Tensor, scale) -> tf.Tensor:
    """A PNG, WebP, GIF or BMP: decoded whole, the random window cut out and resized."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    shape = tf.shape(image)
    top, left, h, w = random_crop_window(shape[0], shape[1], seed, scale)
    return resize(image[top : top + h, left : left + w], size, size)


def _jpeg_crop(data: tf.Tensor, size: int, seed: tf.Tensor, scale) -> tf.Tensor:
    """A JPEG's random window, decoded alone (libjpeg skips the rest) at the smallest of its DCT
    scales (`DCT_SCALES`) that keeps both sides of the window at least `size`, then resized.

    The window is drawn on the full-size image, so the crop is the same as without scaling: at
    scale 1/r the decoded rows and columns cover the window's edges, and the resize maps the
    window's exact, fractional position onto the output (`tf.raw_ops.ScaleAndTranslate`, the
    bicubic kernel `resize` uses, antialiased when it shrinks by more than `ANTIALIAS_ABOVE`).
    """
    shape = tf.image.extract_jpeg_shape(data)
    top, left, h, w = random_crop_window(shape[0], shape[1], seed, scale)
    halvings = tf.reduce_sum(
        tf.cast(tf.minimum(h, w) >= size * tf.constant(DCT_SCALES[1:]), tf.int32)
    )

    def full() -> tf.Tensor:
        window = tf.image.decode_and_crop_jpeg(data, tf.stack([top, left, h, w]), channels=3)
        return resize(window, size, size)

    def at(ratio: int):
        def decode() -> tf.Tensor:
            height = (shape[0] + ratio - 1) // ratio  # the scaled image's size
            width = (shape[1] + ratio - 1) // ratio
            top_r, left_r = top // ratio, left // ratio
            bottom_r = tf.minimum((top + h + ratio - 1) // ratio, height)
            right_r = tf.minimum((left + w + ratio - 1) // ratio, width)
            window = tf.stack([top_r, left_r, bottom_r - top_r, right_r - left_r])
            image = tf.image.decode_and_crop_jpeg(data, window, channels=3, ratio=ratio)
            # The crop in the decoded pixels' coordinates: from (top / r - top_r) over h / r.
            extent = tf.cast(tf.stack([h, w]), tf.float32) / ratio
            offset = tf.cast(tf.stack([top, left]), tf.float32) / ratio - tf.cast(
                tf.stack([top_r, left_r]), tf.float32
            )
            factor = size / extent  # output pixels per decoded pixel, < 1: a shrink
            batch = tf.cast(image, tf.float32)[None]

            def scaled(antialias: bool) -> tf.Tensor:
                return tf.raw_ops.ScaleAndTranslate(
                    images=batch,
                    size=[size, size],
                    scale=factor,
                    translation=-offset * factor,
                    kernel_type="keyscubic",
                    antialias=antialias,
                )[0]

            return tf.cond(
                tf.reduce_max(extent) / size > ANTIALIAS_ABOVE,
                lambda: scaled(True),
                lambda: scaled(False),
            )

        return decode

    return tf.switch_case(halvings, [full, *(at(r) for r in DCT_SCALES[1:])])


def _uniform_offset(u: tf.Tensor, extent: tf.Tensor, size: int) -> tf.Tensor:
    """One of the `extent - size + 1` offsets of a window along an axis, from u in [0, 1)."""
    offset = tf.cast(u * tf.cast(extent - size + 1, tf.float32), tf.int32)
    return tf.minimum(offset, extent - size)  # u * n can round up to n in float32


def random_square_crop(data: tf.Tensor, size: int, seed: tf.Tensor, max_pixels: int) -> tf.Tensor:
    """Encoded bytes -> the CLIP paper's augmentation: shorter side resized to `size` (bicubic),
    then a `size` x `size` square at a uniformly random place: uint8 [size, size, 3].

    Args:
      data: scalar tf.string, encoded image bytes.
      size: output resolution.
      seed: int [2] stateless seed (the crop is a pure function of the bytes and the seed).
      max_pixels: larger images (by their header) raise instead of being decoded.
    """
    resized = resize_shorter(decode_rgb(data, max_pixels), size)
    shape = tf.shape(resized)
    u = tf.random.stateless_uniform([2], seed=seed)
    top, left = _uniform_offset(u[0], shape[0], size), _uniform_offset(u[1], shape[1], size)
    return to_uint8(resized[top : top + size, left : left + size])


def augment(
    data: tf.Tensor,
    size: int,
    seed: tf.Tensor,
    *,
    augmentation: str,
    crop_scale: tuple[float, float],
    max_pixels: int,
) -> tf.Tensor:
    """Encoded bytes -> a training crop: uint8 [size, size, 3].

    Args:
      data, size, seed, max_pixels: as for `train_crop`.
      augmentation: one of `AUGMENTATIONS`: "random_resized_crop" (`train_crop`) or
        "random_square_crop" (`random_square_crop`).
      crop_scale: the random resized crop's range of the kept area (unused by the square crop).
    """
    if augmentation == "random_resized_crop":
        return train_crop(data, size, seed, crop_scale, max_pixels)
    if augmentation == "random_square_crop":
        return random_square_crop(data, size, seed, max_pixels)
    raise ValueError(f"unknown augmentation {augmentation!r}; choose one of {AUGMENTATIONS}")


def train_image(
    data: tf.Tensor, size: int, seed: tf.Tensor, scale: tuple[float, float], max_pixels: int
) -> tf.Tensor:
    """`train_crop`, normalised: float32 [size, size, 3]."""
    return normalize(train_crop(data, size, seed, scale, max_pixels))
