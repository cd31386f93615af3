"""webdataset shards as a training source: samples grouped by key, bad members skipped and
counted, per-process shares, exact resume, mixtures with TFRecords."""

import json

import numpy as np
import pytest

from clip_jax.data import webdataset
from tests.conftest import write_tar, write_wds_with_bad_records
from tests.test_data import (
    encode,
    first_epoch_captions,
    get_tokenizer,
    identify,
    make,
    picture,
    raw_example,
    take,
    write_shards,
)

GOOD = 30


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


def test_member_names_split_into_key_and_field():
    assert webdataset.split_name("000/12.jpg") == ("000/12", "jpg")
    assert webdataset.split_name("a.b/c.seg.PNG") == ("a.b/c", "seg.png")
    assert webdataset.split_name("README") == ("", "")
    assert sorted(["10.tar", "9.tar", "100.tar"], key=webdataset.natural_key) == [
        "9.tar",
        "10.tar",
        "100.tar",
    ]


def test_samples_group_members_and_read_captions(tmp_path):
    meta = json.dumps({"caption": "from json", "url": "x"}).encode()
    write_tar(
        tmp_path / "a.tar",
        [
            ("__index__.txt", b"metadata, not a sample"),
            ("d/1.JPG", b"J1"),
            ("d/1.txt", b"one"),
            ("d/1.txt", b"a second txt is ignored"),
            ("d/2.webp", b"W2"),
            ("d/2.json", meta),
            ("d/3.png", b"P3"),
            ("d/3.json", b"not json"),
            ("d/4.cls", b" 7\n"),
        ],
    )
    got = list(webdataset.samples(str(tmp_path / "a.tar")))
    assert [k for k, _ in got] == ["d/1", "d/2", "d/3", "d/4"]
    fields = [f for _, f in got]
    assert [webdataset.image_of(f) for f in fields] == [b"J1", b"W2", b"P3", b""]
    assert [webdataset.caption_of(f) for f in fields] == [b"one", b"from json", b"", b""]
    assert [webdataset.label_of(f) for f in fields] == [-1, -1, -1, 7]
    assert webdataset.count(str(tmp_path / "a.tar")) == 4


def test_a_cut_shard_gives_what_precedes_the_cut_and_one_lost_sample(tmp_path):
    members = [(f"{i}.txt", b"x" * 3000) for i in range(6)]
    write_tar(tmp_path / "cut.tar", members)
    data = (tmp_path / "cut.tar").read_bytes()
    member = 512 + 3072  # a header block, the data padded to blocks
    (tmp_path / "cut.tar").write_bytes(data[: 2 * member + 1500])  # inside the third member
    got = list(webdataset.samples(str(tmp_path / "cut.tar")))
    assert [k for k, _ in got] == ["0", "1", ""]  # the cut one stands as the lost sample
    assert got[1][1] == {"txt": b"x" * 3000} and got[-1] == ("", {})
    assert webdataset.count(str(tmp_path / "cut.tar")) == 3
    assert list(webdataset.samples(str(tmp_path / "missing.tar"))) == [("", {})]


@pytest.fixture(scope="module")
def wds_shards(tmp_path_factory):
    """30 digits over 3 tars, 5 bad samples at the start of the first."""
    return write_wds_with_bad_records(
        tmp_path_factory.mktemp("wds"), good=GOOD, image_size=24, shards=3
    )


def captions(n: int = GOOD) -> list[str]:
    from clip_jax.data import digits

    _, labels = digits.load_digits()
    return [f"the digit {labels[i]}" for i in range(n)]


def test_a_pass_reads_every_sample_and_counts_the_bad(wds_shards, tokenizer):
    source, bad = wds_shards
    batches = take(make(source, tokenizer), 3, n=10)  # 30 usable a pass
    texts = np.concatenate([b["text"] for b, _ in batches])
    want = np.asarray(tokenizer.tokenize(captions()))
    assert sorted(map(tuple, texts.tolist())) == sorted(map(tuple, want.tolist()))
    assert batches[-1][1]["skipped_examples"] == bad
    assert batches[0][0]["image"].shape == (10, 16, 16, 3)


def test_two_processes_see_disjoint_shares(wds_shards, tokenizer):
    source, _ = wds_shards
    name = identify(tokenizer, sorted(set(captions())))
    for glob in (source, source.replace("*", "00001")):  # shared by file (3 tars), by sample (1)
        seen = [
            first_epoch_captions(make(glob, tokenizer, process_index=p, process_count=2), name)
            for p in (0, 1)
        ]
        everything = first_epoch_captions(make(glob, tokenizer), name)
        assert seen[0] and seen[1]
        assert sorted(seen[0] + seen[1]) == sorted(everything)


def test_resume_from_a_state_is_exact(wds_shards, tokenizer):
    source, _ = wds_shards
    run = take(make(source, tokenizer), 8, n=7)  # crosses epochs
    for k in (1, 5):
        resumed = take(make(source, tokenizer), 8 - k, n=7, state=run[k - 1][1])
        for (x, sx), (y, sy) in zip(run[k:], resumed, strict=True):
            np.testing.assert_array_equal(x["image"], y["image"])
            np.testing.assert_array_equal(x["text"], y["text"])
            assert sx == sy


def test_mixed_with_tfrecords_by_weight(wds_shards, tmp_path, tokenizer):
    source, _ = wds_shards
    image = encode(picture(0, size=8))
    records = [raw_example({"jpg": image, "txt": f"alpha {i}".encode()}) for i in range(20)]
    tfrecords = write_shards(tmp_path, "alpha", [records])
    mixed = make(f"{source}@3,{tfrecords}@1", tokenizer)
    batches = take(mixed, 6, n=10)
    alpha = tokenizer.tokenize(["alpha"])[0][1]  # the word's token after the start token
    from_tfrecords = sum(int(alpha in row) for b, _ in batches for row in b["text"].tolist())
    assert 5 <= from_tfrecords <= 25  # a quarter of 60 drawn, with room for chance
    resumed = take(make(f"{source}@3,{tfrecords}@1", tokenizer), 3, n=10, state=batches[2][1])
    for (x, _), (y, _) in zip(batches[3:], resumed, strict=True):
        np.testing.assert_array_equal(x["text"], y["text"])


OPEN_AT_EXIT = """
import sys
from clip_jax.data import pipeline
from clip_jax.evals import data
from clip_jax.data.preprocess import Preprocess
from configs import tiny

cfg = tiny.get_config().train_data
cfg.source = sys.argv[1]
source = pipeline.make_source(cfg, seed=0, image_size=32, context_length=16, vocab_size=49408,
                              process_index=0, process_count=1)
STREAM = source.batches(8, slice(0, 8))
next(STREAM)  # PIL's crops in flight, through tf.numpy_function
EVAL = data.batches(data.open_source(sys.argv[2]), preprocess=Preprocess(32), global_batch=4,
                    rows=slice(0, 4))
next(EVAL)
print("leaving both open", flush=True)
"""


def test_an_open_stream_does_not_hang_the_exit(wds_shards, tmp_path):
    """Streams that call Python inside tf.data, still open when the interpreter exits (a global,
    a traceback), are closed before Python finalizes instead of hanging it."""
    import subprocess
    import sys

    from tests.conftest import ROOT, cpu_env

    source, _ = wds_shards
    images = tmp_path / "folder" / "a"
    images.mkdir(parents=True)
    for i in range(6):
        (images / f"{i}.png").write_bytes(encode(picture(i), "PNG"))
    done = subprocess.run(
        [sys.executable, "-c", OPEN_AT_EXIT, source, f"imagefolder:{tmp_path / 'folder'}"],
        cwd=ROOT,
        env=cpu_env(1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "leaving both open" in done.stdout


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_long_names_in_every_tar_format(tmp_path, fmt):
    """Keys longer than ustar's 100 characters: ustar's prefix field, GNU's long-name member,
    pax's path record."""
    import io
    import tarfile

    directory = "d" * 60 + "/" + "e" * 40
    key = f"{directory}/{'k' * 90}"
    formats = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
    path = tmp_path / f"{fmt}.tar"
    with tarfile.open(path, "w", format=formats[fmt]) as tar:
        for name, data in ((f"{key}.jpg", b"J"), (f"{key}.txt", b"caption"), ("short.txt", b"s")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = list(webdataset.samples(str(path)))
    assert got == [(key, {"jpg": b"J", "txt": b"caption"}), ("short", {"txt": b"s"})]
    assert webdataset.count(str(path)) == 2
