"""Untrusted data: decompression bombs are skipped and counted without
being decoded; data preparation keeps to the CSV's folder."""

import io
import json
import struct
import time
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from clip_jax.data import crops, image_ops, prepare, readers, tfdata, tokenizers
from clip_jax.data.preprocess import AUGMENTATIONS, Preprocess

MAX_PIXELS = image_ops.MAX_IMAGE_PIXELS


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 8-bit greyscale PNG of zeros: ~390 KB that decode to width x height x 3 bytes.

    The zlib stream repeats one fully flushed block (a full flush resets the compressor, so the
    block's bytes are the same each time): built in a fraction of a second, not a full deflate.
    """
    rows_per_block = 400
    assert height % rows_per_block == 0
    block_rows = b"\0" * ((width + 1) * rows_per_block)  # filter byte 0 + a row of zeros
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: we add zlib's wrapper
    block = compressor.compress(block_rows) + compressor.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(height // rows_per_block):
        adler = zlib.adler32(block_rows, adler)
    stream = b"\x78\xda" + block * (height // rows_per_block) + b"\x03\x00"
    stream += struct.pack(">I", adler)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")
    )


def encoded(fmt: str, height: int = 20, width: int = 30, **kw) -> bytes:
    array = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **kw)
    return out.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = png_bomb()
    assert len(data) < 500_000
    with pytest.raises(Image.DecompressionBombError, match="400000000 pixels"):
        Image.open(io.BytesIO(data))  # a real PNG, and a bomb by PIL's measure too
    return data


# ---------------------------------------------------------------------------------------------
# Decompression bombs


@pytest.mark.parametrize(
    "fmt, kw",
    [
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("PNG", {}),
        ("GIF", {}),
        ("BMP", {}),
        ("WEBP", {"lossless": False}),
        ("WEBP", {"lossless": True}),
    ],
)
def test_the_size_every_decodable_format_declares_is_read_before_decoding(fmt, kw):
    data = encoded(fmt, 37, 53, **kw)
    image = crops.open_image(data)
    assert image.size == (53, 37)
    u = np.float32([0.5, 0.5, 0.5, 0.5])
    assert crops.random_resized_crop(data, 16, u, (0.9, 1.0), MAX_PIXELS).shape == (16, 16, 3)
    with pytest.raises(ValueError, match="a 53x37 image, above max_pixels=1960"):
        crops.open_image(data, max_pixels=1960)


def test_a_group_crops_each_image_as_alone_and_flags_the_bad(bomb):
    good = [encoded(fmt, 30 + 7 * i, 41) for i, fmt in enumerate(("JPEG", "PNG", "WEBP"))]
    data = np.array([good[0], b"no image", good[1], bomb, good[2], good[0][:200]], object)
    u = np.random.default_rng(0).random((len(data), 4)).astype(np.float32)
    usable = np.array([True, True, False, True, True, True])
    for augmentation in AUGMENTATIONS:
        kw = dict(augmentation=augmentation, crop_scale=(0.5, 1.0))
        images, done = image_ops.augment_group(
            tf.constant(data.tolist()), tf.constant(u), tf.constant(usable), 16, **kw
        )
        assert done.numpy().tolist() == [True, False, False, False, True, False]
        for i in (0, 4):
            alone = crops.augment(
                data[i],
                u[i],
                size=16,
                scale=(0.5, 1.0),
                max_pixels=MAX_PIXELS,
                augmentation=augmentation,
            )
            np.testing.assert_array_equal(images[i].numpy(), alone)
        assert not images.numpy()[~done.numpy()].any()  # rows without a crop hold zeros


def test_extended_webp_and_unknown_bytes():
    rgba = np.zeros((41, 29, 4), np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, "WEBP", exif=b"Exif\0\0")  # VP8X: extended header
    assert out.getvalue()[12:16] == b"VP8X"
    assert crops.open_image(out.getvalue()).size == (29, 41)
    for data in (b"no image", b""):
        with pytest.raises(OSError):  # PIL's UnidentifiedImageError
            crops.open_image(data)


def test_a_decompression_bomb_raises_before_it_is_decoded(bomb):
    start = time.perf_counter()
    seed = tf.constant([1, 2], tf.int64)
    for augmentation in AUGMENTATIONS:  # training's crops (eagerly: the error itself)
        with pytest.raises((ValueError, tf.errors.OpError), match="above max_pixels"):
            image_ops.augment(
                tf.constant(bomb), 16, seed, augmentation=augmentation, crop_scale=(0.9, 1.0)
            )
    with pytest.raises(ValueError, match="above max_pixels"):
        Preprocess(16).decode(bomb)  # evaluation's transform
    # Decoding would take seconds (and 1.2 GB); reading the header takes milliseconds.
    assert time.perf_counter() - start < 1.0
    small = encoded("PNG", 20, 30)
    assert Preprocess(16).decode(small, max_pixels=600).shape == (16, 16, 3)
    with pytest.raises(ValueError, match="above max_pixels"):
        Preprocess(16).decode(small, max_pixels=599)
    with pytest.raises(ValueError, match="a 30x20 image, above max_pixels=599"):
        crops.random_square_crop(small, 16, np.zeros(4, np.float32), max_pixels=599)


def test_prepare_skips_images_above_the_pixel_limit_before_decoding(tmp_path, bomb):
    mild = png_bomb(9600, 9600)  # 92 M pixels: above the limit, below PIL's own error (179 M)
    for data in (mild, bomb):
        start = time.perf_counter()
        with pytest.raises(ValueError, match="^image above the pixel limit$"):
            prepare.to_jpeg(data)
        assert time.perf_counter() - start < 1.0
    folder = tmp_path / "images"
    folder.mkdir()
    for name, data in {"a.png": mild, "b.png": bomb, "c.jpg": encoded("JPEG")}.items():
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text(f"caption of {name}")
    out = tmp_path / "out"
    assert prepare.main(["--input", str(folder), "--output", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == 1 and stats["skipped_reasons"] == {"image above the pixel limit": 2}


def write_shards(path, images: list[bytes]) -> str:
    with prepare.ShardWriter(str(path), "part", shard_size=100) as writer:
        for i, data in enumerate(images):
            writer.write(prepare.make_example(data, f"caption {i}", f"{i:09d}"))
    return str(path / "part-*.tfrecord")


def make_source(pattern: str, max_image_pixels: int = MAX_PIXELS) -> tfdata.TFDataSource:
    reader = readers.TFRecordReader(
        pattern,
        image_key="jpg",
        text_key="txt",
        seed=0,
        shuffle_buffer=1,
        process_index=0,
        process_count=1,
    )
    return tfdata.TFDataSource(
        [reader],
        tokenizer=tokenizers.get_tokenizer("clip_bpe", 8),
        seed=0,
        image_size=8,
        context_length=8,
        augmentation="random_resized_crop",
        weights=[1.0],
        crop_scale=(0.9, 1.0),
        process_index=0,
        max_image_pixels=max_image_pixels,
    )


def test_training_skips_and_counts_a_bomb_without_decoding_it(tmp_path, bomb):
    good = [encoded("JPEG"), encoded("PNG"), encoded("JPEG")]
    pattern = write_shards(tmp_path, [good[0], bomb, good[1], good[2]])
    source = make_source(pattern)
    start = time.perf_counter()
    batch, state = next(source.batches(3, slice(0, 3)))
    assert batch["image"].shape == (3, 8, 8, 3)
    assert source.skipped_examples == 1 and state["skipped_examples"] == 1
    assert time.perf_counter() - start < 20  # the pipeline's start-up; a decode adds ~7 s a bomb


def test_the_pixel_limit_is_an_argument(tmp_path):
    pattern = write_shards(tmp_path, [encoded("PNG", 20, 30), encoded("PNG", 40, 60)] * 2)
    source = make_source(pattern, max_image_pixels=20 * 30)
    _, state = next(source.batches(2, slice(0, 2)))
    assert state["skipped_examples"] == 1  # the first 40 x 60 image, before the second 20 x 30
    with pytest.raises(ValueError, match="max_image_pixels=0"):
        make_source(pattern, max_image_pixels=0)


# ---------------------------------------------------------------------------------------------
# Data preparation keeps to the CSV's folder


@pytest.fixture
def table_with_escapes(tmp_path):
    """A CSV whose rows name a file inside its folder, and the same secret outside it five ways."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(encoded("JPEG"))
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "a.jpg").write_bytes(encoded("JPEG"))
    (data / "images" / "link.jpg").symlink_to(outside / "secret.jpg")
    (data / "images" / "dirlink").symlink_to(outside)
    table = data / "pairs.csv"
    table.write_text(
        "path,caption\n"
        "images/a.jpg,inside\n"
        f"{data / 'images' / 'a.jpg'},inside by an absolute path\n"
        "images/../images/a.jpg,inside after normalising\n"
        f"{outside / 'secret.jpg'},absolute\n"
        "../outside/secret.jpg,a parent escape\n"
        "images/../../outside/secret.jpg,a deeper escape\n"
        "images/link.jpg,a symlink out\n"
        "images/dirlink/secret.jpg,a folder symlink out\n"
    )
    return table


def test_a_csv_cannot_reach_outside_its_folder(table_with_escapes, tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare.main(["--input", str(table_with_escapes), "--output", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == 3
    assert stats["skipped_reasons"] == {"outside the table's folder": 5}
    printed = capsys.readouterr().out
    assert "5 paths outside" in printed and "--allow_outside_paths" in printed


def test_allow_outside_paths_reads_them(table_with_escapes, tmp_path):
    out = tmp_path / "out"
    argv = ["--input", str(table_with_escapes), "--output", str(out), "--allow_outside_paths"]
    assert prepare.main(argv) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == 8 and stats["skipped"] == 0
