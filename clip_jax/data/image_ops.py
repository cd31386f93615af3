"""Training images inside the tf.data graph: the crop (`augment`, PIL's work in `crops`, run
through `tf.numpy_function` with draws made from the example's seed). The pixels stay uint8;
the train step normalises them on the device (`preprocess.normalize`). Evaluation's pixels are
`preprocess.Preprocess`'s.
"""

import functools

import tensorflow as tf

from clip_jax.data import crops
from clip_jax.data.preprocess import AUGMENTATIONS, MAX_IMAGE_PIXELS


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
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}; choose one of {AUGMENTATIONS}")
    u = tf.random.stateless_uniform([4], seed=seed)
    fn = functools.partial(
        crops.augment,
        size=size,
        augmentation=augmentation,
        scale=tuple(float(s) for s in crop_scale),
        max_pixels=int(max_pixels),
    )
    image = tf.numpy_function(fn, [data, u], tf.uint8, stateful=False)
    image.set_shape([size, size, 3])
    return image
