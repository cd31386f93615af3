"""The training input: bad records skipped and counted, per-process shards, determinism, exact
resume, tfds label captions, mixtures, image ops and every start-up error."""

import io
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from clip_jax.data import crops, image_ops, pipeline, preprocess, tfdata, tokenizers
from tests.conftest import open_train_source, train_data_config, with_overrides

SIZE, LENGTH, VOCAB = 16, 16, 49408
GOOD, BAD, FILES = 40, 6, 3


def get_tokenizer(context_length=LENGTH):
    return tokenizers.get_tokenizer("clip_bpe", context_length)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


def encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt)
    return out.getvalue()


def picture(i: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)


def raw_example(features: dict) -> bytes:
    def feature(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    feats = {k: feature(v) for k, v in features.items()}
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


OVERLONG = "a very long caption " + " ".join(f"word{i}" for i in range(60))
NON_UTF8 = b"caf\xe9 au lait number 3"


def good_records() -> list[tuple[bytes, bytes]]:
    """(image, caption) of the usable records; a few in other formats or with odd captions."""
    records = [(encode(picture(i)), f"a photo of example number {i}".encode()) for i in range(GOOD)]
    records[1] = (encode(picture(1), "PNG"), b"a png picture number 1")
    records[2] = (encode(picture(2), "WEBP"), b"a webp picture number 2")
    records[3] = (encode(picture(3)[..., 0]), b"  a grey picture number 3 \n")
    records[4] = (encode(picture(4)), OVERLONG.encode())
    records[5] = (encode(picture(5)), NON_UTF8)
    return records


def expected_captions() -> list[str]:
    """The captions the pipeline should tokenize: stripped, non-UTF-8 bytes replaced."""
    return [c.decode("utf-8", errors="replace").strip() for _, c in good_records()]


def bad_records() -> list[bytes]:
    jpeg = encode(picture(100))
    return [
        raw_example({"jpg": jpeg[: len(jpeg) // 2], "txt": b"a truncated image"}),
        raw_example({"jpg": b"this is not an image", "txt": b"no image here"}),
        raw_example({"jpg": jpeg, "txt": b""}),
        raw_example({"jpg": jpeg, "txt": b"   \t "}),
        raw_example({"txt": b"an example without an image"}),
        raw_example({"jpg": jpeg}),
    ]


def write_shards(directory, name: str, files: list[list[bytes]]) -> str:
    """One shard per list of serialized records; returns their source string."""
    for f, records in enumerate(files):
        with tf.io.TFRecordWriter(str(directory / f"{name}-{f:05d}.tfrecord")) as w:
            for r in records:
                w.write(r)
    return "tfrecord:" + str(directory / f"{name}-*.tfrecord")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Usable and bad records in 3 files; the bad ones first, so that every file ends usable."""
    good = [raw_example({"jpg": im, "txt": c}) for im, c in good_records()]
    bad = bad_records()
    files = [bad[f::FILES] + good[f::FILES] for f in range(FILES)]
    return write_shards(tmp_path_factory.mktemp("shards"), "mixed", files)


def make(source: str, tokenizer, *, seed=0, process_index=0, process_count=1, **keys):
    cfg = train_data_config(source=source, image_key="jpg", text_key="txt", shuffle_buffer=16)
    return open_train_source(
        with_overrides(cfg, **keys),
        size=SIZE,
        length=LENGTH,
        vocab=VOCAB,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        tokenizer=tokenizer,
    )


def take(source, k: int, n: int = 8, state=None) -> list:
    """The first k (batch, state) pairs of n rows."""
    it = source.batches(n, slice(0, n), state=state)
    return [next(it) for _ in range(k)]


def identify(tokenizer, captions: list[str]):
    """A function: a tokens row -> its caption, for telling examples apart."""
    rows = tokenizer.tokenize(captions)
    lookup = {tuple(r): c for r, c in zip(rows.tolist(), captions, strict=True)}
    assert len(lookup) == len(captions), "test captions must tokenize distinctly"
    return lambda row: lookup[tuple(row.tolist())]


# --- Bad records -----------------------------------------------------------------------------


def test_a_pass_covers_every_usable_record_once_and_counts_the_bad(shards, tokenizer):
    source = make(shards, tokenizer, shuffle_buffer=1)  # files shuffled, records in file order
    batches = take(source, 10)
    name = identify(tokenizer, expected_captions())
    first_pass = [name(row) for batch, _ in batches[:5] for row in batch["text"]]
    assert sorted(first_pass) == sorted(expected_captions())
    # Every file ends with a usable record: a pass of usable examples has met every bad one.
    assert batches[4][1]["sources"][0]["skipped"] == BAD
    assert batches[9][1]["sources"][0]["skipped"] == 2 * BAD
    assert source.skipped_examples == 2 * BAD


def test_skips_are_counted_exactly_under_shuffling(shards, tokenizer):
    source = make(shards, tokenizer, shuffle_buffer=64)
    batches = source.batches(8, slice(0, 8))
    for k in range(1, 13):
        batch, state = next(batches)
        assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
        assert batch["text"].shape == (8, LENGTH) and batch["text"].dtype == np.int32
        pos = state["sources"][0]
        raw_consumed = pos["epoch"] * (GOOD + BAD) + pos["offset"]
        assert pos["skipped"] == raw_consumed - 8 * k == source.skipped_examples
    assert BAD <= source.skipped_examples <= 3 * BAD


def test_overlong_captions_keep_the_end_token_and_bad_utf8_is_repaired(shards, tokenizer):
    (batch, _), *_ = take(make(shards, tokenizer), 1, n=GOOD)
    rows = {tuple(r) for r in batch["text"].tolist()}
    long_row, repaired_row = tokenizer.tokenize([OVERLONG, expected_captions()[5]]).tolist()
    assert tuple(long_row) in rows and tuple(repaired_row) in rows
    assert long_row[-1] == tokenizer.eot_token_id and tokenizer.pad_token_id not in long_row
    assert "\ufffd" in expected_captions()[5]


def test_a_truncated_shard_loses_only_its_cut_record_and_counts_it(tmp_path, tokenizer):
    records = [
        raw_example({"jpg": encode(picture(i)), "txt": f"caption {i}".encode()}) for i in range(8)
    ]
    source = write_shards(tmp_path, "cut", [records[:4], records[4:]])
    path = tmp_path / "cut-00001.tfrecord"
    path.write_bytes(path.read_bytes()[:-100])  # as a partial upload leaves it
    name = identify(tokenizer, [f"caption {i}" for i in range(8)])
    batches = take(make(source, tokenizer), 4, n=7)
    assert sorted(name(row) for row in batches[0][0]["text"]) == [f"caption {i}" for i in range(7)]
    for k, (_, state) in enumerate(batches, 1):  # 8 raw records a pass: 7 usable, 1 cut
        pos = state["sources"][0]
        assert pos["skipped"] == pos["epoch"] * 8 + pos["offset"] - 7 * k
        assert k - 1 <= pos["skipped"] <= k


def test_a_whole_epoch_of_bad_records_is_an_error_not_a_hang(tmp_path, tokenizer):
    glob = write_shards(tmp_path, "bad", [bad_records()])
    with pytest.raises(ValueError, match="without one usable example"):
        take(make(glob, tokenizer), 1)


def test_liveness_through_groups_equals_the_record_by_record_rule():
    """`tfdata._watch` on groups of any size, its count carried across groups, equals the rule
    applied record by record: the count of markers since the last usable record resets on a
    usable one, and the reader dies where it reaches 2."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        kind = rng.choice(3, n, p=[0.3, 0.5, 0.2])  # 0 unusable record, 1 usable, 2 marker
        usable, marker = kind == 1, kind == 2
        count, want_alive, want_count = 0, [], []
        for u, m in zip(usable, marker, strict=True):
            count = 0 if u else count + int(m)
            want_alive.append(count < 2 and (not want_alive or want_alive[-1]))
            want_count.append(count)
        cuts = np.sort(rng.choice(np.arange(1, n), min(n - 1, int(rng.integers(0, 4))), False))
        carried, alive = tf.constant(0, tf.int64), []
        for lo, hi in zip([0, *cuts], [*cuts, n], strict=True):
            carried, group_alive = tfdata._watch(
                carried, tf.constant(usable[lo:hi]), tf.constant(marker[lo:hi])
            )
            assert int(carried) == want_count[hi - 1]
            alive += group_alive.numpy().tolist()
        # A later group starts alive again: `take_while` ends the stream after a death.
        first_death = want_alive.index(False) if False in want_alive else n
        assert alive[:first_death] == want_alive[:first_death]
        assert first_death == n or not alive[first_death]


# --- Sharding, determinism, resume -------------------------------------------------------------


def first_epoch_captions(source, name) -> list[str]:
    """This process's captions of epoch 0, read one example at a time."""
    captions = []
    for batch, state in source.batches(1, slice(0, 1)):
        if state["sources"][0]["epoch"] > 0:
            return captions
        captions.append(name(batch["text"][0]))
    raise AssertionError("unreachable")


@pytest.mark.parametrize("files", ["all", "one"])  # sharded by file (3 files), by record (1)
def test_two_processes_see_disjoint_halves(shards, tokenizer, files):
    glob = shards if files == "all" else shards.replace("*", "00000")
    name = identify(tokenizer, expected_captions())
    seen = [
        first_epoch_captions(make(glob, tokenizer, process_index=p, process_count=2), name)
        for p in (0, 1)
    ]
    everything = first_epoch_captions(make(glob, tokenizer), name)
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(everything)


def test_same_seed_same_batches_other_seed_other_batches(shards, tokenizer):
    a, b = take(make(shards, tokenizer), 2), take(make(shards, tokenizer), 2)
    c = take(make(shards, tokenizer, seed=1), 1)
    for (x, sx), (y, sy) in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["text"], y["text"])
        assert sx == sy
    assert not np.array_equal(a[0][0]["text"], c[0][0]["text"])


def test_the_papers_square_crop_is_an_option_of_the_pipeline(shards, tokenizer):
    """train_data.augmentation: the same records and captions, other pixels, repeatable."""
    default = take(make(shards, tokenizer), 1)[0][0]
    square = take(make(shards, tokenizer, augmentation="random_square_crop"), 1)[0][0]
    again = take(make(shards, tokenizer, augmentation="random_square_crop"), 1)[0][0]
    assert square["image"].shape == default["image"].shape
    np.testing.assert_array_equal(square["text"], default["text"])
    assert not np.array_equal(square["image"], default["image"])
    np.testing.assert_array_equal(square["image"], again["image"])
    with pytest.raises(ValueError, match="train_data.augmentation 'flip': use one of"):
        make(shards, tokenizer, augmentation="flip")


def test_resume_from_a_state_is_exact(shards, tokenizer):
    run = take(make(shards, tokenizer), 9, n=7)  # crosses epochs (40 usable per epoch)
    for k in (2, 6):
        state = run[k - 1][1]
        source = make(shards, tokenizer)
        resumed = take(source, 9 - k, n=7, state=state)
        for (x, sx), (y, sy) in zip(run[k:], resumed, strict=True):
            np.testing.assert_array_equal(x["image"], y["image"])
            np.testing.assert_array_equal(x["text"], y["text"])
            assert sx == sy
        assert source.skipped_examples == run[-1][1]["sources"][0]["skipped"]


# --- Mixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two shard sets whose captions start with 'alpha' and 'beta'."""
    directory = tmp_path_factory.mktemp("two_sets")
    image = encode(picture(0, size=8))
    sets = {}
    for word in ("alpha", "beta"):
        records = [raw_example({"jpg": image, "txt": f"{word} {i}".encode()}) for i in range(30)]
        sets[word] = write_shards(directory, word, [records[:15], records[15:]])
    return sets


def test_a_mixture_follows_its_weights_and_resumes_exactly(two_sets, tokenizer):
    spec = f"{two_sets['alpha']}@3,{two_sets['beta']}@1"
    alpha = tokenizer.tokenize(["alpha"])[0, 1]
    run = take(make(spec, tokenizer), 10, n=40)
    share = np.mean([row[1] == alpha for batch, _ in run for row in batch["text"]])
    assert 0.68 <= share <= 0.82, share  # 400 draws at 0.75: about 3 standard deviations
    resumed = take(make(spec, tokenizer), 4, n=40, state=run[5][1])
    for (x, sx), (y, sy) in zip(run[6:], resumed, strict=True):
        np.testing.assert_array_equal(x["text"], y["text"])
        np.testing.assert_array_equal(x["image"], y["image"])
        assert sx == sy


def test_mixture_specs_parse():
    assert pipeline.parse_mixture("tfrecord:/a/*@0.7, tfds:x/y:train[:10%]@0.3") == [
        ("tfrecord:/a/*", 0.7),
        ("tfds:x/y:train[:10%]", 0.3),
    ]
    assert pipeline.parse_mixture("tfrecord:/a/*") == [("tfrecord:/a/*", 1.0)]
    with pytest.raises(ValueError, match="not a number"):
        pipeline.parse_mixture("tfrecord:/a/*@x")
    with pytest.raises(ValueError, match="positive"):
        pipeline.parse_mixture("tfrecord:/a/*@0")


# --- tfds ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tiny label-only tfds dataset, prepared locally (no network)."""
    import tensorflow_datasets as tfds

    class ClipJaxTestLabels(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(12, 12, 3)),
                "label": tfds.features.ClassLabel(names=["cat", "dog", "red_fox"]),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(24)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"image": picture(i, size=12), "label": i % 3}

    directory = str(tmp_path_factory.mktemp("tfds"))
    ClipJaxTestLabels(data_dir=directory).download_and_prepare()
    return directory


def test_tfds_labels_become_captions_through_templates(tfds_dir, tokenizer):
    templates = ("a photo of a {}.", "a {} in the grass")
    captions = [t.format(n) for t in templates for n in ("cat", "dog", "red fox")]
    name = identify(tokenizer, captions)
    seen = []
    for p in (0, 1):
        source = make(
            "tfds:clip_jax_test_labels:train",
            tokenizer,
            data_dir=tfds_dir,
            templates=templates,
            process_index=p,
            process_count=2,
        )
        (batch, state), (_, later) = take(source, 2, n=12)  # 12 examples per process
        assert state["sources"][0] == {"epoch": 0, "offset": 12, "skipped": 0}
        assert later["sources"][0] == {"epoch": 1, "offset": 12, "skipped": 0}
        seen += [name(row) for row in batch["text"]]
    assert len(seen) == 24 and set(seen) == set(captions)  # 24 draws of 6: all appear here


def test_tfds_errors_are_clear(tfds_dir, tokenizer):
    with pytest.raises(ValueError, match="tfds knows no dataset 'no_such_dataset_xyz'"):
        make("tfds:no_such_dataset_xyz:train", tokenizer, data_dir=tfds_dir)
    with pytest.raises(ValueError, match="Unknown split"):
        make("tfds:clip_jax_test_labels:validation", tokenizer, data_dir=tfds_dir)
    with pytest.raises(ValueError, match="exactly once"):
        make("tfds:clip_jax_test_labels:train", tokenizer, data_dir=tfds_dir, templates=("a",))


# --- Start-up errors ---------------------------------------------------------------------------


def test_start_up_errors_name_the_problem(tmp_path, shards, tokenizer):
    missing = str(tmp_path / "nothing-*.tfrecord")
    with pytest.raises(ValueError, match=re.escape(f"no files match '{missing}'")):
        make(f"tfrecord:{missing}", tokenizer)
    with pytest.raises(ValueError, match="unknown train_data.source 'webdataset:x'"):
        make("webdataset:x", tokenizer)
    with pytest.raises(ValueError, match="synthetic cannot be part of a mixture"):
        make(f"synthetic,{shards}", tokenizer)
    with pytest.raises(ValueError, match=r"no feature 'jpeg' \(they have \['jpg', 'txt'\]\)"):
        make(shards, tokenizer, image_key="jpeg")
    (tmp_path / "junk.tfrecord").write_bytes(b"not a tfrecord file at all")
    with pytest.raises(ValueError, match="is not a file of tf.train.Example records"):
        make(f"tfrecord:{tmp_path / 'junk.tfrecord'}", tokenizer)
    with pytest.raises(ValueError, match="does not fit the model"):
        make(shards, get_tokenizer(LENGTH + 1))
    with pytest.raises(ValueError, match="crop_scale"):
        make(shards, tokenizer, crop_scale=(0.5, 1.5))


def test_synthetic_needs_no_tokenizer():
    source = open_train_source(train_data_config(source="synthetic"), vocab=100)
    batch, state = next(source.batches(4, slice(0, 4)))
    assert batch["image"].shape == (4, 8, 8, 3) and state == {"step": 1, "skipped_examples": 0}


# --- Image ops ---------------------------------------------------------------------------------


def test_crops_keep_pixels_and_normalise_on_the_device():
    colour = np.zeros((30, 50, 3), np.uint8) + np.array([200, 100, 50], np.uint8)
    data = tf.constant(encode(colour, "PNG"))
    want = (np.array([200, 100, 50]) / 255 - preprocess.CLIP_MEAN) / preprocess.CLIP_STD
    seed = tf.constant([1, 2], tf.int64)
    crop = image_ops.augment(
        data, 20, seed, augmentation="random_resized_crop", crop_scale=(0.9, 1)
    )
    assert crop.dtype == tf.uint8 and crop.shape == (20, 20, 3)
    train = preprocess.normalize(crop.numpy())
    evaluation = preprocess.preprocess(Image.open(io.BytesIO(data.numpy())), 20)[0]
    for image in (train, evaluation):
        assert image.shape == (20, 20, 3) and image.dtype == np.float32
        np.testing.assert_allclose(image, np.broadcast_to(want, image.shape), atol=1e-4)
    again = image_ops.augment(
        data, 20, seed, augmentation="random_resized_crop", crop_scale=(0.9, 1)
    )
    np.testing.assert_array_equal(crop, again)


def test_random_crop_windows_fit_and_cover_the_scale():
    for s in range(50):
        u = np.random.default_rng(s).random(4)
        left, top, w, h = crops.window(90, 60, u, (0.5, 1.0))
        assert 0 <= top <= 60 - h and 0 <= left <= 90 - w
        assert 0.4 * 60 * 90 <= h * w <= 60 * 90


def test_eval_resizes_the_shorter_side_then_center_crops():
    stripes = np.zeros((40, 80, 3), np.uint8)
    stripes[:, 20:60] = 255  # the center square is white, the sides black
    image = preprocess.Preprocess(10).decode(encode(stripes, "PNG"))
    image = preprocess.preprocess(image, 10)[0]
    white = (1 - np.array(preprocess.CLIP_MEAN)) / np.array(preprocess.CLIP_STD)
    np.testing.assert_allclose(image[:, 2:-2], np.broadcast_to(white, (10, 6, 3)), atol=0.05)
