"""CLIP_benchmark's evaluation sets: datasets in its webdataset layout found under a directory,
evaluated with its metric names and written as its records; equal to the same data read as
TFRecords."""

import json
import os

import numpy as np
import pytest

from clip_jax.evals import prompts, suites
from clip_jax.inference import jobs
from clip_jax.training import trainer as train
from tests.conftest import tiny_config, write_tar

SHARD = 128  # samples per tar, as CLIP_benchmark's exporter deals them (0.tar, 1.tar, ...)


def write_benchmark_set(root, images, labels=None, captions=None, classnames=(), templates=()):
    """A dataset in CLIP_benchmark's layout: test/{0..N-1}.tar with nshards.txt, keys s%07d,
    `.webp`-less `.png` images with `.cls` labels, or `.txt` captions (one per line) and
    dataset_type.txt saying "retrieval"."""
    os.makedirs(os.path.join(root, "test"), exist_ok=True)
    samples = []
    for i, image in enumerate(images):
        members = [(f"s{i:07d}.png", image)]
        if labels is not None:
            members.append((f"s{i:07d}.cls", str(int(labels[i])).encode()))
        if captions is not None:
            members.append((f"s{i:07d}.txt", "\n".join(captions[i]).encode()))
        samples.append(members)
    shards = [samples[k : k + SHARD] for k in range(0, len(samples), SHARD)]
    for k, shard in enumerate(shards):
        write_tar(os.path.join(root, "test", f"{k}.tar"), [m for s in shard for m in s])
    with open(os.path.join(root, "test", "nshards.txt"), "w") as f:
        f.write(f"{len(shards)}\n")
    if classnames:
        with open(os.path.join(root, "classnames.txt"), "w") as f:
            f.write("\n".join(classnames) + "\n")
    if templates:
        with open(os.path.join(root, "zeroshot_classification_templates.txt"), "w") as f:
            f.write("\n".join(templates) + "\n")
    if captions is not None:
        with open(os.path.join(root, "dataset_type.txt"), "w") as f:
            f.write("retrieval\n")


def digit_pngs(n: int, size: int = 32):
    """The first `n` of the demo's 300 test digits, in their order, as PNG bytes."""
    import io

    from PIL import Image

    from clip_jax.data import digits

    images, labels = digits.load_digits()
    indices = digits.split_indices(len(labels))["test"][:n]
    out = []
    for i in indices:
        jpeg = digits.render(images[i], size)
        buffer = io.BytesIO()
        Image.open(io.BytesIO(jpeg)).save(buffer, "PNG")  # the demo's pixels, losslessly
        out.append(buffer.getvalue())
    return out, labels[indices]


@pytest.fixture(scope="module")
def benchmark_dir(tmp_path_factory):
    """digits as wds/vtab/dummy-style classification (the hub's folder name) and a retrieval set
    of the same images with two captions each."""
    pytest.importorskip("sklearn")
    from clip_jax.data import digits

    root = tmp_path_factory.mktemp("clip_benchmark")
    images, labels = digit_pngs(300)
    templates = [t.replace("{}", "{c}") for t in prompts.templates("digits")]
    write_benchmark_set(
        root / "wds_mnist", images, labels, classnames=digits.CLASS_NAMES, templates=templates
    )
    captions = [[f"the digit {y}", f"a handwritten {digits.CLASS_NAMES[y]}"] for y in labels]
    write_benchmark_set(root / "flickr8k", images[:100], captions=captions[:100])
    write_benchmark_set(root / "wds_my_own", images[:50], labels[:50], classnames=["a"] * 10)
    return str(root)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    train.run(tiny_config(total_steps=4, checkpoint_every_steps=4), workdir)
    return workdir


def test_the_suite_finds_the_datasets_and_lists_the_missing(benchmark_dir):
    entries, names, missing = suites.clip_benchmark(benchmark_dir)
    assert names == {"mnist": "wds/mnist", "flickr8k": "wds/flickr8k", "my_own": "wds/my_own"}
    assert entries["mnist"]["type"] == "zeroshot" and entries["mnist"]["templates"] == "dataset"
    assert entries["flickr8k"]["type"] == "retrieval"
    assert len(missing) == len(suites.CLIP_BENCHMARK) - 2 and "wds/vtab/cifar10" in missing


def test_results_are_clip_benchmark_records_equal_to_the_tfrecord_eval(
    tmp_path, run_dir, benchmark_dir
):
    from clip_jax.data import digits

    output = tmp_path / "results.json"
    records = jobs.evaluate(
        None, workdir=run_dir, evals="clip_benchmark", data_dir=benchmark_dir, output=str(output)
    )
    by_name = {r["dataset"]: r for r in records}
    assert set(by_name) == {"wds/mnist", "wds/flickr8k", "wds/my_own"}
    for r in records:
        assert set(r) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    mnist = by_name["wds/mnist"]
    assert mnist["task"] == "zeroshot_classification"
    assert set(mnist["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    flickr = by_name["wds/flickr8k"]
    assert flickr["task"] == "zeroshot_retrieval"
    assert {"image_retrieval_recall@5", "text_retrieval_recall@5"} <= set(flickr["metrics"])

    # The same 300 digits, read from the demo's TFRecords, with the same names and templates.
    digits_dir = tmp_path / "digits"
    digits.write_digits(str(digits_dir), image_size=32)
    config = tiny_config()
    config.evals["same"] = dict(
        type="zeroshot",
        source=f"tfrecord:{digits_dir}/test-*.tfrecord",
        classnames="digits",
        templates="digits",
    )
    (reference,) = jobs.evaluate(config, workdir=run_dir, evals="same")
    assert mnist["metrics"]["acc1"] == reference["metrics"]["top1"]
    recall = "mean_per_class_recall"
    assert mnist["metrics"][recall] == reference["metrics"][recall]

    files = sorted(os.listdir(tmp_path / "clip_benchmark"))
    assert len(files) == 3
    assert any(
        f.startswith("mnist__") and f.endswith("_en_zeroshot_classification.json") for f in files
    )
    for name in files:
        record = json.loads((tmp_path / "clip_benchmark" / name).read_text())
        assert name == jobs.benchmark_filename(record)
        assert record in records
    table = (tmp_path / "results.md").read_text()
    assert "skipped wds/vtab/cifar10: not found" in table
    assert np.isfinite(flickr["metrics"]["text_retrieval_recall@1"])


def test_user_errors_name_the_problem(tmp_path, run_dir):
    with pytest.raises(ValueError, match="reads its datasets from --data_dir"):
        jobs.evaluate(None, workdir=run_dir, evals="clip_benchmark")
    with pytest.raises(ValueError, match="no CLIP_benchmark dataset under"):
        jobs.evaluate(None, workdir=run_dir, evals="clip_benchmark", data_dir=str(tmp_path))
