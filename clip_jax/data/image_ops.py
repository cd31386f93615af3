"""Training images inside the tf.data graph: the crop (`augment`, PIL's work in `crops`, run
through `tf.numpy_function` with draws made from the example's seed; `augment_group` crops k
examples in one call, as the training pipeline does). The pixels stay uint8;
the train step normalises them on the device (`preprocess.normalize`). Evaluation's pixels are
`preprocess.Preprocess`'s.
"""

import functools

import tensorflow as tf

from clip_jax.data import crops
from clip_jax.data.preprocess import AUGMENTATIONS, MAX_IMAGE_PIXELS


def _bound(fn, size: int, augmentation: str, crop_scale, max_pixels: int):
    """`crops.augment` or `crops.augment_group` with its settings bound, checked."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}; choose one of {AUGMENTATIONS}")
    return functools.partial(
        fn,
        size=size,
        augmentation=augmentation,
        scale=tuple(float(s) for s in crop_scale),
        max_pixels=int(max_pixels),
    )


def augment(
    data: tf.Tensor,
    size: int,
    seed: tf.Tensor,
    *,
    augmentation: str,
    crop_scale: tuple[float, float],
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tf.Tensor:
    """Encoded bytes -> a training crop: uint8 [size, size, 3] (`crops.augment`).

    Args:
      data: scalar tf.string, encoded image bytes.
      size: output resolution.
      seed: int [2] stateless seed: the crop is a pure function of the bytes and the seed.
      augmentation: one of `AUGMENTATIONS`, "random_resized_crop" or "random_square_crop".
      crop_scale: the random resized crop's range of the kept area (unused by the square crop).
      max_pixels: larger images (by their header) raise instead of being decoded.
    """
    fn = _bound(crops.augment, size, augmentation, crop_scale, max_pixels)
    image = tf.numpy_function(fn, [data, draws(seed)], tf.uint8, stateful=False)
    image.set_shape([size, size, 3])
    return image


def draws(seed: tf.Tensor) -> tf.Tensor:
    """The four uniform draws in [0, 1) a crop takes (area, aspect, top, left) from an example's
    stateless seed (int [2])."""
    return tf.random.stateless_uniform([4], seed=seed)


def augment_group(
    data: tf.Tensor,
    u: tf.Tensor,
    usable: tf.Tensor,
    size: int,
    *,
    augmentation: str,
    crop_scale: tuple[float, float],
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[tf.Tensor, tf.Tensor]:
    """`augment` of k examples in one Python call (`crops.augment_group`).

    Args:
      data: tf.string [k], encoded image bytes.
      u: float32 [k, 4], each example's `draws`.
      usable: bool [k]; only these are decoded.
      size, augmentation, crop_scale, max_pixels: as `augment`'s.
    Returns:
      (uint8 [k, size, size, 3], bool [k]): the crops (equal to `augment`'s, example by example)
      and which examples have one (usable, and decoded without an error).
    """
    fn = _bound(crops.augment_group, size, augmentation, crop_scale, max_pixels)
    images, done = tf.numpy_function(fn, [data, u, usable], (tf.uint8, tf.bool), stateful=False)
    images.set_shape([None, size, size, 3])
    done.set_shape([None])
    return images, done
