"""Evaluation data: every example exactly once over simulated processes, padding, masks and exact
resume; undecodable images; imagefolder; captions grouped by image id; tfds labels and captions;
and the errors of each source."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import clip_jax
from clip_jax.data.prepare import ShardWriter, make_example
from clip_jax.data.preprocess import Preprocess
from clip_jax.evals import data
from clip_jax.evals.retrieval import group_captions

SIZE, CROP, BATCH, LENGTH = 16, 8, 8, 16  # stored pixels, eval crop, global batch, tokens
N = 37  # 5 batches of 8, the last one with 5 real rows
LEVELS = (0, 85, 170, 255)  # far apart: a decoded JPEG is off by a few levels at most
BAD = {2: "truncated_jpeg", 3: "not_an_image", 20: "truncated_png", 36: "not_an_image"}


def colour(i: int) -> tuple[int, int, int]:
    """The solid colour of example `i` (64 distinct ones)."""
    return LEVELS[i % 4], LEVELS[i // 4 % 4], LEVELS[i // 16 % 4]


def encode(rgb: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), rgb).save(out, fmt)
    return out.getvalue()


def identify(image: np.ndarray) -> int:
    """A decoded crop [S, S, 3] -> the example whose colour is at its centre."""
    centre = image[CROP // 2, CROP // 2].astype(int)
    errors = [int(np.abs(centre - colour(i)).max()) for i in range(len(LEVELS) ** 3)]
    i = int(np.argmin(errors))
    assert errors[i] < 20, f"no example has colour {centre}"
    return i


def label_of(i: int) -> int:
    return (7 * i) % 5


def bad_image(kind: str) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, "JPEG" if kind == "truncated_jpeg" else "PNG")
    full = out.getvalue()
    return b"this is not an image" if kind == "not_an_image" else full[: len(full) // 2]


def write_records(directory, records: list[bytes], shard_size: int = 10) -> str:
    with ShardWriter(str(directory), shard_size=shard_size) as w:
        for r in records:
            w.write(r)
    return f"tfrecord:{directory}/part-*.tfrecord"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> str:
    """N labelled images over 4 shards, JPEG and PNG alternating."""
    records = [
        make_example(encode(colour(i), "JPEG" if i % 2 else "PNG"), "", f"{i}", label=label_of(i))
        for i in range(N)
    ]
    return write_records(tmp_path_factory.mktemp("labelled"), records)


@pytest.fixture(scope="module")
def with_bad(tmp_path_factory) -> str:
    """As `labelled`, with undecodable images at the positions of BAD (two in one process's rows
    of batch 0, and the very last record)."""
    records = [
        make_example(
            bad_image(BAD[i]) if i in BAD else encode(colour(i), "JPEG"), "", f"{i}", label_of(i)
        )
        for i in range(N)
    ]
    return write_records(tmp_path_factory.mktemp("bad"), records)


def rows_of(p: int, processes: int) -> slice:
    per = BATCH // processes
    return slice(p * per, (p + 1) * per)


def read(source: data.EvalSource, rows: slice = slice(0, BATCH), **kw) -> tuple[list, dict]:
    stats: dict[str, int] = {}
    out = list(
        data.batches(
            source, preprocess=Preprocess(CROP), global_batch=BATCH, rows=rows, stats=stats, **kw
        )
    )
    return out, stats


def real(batches: list[dict]) -> dict[str, np.ndarray]:
    """The masked-in rows of `batches`, concatenated (what extract.run keeps)."""
    return {k: np.concatenate([b[k][b["mask"]] for b in batches]) for k in batches[0]}


# --- tfrecord: labels, padding, processes, resume ------------------------------------------------


def test_every_example_once_with_its_label_and_the_last_batch_padded(labelled):
    source = data.open_source(labelled)
    assert (source.num_examples, source.has_labels, source.classnames) == (N, True, None)
    batches, stats = read(source)
    assert len(batches) == data.num_batches(N, BATCH) == 5
    for k, b in enumerate(batches):
        assert b["image"].shape == (BATCH, CROP, CROP, 3) and b["image"].dtype == np.uint8
        assert b["mask"].dtype == bool
        assert b["index"].dtype == np.int32 and b["label"].dtype == np.int32
        np.testing.assert_array_equal(b["index"], np.arange(k * BATCH, (k + 1) * BATCH))
        np.testing.assert_array_equal(b["mask"], b["index"] < N)
    last = batches[-1]
    assert last["mask"].sum() == N % BATCH
    assert (last["label"][~last["mask"]] == -1).all() and not last["image"][~last["mask"]].any()
    got = real(batches)
    np.testing.assert_array_equal(got["index"], np.arange(N))
    assert [identify(im) for im in got["image"]] == list(range(N))
    assert got["label"].tolist() == [label_of(i) for i in range(N)]
    assert stats == {"skipped": 0, "dropped_captions": 0}


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_split_every_batch_and_cover_the_data_once(labelled, processes):
    source = data.open_source(labelled)
    whole, _ = read(source)
    parts = [read(source, rows_of(p, processes))[0] for p in range(processes)]
    assert [len(p) for p in parts] == [data.num_batches(N, BATCH)] * processes
    seen = []
    for batches in parts:
        for b in batches:
            assert b["image"].shape[0] == BATCH // processes
        got = real(batches)
        assert [identify(im) for im in got["image"]] == got["index"].tolist()
        assert got["label"].tolist() == [label_of(i) for i in got["index"]]
        seen += got["index"].tolist()
    assert sorted(seen) == list(range(N)) and len(set(seen)) == N
    if processes == 4:  # rows 6..8 of the last batch are 38, 39: past the data, all padding
        assert not parts[3][-1]["mask"].any()
    for k, b in enumerate(whole):  # the processes' rows side by side are the whole batch
        for key in b:
            np.testing.assert_array_equal(np.concatenate([p[k][key] for p in parts]), b[key])


@pytest.mark.parametrize("start,rows", [(1, slice(0, 8)), (3, slice(4, 8)), (4, slice(6, 8))])
def test_start_resumes_at_a_global_batch(labelled, start, rows):
    source = data.open_source(labelled)
    whole, _ = read(source, rows)
    resumed, _ = read(source, rows, start=start)
    assert len(resumed) == len(whole) - start
    for a, b in zip(whole[start:], resumed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert read(source, rows, start=5)[0] == []  # past the end: nothing left


# --- Undecodable images ------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_undecodable_images_are_masked_and_counted(with_bad, processes):
    source = data.open_source(with_bad)
    assert source.num_examples == N
    seen, skipped = [], 0
    for p in range(processes):
        batches, stats = read(source, rows_of(p, processes))
        assert len(batches) == data.num_batches(N, BATCH)
        for b in batches:
            bad = np.isin(b["index"], list(BAD))
            assert not b["mask"][bad].any() and (b["label"][bad] == -1).all()
        got = real(batches)
        assert [identify(im) for im in got["image"]] == got["index"].tolist()
        assert got["label"].tolist() == [label_of(i) for i in got["index"]]
        seen += got["index"].tolist()
        skipped += stats["skipped"]
    assert sorted(seen) == sorted(set(range(N)) - set(BAD))
    assert skipped == len(BAD)


# --- imagefolder -------------------------------------------------------------------------------

FOLDER = {  # class -> files (name, format); sorted class names give the labels
    "red_apple": [("b.png", "PNG"), ("a.JPEG", "JPEG")],
    "banana": [("x.jpg", "JPEG"), ("notes.txt", None)],
    "cherry_tomato_x": [("c.jpeg", "JPEG"), ("d.PNG", "PNG"), ("e.Jpg", "JPEG")],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    (root / "README.txt").write_text("not a class")
    expected, i = [], 0  # (colour index, label) in the order the source reads them
    for label, name in enumerate(sorted(FOLDER)):
        (root / name).mkdir()
        for file, fmt in sorted(FOLDER[name]):
            if fmt is None:
                (root / name / file).write_text("a note, not an image")
                continue
            (root / name / file).write_bytes(encode(colour(i), fmt))
            expected.append((i, label))
            i += 1
    return str(root), expected


def test_imagefolder_labels_from_sorted_subfolders(folder):
    root, expected = folder
    source = data.open_source(f"imagefolder:{root}")
    assert source.classnames == ["banana", "cherry tomato x", "red apple"]
    assert source.has_labels and not source.has_captions
    assert source.num_examples == len(expected) == 6  # notes.txt and README.txt ignored
    batches, stats = read(source)
    got = real(batches)
    assert list(zip(map(identify, got["image"]), got["label"].tolist(), strict=True)) == expected
    np.testing.assert_array_equal(got["index"], np.arange(6))
    assert stats["skipped"] == 0


def test_imagefolder_errors(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=f"imagefolder:{missing}: no such directory"):
        data.open_source(f"imagefolder:{missing}")
    with pytest.raises(ValueError, match="no images in class subfolders"):
        data.open_source(f"imagefolder:{tmp_path}")
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("no images here")
    (tmp_path / "loose.png").write_bytes(encode((0, 0, 0)))  # not in a class subfolder
    with pytest.raises(ValueError, match="no images in class subfolders"):
        data.open_source(f"imagefolder:{tmp_path}")


# --- tfrecord: captions with image ids ---------------------------------------------------------

CAPTION_COUNTS = (1, 4, 2, 3, 1, 2)  # captions of images 0..5, one record each


def caption_records() -> list[tuple[int, str]]:
    """(image, caption) per record; one image's captions are scattered over the shards."""
    pairs = [
        (i, f"image {i} seen for the {j} time")
        for i, c in enumerate(CAPTION_COUNTS)
        for j in range(c)
    ]
    order = np.random.default_rng(1).permutation(len(pairs))
    return [pairs[k] for k in order]


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> str:
    records = [
        make_example(encode(colour(i), "JPEG"), text, f"id-{i:03d}")
        for i, text in caption_records()
    ]
    return write_records(tmp_path_factory.mktemp("captions"), records, shard_size=5)


@pytest.fixture(scope="module")
def tokenizer():
    return clip_jax.get_tokenizer("clip_bpe", context_length=LENGTH)


def test_tfrecord_captions_with_image_ids(captioned, tokenizer):
    pairs = caption_records()
    source = data.open_source(captioned)
    assert source.has_captions and source.has_image_ids and not source.has_labels
    assert source.num_examples == len(pairs) == sum(CAPTION_COUNTS)
    batches, stats = read(source, tokenize_fn=tokenizer.tokenize, max_captions=1)
    for b in batches:
        assert b["tokens"].shape == (BATCH, 1, LENGTH) and b["tokens"].dtype == np.int32
        np.testing.assert_array_equal(b["num_captions"], b["mask"].astype(np.int32))
        assert not b["tokens"][~b["mask"]].any()
        assert b["image_key"].shape == (BATCH, 2)
    got = real(batches)
    images = [i for i, _ in pairs]
    assert [identify(im) for im in got["image"]] == images
    np.testing.assert_array_equal(got["tokens"][:, 0], tokenizer.tokenize([t for _, t in pairs]))
    keys = [tuple(k) for k in got["image_key"].tolist()]
    for a in range(len(pairs)):
        for b in range(len(pairs)):
            assert (keys[a] == keys[b]) == (images[a] == images[b]), (a, b)
    assert stats == {"skipped": 0, "dropped_captions": 0}

    # group_captions over retrieval's outputs: one-hot embeddings say what went where.
    out = {
        "image_emb": np.eye(len(CAPTION_COUNTS))[images],  # [R, I]
        "text_emb": np.eye(len(pairs))[:, None, :],  # [R, 1, T]: record r's caption is text r
        "num_captions": got["num_captions"],
        "image_key": got["image_key"],
    }
    image_emb, text_emb, text_ids = group_captions(out)
    first_seen = list(dict.fromkeys(images))
    np.testing.assert_array_equal(image_emb, np.eye(len(CAPTION_COUNTS))[first_seen])
    np.testing.assert_array_equal(text_emb, np.eye(len(pairs)))
    assert text_ids.tolist() == [first_seen.index(i) for i in images]


def test_tfrecord_captions_without_image_ids_are_separate_images(tmp_path, tokenizer):
    """Shards of `jpg` + `txt` only: each record is its own image (or the source says which key
    is missing). Either is a fix; silently one image for the whole set is not."""

    def feature(v: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    records = [
        tf.train.Example(
            features=tf.train.Features(
                feature={
                    "jpg": feature(encode(colour(i))),
                    "txt": feature(f"a picture {i}".encode()),
                }
            )
        ).SerializeToString()
        for i in range(5)
    ]
    spec = write_records(tmp_path, records)
    try:
        source = data.open_source(spec)
    except ValueError as e:
        assert "'key'" in str(e)
        return
    got = real(read(source, tokenize_fn=tokenizer.tokenize, max_captions=1)[0])
    out = {
        "image_emb": np.eye(5),
        "text_emb": np.eye(5)[:, None, :],
        **{k: got[k] for k in ("num_captions", "image_key") if k in got},
    }
    image_emb, _, text_ids = group_captions(out)
    assert len(image_emb) == 5 and text_ids.tolist() == [0, 1, 2, 3, 4]


def test_group_captions_without_image_ids():
    """tfds-style: each example is one image with all its captions."""
    counts = np.array([3, 1, 2], np.int32)
    text_emb = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)  # [B, M=4, E]
    out = {"image_emb": np.eye(3), "text_emb": text_emb, "num_captions": counts}
    image_emb, texts, ids = group_captions(out)
    np.testing.assert_array_equal(image_emb, np.eye(3))
    np.testing.assert_array_equal(texts, text_emb[[0, 0, 0, 1, 2, 2], [0, 1, 2, 0, 0, 1]])
    assert ids.tolist() == [0, 0, 0, 1, 2, 2]


def test_tfrecord_errors(tmp_path, labelled):
    missing = str(tmp_path / "none-*.tfrecord")
    with pytest.raises(ValueError, match="no files match"):
        data.open_source(f"tfrecord:{missing}")
    with pytest.raises(ValueError, match="no image feature 'png'"):
        data.open_source(labelled, image_key="png")
    with pytest.raises(ValueError, match="neither a label 'y' nor a caption 'caption'"):
        data.open_source(labelled, label_key="y", text_key="caption")
    for spec in ("foo:bar", "tfds:only_a_name", "imagefolder:", "tfrecord:", ""):
        with pytest.raises(ValueError, match="unknown evaluation source"):
            data.open_source(spec)


# --- tfds --------------------------------------------------------------------------------------

TFDS_LABELS = ["red_apple", "green", "blue"]
TFDS_COUNTS = (1, 2, 3, 4, 5, 3, 1)  # captions of the caption builder's images


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
    """Two tiny tfds datasets, prepared locally (no network): labels, and coco-style captions."""
    import tensorflow_datasets as tfds

    def image(i):
        return np.full((SIZE, SIZE, 3), colour(i), np.uint8)

    class ClipJaxEvalTestLabels(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(SIZE, SIZE, 3)),
                "label": tfds.features.ClassLabel(names=TFDS_LABELS),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i in range(11):
                yield i, {"image": image(i), "label": i % 3}

    class ClipJaxEvalTestCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(SIZE, SIZE, 3)),
                "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {"val": self._generate_examples()}

        def _generate_examples(self):
            for i, c in enumerate(TFDS_COUNTS):
                captions = [{"text": tfds_caption(i, j)} for j in range(c)]
                yield i, {"image": image(i), "captions": captions}

    directory = str(tmp_path_factory.mktemp("tfds"))
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    for builder in (ClipJaxEvalTestLabels, ClipJaxEvalTestCaptions):
        builder(data_dir=directory).download_and_prepare(download_config=config)
    return directory


def tfds_caption(i: int, j: int) -> str:
    return f"caption {j} of picture {i}"


def test_tfds_labels(tfds_dir):
    import tensorflow_datasets as tfds

    source = data.open_source("tfds:clip_jax_eval_test_labels:test", data_dir=tfds_dir)
    assert source.num_examples == 11 and source.has_labels and not source.has_captions
    assert source.classnames == ["red apple", "green", "blue"]
    batches, stats = read(source)
    assert len(batches) == 2
    got = real(batches)
    np.testing.assert_array_equal(got["index"], np.arange(11))
    ids = [identify(im) for im in got["image"]]
    assert sorted(ids) == list(range(11))
    assert got["label"].tolist() == [i % 3 for i in ids]
    ds = tfds.builder("clip_jax_eval_test_labels", data_dir=tfds_dir).as_dataset(
        split="test", shuffle_files=False
    )
    assert ids == [identify(x["image"]) for x in ds.as_numpy_iterator()]  # tfds's own order
    assert stats["skipped"] == 0


@pytest.mark.parametrize("max_captions", [5, 2])
def test_tfds_captions_counted_and_dropped(tfds_dir, tokenizer, max_captions):
    source = data.open_source("tfds:clip_jax_eval_test_captions:val", data_dir=tfds_dir)
    assert source.has_captions and not source.has_labels and not source.has_image_ids
    assert source.num_examples == len(TFDS_COUNTS) and source.classnames is None
    dropped = 0
    for p in range(2):
        batches, stats = read(
            source, rows_of(p, 2), tokenize_fn=tokenizer.tokenize, max_captions=max_captions
        )
        for b in batches:
            assert b["tokens"].shape == (BATCH // 2, max_captions, LENGTH)
            assert "image_key" not in b
        got = real(batches)
        for im, n, tokens in zip(got["image"], got["num_captions"], got["tokens"], strict=True):
            i = identify(im)
            assert n == min(TFDS_COUNTS[i], max_captions)
            want = tokenizer.tokenize([tfds_caption(i, j) for j in range(n)])
            np.testing.assert_array_equal(tokens[:n], want)
            assert not tokens[n:].any()
        dropped += stats["dropped_captions"]
    assert dropped == sum(max(0, c - max_captions) for c in TFDS_COUNTS)


def test_tfds_errors(tfds_dir, tmp_path):
    with pytest.raises(ValueError, match="not prepared"):
        data.open_source("tfds:clip_jax_eval_test_labels:test", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="tfds knows no dataset 'clip_jax_no_such_dataset'"):
        data.open_source("tfds:clip_jax_no_such_dataset:test", data_dir=tfds_dir)
    with pytest.raises(ValueError, match="tfds:clip_jax_eval_test_labels:validation"):
        data.open_source("tfds:clip_jax_eval_test_labels:validation", data_dir=tfds_dir)
