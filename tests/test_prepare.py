"""Writing shards: `prepare` from a folder and from a CSV (bad items skipped with a reason), its
argument errors, and the digits demo dataset."""

import io
import json
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from clip_jax.data import digits, prepare, tokenizers
from tests.conftest import open_train_source, train_data_config


def image_bytes(fmt: str, seed: int = 0, mode: str = "RGB") -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(array[..., : len(mode)] if mode != "L" else array[..., 0], mode).save(out, fmt)
    return out.getvalue()


def read_records(pattern: str) -> list[dict]:
    """Every record of the shards matching `pattern`, as {feature: first value}."""
    records = []
    for raw in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern))):
        example = tf.train.Example.FromString(raw.numpy())
        row = {}
        for key, feature in example.features.feature.items():
            kind = feature.WhichOneof("kind")
            row[key] = getattr(feature, kind).value[0]
        records.append(row)
    return records


@pytest.fixture
def folder(tmp_path):
    """Five images with sidecar captions: two good, a PNG with alpha, a corrupt one, one without
    a caption file, one with an empty caption and one with a non-UTF-8 caption."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    files = {
        "a.jpg": (image_bytes("JPEG", 1), b"a red kite over the sea"),
        "sub/b.png": (image_bytes("PNG", 2, "RGBA"), b"a transparent png"),
        "c.jpg": (image_bytes("JPEG", 3)[:200], b"a truncated jpeg"),
        "d.webp": (image_bytes("WEBP", 4), None),
        "e.jpg": (image_bytes("JPEG", 5), b"  \n"),
        "f.jpg": (image_bytes("JPEG", 6, "L"), b"caf\xe9 cr\xe8me"),
    }
    for name, (data, caption) in files.items():
        (root / name).write_bytes(data)
        if caption is not None:
            (root / name).with_suffix(".txt").write_bytes(caption)
    return root


def test_a_folder_becomes_shards_the_tfrecord_source_reads(folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = prepare.main(["--input", str(folder), f"--output={out}", "--shard_size", "2"])
    assert code == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == 3 and stats["shards"] == 2 and stats["repaired_captions"] == 1
    assert stats["skipped_reasons"] == {
        "empty caption": 1,
        "no caption file": 1,
        "unreadable image (OSError)": 1,
    }
    printed = capsys.readouterr()
    assert "wrote 3 examples in 2 shards" in printed.out and "prepare: 6/6" in printed.err
    records = read_records(str(out / "part-*.tfrecord"))
    captions = [r["txt"].decode() for r in records]
    assert captions == ["a red kite over the sea", "caf\ufffd cr\ufffdme", "a transparent png"]
    for r in records:
        image = tf.io.decode_jpeg(r["jpg"]).numpy()
        assert image.shape[:2] == (20, 30)
    assert records[0]["jpg"] == (folder / "a.jpg").read_bytes()  # JPEGs are kept as they are

    cfg = train_data_config(source=f"tfrecord:{out}/part-*.tfrecord")
    source = open_train_source(cfg, tokenizer=tokenizers.get_tokenizer("clip_bpe", 8))
    batch, state = next(source.batches(3, slice(0, 3)))
    assert batch["image"].shape == (3, 8, 8, 3) and source.skipped_examples == 0


def test_a_csv_with_a_header_and_resizing(folder, tmp_path):
    table = tmp_path / "pairs.csv"
    table.write_text(
        "caption,filepath\n"
        '"a kite, flying",images/a.jpg\n'
        "a png,images/sub/b.png\n"
        "a missing file,images/nope.jpg\n"
    )
    out = tmp_path / "out"
    assert prepare.main(["--input", str(table), "--output", str(out), "--image_size", "10"]) == 0
    records = read_records(str(out / "*.tfrecord"))
    assert [r["txt"] for r in records] == [b"a kite, flying", b"a png"]
    assert tf.io.decode_jpeg(records[0]["jpg"]).shape == (10, 15, 3)  # shorter side 10
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped_reasons"] == {"missing image file": 1}


def test_bad_arguments_are_one_line_and_exit_2(tmp_path, folder, capsys):
    cases = [
        (["--input", str(tmp_path / "missing")], "--output is required"),
        (["--input", str(tmp_path / "missing"), "--output", "x"], "does not exist"),
        (["--input", str(folder), "--output", "x", "--shard_size", "0"], "--shard_size=0"),
        (["--input", str(folder), "--output", "x", "--shard_size", "many"], "invalid literal"),
        (["--inptu", str(folder)], "Unknown command line flag 'inptu'"),
        (["--input", str(folder), "--output", "x", "extra"], "unexpected arguments: extra"),
    ]
    for argv, message in cases:
        assert prepare.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    (tmp_path / "empty").mkdir()
    assert prepare.main(["--input", str(tmp_path / "empty"), "--output", "x"]) == 2
    out = tmp_path / "out"
    assert prepare.main(["--input", str(folder), "--output", str(out)]) == 0
    assert prepare.main(["--input", str(folder), "--output", str(out)]) == 2
    assert "already holds .tfrecord shards" in capsys.readouterr().err


def test_digits_become_captioned_train_and_test_shards(tmp_path):
    pytest.importorskip("sklearn")
    assert digits.main(["--output", str(tmp_path), "--image_size", "16"]) == 0
    train = read_records(str(tmp_path / "train-*.tfrecord"))
    test = read_records(str(tmp_path / "test-*.tfrecord"))
    assert len(train) == 1497 and len(test) == 300
    assert not {r["key"] for r in train} & {r["key"] for r in test}
    names = (tmp_path / "classnames.txt").read_text().split()
    assert names == list(digits.CLASS_NAMES)
    for r in train[:50] + test[:50]:
        caption, label = r["txt"].decode(), r["label"]
        words = re.findall(r"\w+", caption)
        assert names[label] in words or str(label) in words, caption
        image = tf.io.decode_jpeg(r["jpg"]).numpy()
        assert image.shape == (16, 16, 3) and image.min() < 100 < image.max()
    assert len({r["txt"] for r in train}) > 50  # varied templates
    assert sorted({r["label"] for r in test}) == list(range(10))
