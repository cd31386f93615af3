"""Image preprocessing without TensorFlow: equal to open_clip's and OpenAI's torchvision transforms
(bit for bit), on images of awkward sizes and modes. And the training crops of the input pipeline
(TensorFlow ops): the CLIP paper's random square crop, and the default random resized crop."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import clip_jax
from clip_jax.data import image_ops
from clip_jax.data.preprocess import CLIP_MEAN, CLIP_STD, preprocess
from clip_jax.infra.errors import UsageError

# (width, height): landscape, portrait, smaller than S, exactly S, odd margins, much larger.
SIZES = [(300, 200), (150, 401), (100, 80), (224, 224), (225, 224), (224, 301), (640, 427)]


def noise_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def smooth_image(w, h, seed=0):
    """A photo-like image (smooth gradients), so resampling differences would show."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin((x + y + seed) / 17.0)], -1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def openai_transform(n_px):
    """OpenAI's clip.clip._transform, written out with torchvision."""
    from torchvision.transforms import (
        CenterCrop,
        Compose,
        InterpolationMode,
        Normalize,
        Resize,
        ToTensor,
    )

    return Compose(
        [
            Resize(n_px, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(n_px),
            lambda image: image.convert("RGB"),
            ToTensor(),
            Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


@pytest.mark.parametrize("reference", ["open_clip", "openai"])
@pytest.mark.parametrize("image_size", [224, 288, 336])
def test_equals_the_torchvision_transforms(reference, image_size):
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("torchvision")
    if reference == "open_clip":
        transform = open_clip.image_transform(image_size, is_train=False)
    else:
        transform = openai_transform(image_size)
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    images += [smooth_image(w, h) for w, h in SIZES[:3]]
    images += [
        noise_image(97, 130, "L"),
        noise_image(260, 190, "RGBA"),
        noise_image(50, 70, "RGBA"),
    ]
    images += [noise_image(120, 90).convert("P")]
    expected = np.stack([transform(im).numpy().transpose(1, 2, 0) for im in images])
    got = preprocess(images, image_size)
    assert got.dtype == np.float32 and got.shape == (len(images), image_size, image_size, 3)
    np.testing.assert_array_equal(got, expected)


def test_pixel_statistics_follow_the_weights():
    open_clip = pytest.importorskip("open_clip")
    transform = open_clip.image_transform(224, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    image = noise_image(300, 240)
    expected = transform(image).numpy().transpose(1, 2, 0)
    np.testing.assert_array_equal(
        preprocess(image, 224, mean=(0.5,) * 3, std=(0.5,) * 3)[0], expected
    )


def test_shapes_dtype_and_input_kinds():
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    batch = preprocess(images, 64)
    assert batch.dtype == np.float32 and batch.shape == (len(SIZES), 64, 64, 3)
    one = preprocess(images[0], 64)
    assert one.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(one[0], batch[0])
    # uint8 arrays give what the same PIL images give: one [H, W, 3], a batch, or a list.
    arrays = [np.asarray(im) for im in images]
    np.testing.assert_array_equal(preprocess(arrays[1], 64), batch[1:2])
    np.testing.assert_array_equal(preprocess(arrays, 64), batch)
    same_size = np.stack(
        [np.asarray(noise_image(90, 70, seed=s)) for s in range(3)]
    )  # [3, 70, 90, 3]
    expected = preprocess([Image.fromarray(a) for a in same_size], 32)
    np.testing.assert_array_equal(preprocess(same_size, 32), expected)
    assert clip_jax.preprocess is preprocess


def test_grayscale_and_rgba_become_rgb():
    gray = noise_image(80, 60, "L")
    out = preprocess(gray, 32)
    assert out.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(out, preprocess(gray.convert("RGB"), 32))
    np.testing.assert_array_equal(preprocess(np.asarray(gray), 32), out)  # [H, W]
    np.testing.assert_array_equal(preprocess(np.asarray(gray)[..., None], 32), out)  # [H, W, 1]
    # All three channels carry the same grey level.
    pixels = out * np.asarray(CLIP_STD, np.float32) + np.asarray(CLIP_MEAN, np.float32)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-6)
    rgba = noise_image(80, 60, "RGBA")
    assert preprocess(rgba, 32).shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(preprocess(np.asarray(rgba), 32), preprocess(rgba, 32))
    opaque = rgba.copy()
    opaque.putalpha(255)
    np.testing.assert_array_equal(preprocess(opaque, 32), preprocess(opaque.convert("RGB"), 32))


def test_values_and_center_crop_rounding():
    # A constant colour: exactly ((v / 255) - mean) / std everywhere.
    flat = Image.new("RGB", (50, 40), (128, 64, 255))
    expected = (np.float32([128, 64, 255]) / np.float32(255) - np.float32(CLIP_MEAN)) / np.float32(
        CLIP_STD
    )
    np.testing.assert_array_equal(preprocess(flat, 16), np.broadcast_to(expected, (1, 16, 16, 3)))
    # Rows numbered by their index; the short side is already S, so only the crop acts.
    # torchvision's top = int(round((h - S) / 2.0)) rounds half to even: 77/2 -> 38, 79/2 -> 40.
    for height, top in [(300, 38), (301, 38), (303, 40)]:
        rows = np.repeat(np.arange(height, dtype=np.uint8)[:, None], 224, axis=1)
        out = preprocess(rows, 224)[0, :, 0, 0] * CLIP_STD[0] + CLIP_MEAN[0]
        np.testing.assert_allclose(out * 255, (np.arange(224) + top) % 256, atol=1e-3)


def test_bad_inputs_are_usage_errors():
    with pytest.raises(UsageError, match="uint8 arrays"):
        preprocess(np.zeros((8, 8, 3), np.float32), 8)
    with pytest.raises(UsageError, match="got shape"):
        preprocess(np.zeros((8, 8, 5), np.uint8), 8)
    with pytest.raises(UsageError, match="no images"):
        preprocess([], 8)


# --- Training crops (clip_jax.data.crops, through image_ops.augment) --------------------------


def png(image: Image.Image) -> tf.Tensor:
    out = io.BytesIO()
    image.save(out, "PNG")
    return tf.constant(out.getvalue())


def shorter_side_resized(data: tf.Tensor, size: int) -> np.ndarray:
    """What the square crop cuts from: PIL's bicubic resize of the shorter side to `size`, the
    longer truncated as torchvision's Resize(int)."""
    image = Image.open(io.BytesIO(data.numpy())).convert("RGB")
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new = (size, new_long) if w <= h else (new_long, size)
    return np.asarray(image.resize(new, Image.Resampling.BICUBIC))


def augment(data: tf.Tensor, size: int, seed: int, augmentation: str, scale=(0.9, 1.0)):
    return image_ops.augment(
        data,
        size,
        tf.constant([seed, 3], tf.int64),
        augmentation=augmentation,
        crop_scale=scale,
    ).numpy()


def square_crop(data: tf.Tensor, size: int, seed: int) -> np.ndarray:
    return augment(data, size, seed, "random_square_crop")


def window_offsets(crop: np.ndarray, image: np.ndarray) -> list[tuple[int, int]]:
    """Every (top, left) at which `crop` is a window of `image`, pixel for pixel."""
    s = crop.shape[0]
    return [
        (top, left)
        for top in range(image.shape[0] - s + 1)
        for left in range(image.shape[1] - s + 1)
        if np.array_equal(image[top : top + s, left : left + s], crop)
    ]


# Landscape, portrait, smaller than S (upsampled), exactly S on its shorter side, square, 3:1.
CROP_SIZES = [(300, 200), (150, 401), (40, 30), (96, 64), (64, 64), (192, 64)]


@pytest.mark.parametrize("width,height", CROP_SIZES)
def test_square_crop_is_a_window_of_the_shorter_side_resized_image(width, height):
    data = png(noise_image(width, height, seed=width))
    resized = shorter_side_resized(data, 64)
    assert min(resized.shape[:2]) == 64
    for seed in range(3):
        crop = square_crop(data, 64, seed)
        assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
        assert len(window_offsets(crop, resized)) == 1, (seed, resized.shape)


def test_square_crop_varies_with_the_seed_and_is_a_function_of_it():
    data = png(noise_image(192, 64))  # already S on the shorter side: 129 places along the width
    resized = shorter_side_resized(data, 64)
    offsets = [window_offsets(square_crop(data, 64, seed), resized)[0] for seed in range(12)]
    assert {top for top, _ in offsets} == {0}
    assert len({left for _, left in offsets}) >= 8
    np.testing.assert_array_equal(square_crop(data, 64, 5), square_crop(data, 64, 5))


def test_square_crop_keeps_the_whole_shorter_side():
    """Unlike the resized crop, nothing is resampled after the crop: a portrait's rows are cut,
    never its width, so every column of the resized image is in every crop."""
    data = png(noise_image(64, 200))
    resized = shorter_side_resized(data, 64)
    assert resized.shape[1] == 64
    for seed in range(4):
        ((_, left),) = window_offsets(square_crop(data, 64, seed), resized)
        assert left == 0


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.3, 0.6)])
def test_random_resized_crop_is_pils_bicubic_resize_of_the_window(scale):
    """The window of `crop_scale` of the area, from the example's seed, resized by PIL as
    open_clip's RandomResizedCrop resizes on PIL images; the same seed, the same crop."""
    from clip_jax.data import crops

    image = smooth_image(300, 200)
    data = png(image)
    for seed in range(3):
        key = tf.constant([seed, 3], tf.int64)
        u = tf.random.stateless_uniform([4], seed=key).numpy()
        left, top, w, h = crops.window(300, 200, u, scale)
        assert 0.8 * scale[0] <= w * h / 60000 <= scale[1] * 1.01
        want = image.resize((48, 48), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        got = augment(data, 48, seed, "random_resized_crop", scale)
        np.testing.assert_array_equal(got, np.asarray(want))
        np.testing.assert_array_equal(got, augment(data, 48, seed, "random_resized_crop", scale))


def test_unknown_augmentation_is_refused():
    with pytest.raises(ValueError, match="unknown augmentation 'mixup'"):
        augment(png(noise_image(40, 40)), 16, 0, "mixup")


def test_jpeg_crops_decode_at_reduced_scale_and_stay_close_to_full_decoding():
    """A JPEG whose window is at least twice the output size is decoded at 1/2, 1/4 or 1/8 scale
    (never below the output size): the same window, 1-3 levels from full decoding on average on a
    textured photo (china.jpg: 2.9 at worst, for a window 2.1x the output). Below twice the
    size, nothing changes."""
    import sklearn.datasets

    from clip_jax.data import crops

    photo = Image.open(f"{sklearn.datasets.__path__[0]}/images/china.jpg")  # 640 x 427
    for size, width, scaled in (
        (64, 640, True),
        (200, 640, True),
        (96, 1280, True),
        (224, 300, False),
    ):
        out = io.BytesIO()
        photo.resize((width, width * 427 // 640)).save(out, "JPEG", quality=90)
        data = out.getvalue()
        full = Image.open(io.BytesIO(data)).convert("RGB")
        for seed in range(3):
            u = tf.random.stateless_uniform([4], seed=tf.constant([seed, 3], tf.int64)).numpy()
            left, top, w, h = crops.window(*full.size, u, (0.9, 1.0))
            want = np.asarray(
                full.resize(
                    (size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)
                )
            ).astype(np.float64)
            got = augment(tf.constant(data), size, seed, "random_resized_crop")
            if scaled:
                assert 0 < np.abs(got - want).mean() < 3.5, (size, width, seed)
            else:
                np.testing.assert_array_equal(got, want)


# --- Evaluation's pixels from files (clip_jax.evals.data) ------------------------------------


def photo_files(directory) -> list[str]:
    """Real photos that ship with the test dependencies, in the forms evaluation sets hold them:
    shrunk 1-5x, upscaled 8x from 28 px, near-identity, grayscale, RGBA and palette PNGs, a very
    wide panorama, CMYK; one class folder each."""
    import os

    import matplotlib
    import sklearn.datasets

    sources = [
        os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", "china.jpg"),
        os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", "flower.jpg"),
        os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"),
    ]
    photos = [Image.open(p).convert("RGB") for p in sources]
    os.makedirs(directory / "photos", exist_ok=True)
    out = []

    def save(image, name, **kw):
        path = str(directory / "photos" / name)
        image.save(path, **kw)
        out.append(path)

    for i, photo in enumerate(photos):
        w, h = photo.size
        save(Image.open(sources[i]), f"{i}_original.jpg")  # the file itself, not re-encoded
        for k, scale in enumerate((1.0, 0.45, 0.2)):
            small = photo.resize((max(1, int(w * scale)), max(1, int(h * scale))))
            save(small, f"{i}_scale{k}.jpg", quality=90)
        save(photo.resize((225, 231)), f"{i}_near.jpg", quality=95)
        save(photo.resize((28, 28)), f"{i}_tiny.png")  # 8x upscaling
        save(photo.convert("L"), f"{i}_gray.jpg", quality=90)
    rgba = photos[0].resize((300, 200)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((300, 200)))
    save(rgba, "rgba.png")
    save(photos[1].resize((260, 190)).convert("P", palette=Image.Palette.ADAPTIVE), "palette.png")
    save(photos[2].resize((1200, 120)), "wide.jpg", quality=90)
    save(photos[0].resize((320, 240)).convert("CMYK"), "cmyk.jpg", quality=90)
    return out


@pytest.mark.parametrize(
    "resize_mode,interpolation",
    [
        ("shortest", "bicubic"),
        ("longest", "bicubic"),
        ("squash", "bilinear"),
        ("shortest", "bilinear"),
    ],
)
def test_eval_pixels_from_files_equal_open_clips(tmp_path, resize_mode, interpolation):
    """What the image tower sees in evaluation, through the input pipeline, is open_clip's
    `image_transform(S, is_train=False)` of `Image.open(file)`, to the pixel."""
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("sklearn")
    from clip_jax.data.preprocess import Preprocess
    from clip_jax.evals import data

    files = photo_files(tmp_path)
    size = 224
    protocol = Preprocess(size, resize_mode, interpolation, mean=(0.5,) * 3, std=(0.5,) * 3)
    transform = open_clip.image_transform(
        size,
        is_train=False,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        resize_mode=resize_mode,
        interpolation=interpolation,
    )
    source = data.open_source(f"imagefolder:{tmp_path}")
    (batch,) = list(
        data.batches(source, preprocess=protocol, global_batch=len(files), rows=slice(None))
    )
    assert batch["mask"].all()
    order = sorted(files)  # imagefolder's order
    for got, path in zip(batch["image"], order, strict=True):
        tensor = transform(Image.open(path)).numpy().transpose(1, 2, 0)
        levels = np.round((tensor * 0.5 + 0.5) * 255).astype(np.int16)
        assert np.array_equal(got.astype(np.int16), levels), path
