"""CLIP_benchmark's evaluation sets: datasets in its webdataset layout found under a directory,
evaluated with its metric names and written as its records; equal to the same data read as
TFRecords."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clip_jax.evals import prompts, suites
from clip_jax.inference import jobs
from clip_jax.training import trainer as train
from tests.conftest import ROOT, tiny_config, write_tar

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


# --- The real client: CLIP_benchmark's own tools and zero-shot code ---------------------------


EXPORT_DIGITS = """
import io, sys
from PIL import Image
from clip_benchmark import webdataset_builder as exporter
from clip_jax.data import digits
from clip_jax.evals import prompts


class LabelledImages(list):  # (PIL image, label) pairs, with what the exporter reads
    classes = list(digits.CLASS_NAMES)
    templates = [t.replace("{}", "{c}") for t in prompts.templates("digits_heldout")]


images, labels = digits.load_digits()
dataset = LabelledImages(
    (Image.open(io.BytesIO(digits.render(images[i], 64))).convert("RGB"), int(labels[i]))
    for i in digits.split_indices(len(labels))["test"]
)
exporter.convert_dataset(
    dataset, "test", sys.argv[1], transform=exporter.PIL_to_bytes("webp"), max_count=128,
    verbose=False,
)
"""


def clip_jax_predictions(workdir, data_dir) -> np.ndarray:
    """clip_jax's top-1 class of every image of the exported set, in the shards' order."""
    from clip_jax.evals import zeroshot

    subject = jobs.prepare(None, workdir, None, None)
    entries, _, _ = suites.clip_benchmark(data_dir)
    evaluator = jobs.make_evaluator(subject, "digits", entries["digits"])
    classifier = zeroshot.build_classifier(
        subject.model,
        subject.variables,
        subject.tokenizer,
        evaluator.classnames,
        evaluator.templates,
        mesh=subject.mesh,
        rules=subject.rules,
    )
    out, _ = evaluator.extract(
        "zeroshot",
        lambda: zeroshot.make_predict_fn(subject.model, len(evaluator.classnames)),
        subject.variables,
        evaluator.source,
        extra=extract_replicate(classifier, subject.mesh),
    )
    return out["top"][:, 0]


def extract_replicate(x, mesh):
    from clip_jax.evals import extract

    return extract.replicate(x, mesh)


def test_clip_benchmarks_own_zero_shot_gives_the_same_answers(tmp_path):
    """A clip_jax-trained model, evaluated by `clip_jax.evaluate` on shards that CLIP_benchmark's
    exporter wrote, and by CLIP_benchmark's own zero-shot code (its classifier, its
    classification loop, open_clip's transform) after export to open_clip: the same top-1, to
    one image, and the same answer for at least 99.5% of the images."""
    open_clip = pytest.importorskip("open_clip")
    torch = pytest.importorskip("torch")
    pytest.importorskip("clip_benchmark.webdataset_builder")
    builder = pytest.importorskip("clip_benchmark.datasets.builder")
    zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    pytest.importorskip("sklearn")
    from clip_jax.data import digits
    from clip_jax.inference import load

    # A model that has learnt something: the demo's recipe, shortened.
    shards = tmp_path / "digits"
    digits.write_digits(str(shards), image_size=32)
    config = tiny_config(total_steps=150, batch_size=128, checkpoint_every_steps=150)
    config.train_data.source = f"tfrecord:{shards}/train-*.tfrecord"
    config.optim.warmup_steps = 20
    workdir = str(tmp_path / "run")
    train.run(config, workdir)

    # The 300 held-out digits at 64 px, written by CLIP_benchmark's exporter (lossless webp), in
    # a process of its own: the exporter forks 8 workers, and this one runs JAX's threads.
    data_dir = tmp_path / "benchmark"
    child = subprocess.run(
        [sys.executable, "-c", EXPORT_DIGITS, str(data_dir / "digits")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    images, labels = digits.load_digits()
    held_out = digits.split_indices(len(labels))["test"]

    (record,) = jobs.evaluate(None, workdir=workdir, evals="clip_benchmark", data_dir=str(data_dir))
    ours = clip_jax_predictions(workdir, str(data_dir))
    assert record["dataset"] == "wds/digits"
    assert record["metrics"]["acc1"] == pytest.approx(float(np.mean(ours == labels[held_out])))

    # The same weights in open_clip, evaluated by CLIP_benchmark.
    exported = str(tmp_path / "exported.safetensors")
    load.export_run(workdir, exported)
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import load_file

    model = CLIP(
        32,
        CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
        CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=2),
    ).eval()
    model.load_state_dict(load_file(exported), strict=True)
    transform = open_clip.image_transform(32, is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    ds = builder.build_dataset(
        "wds/digits", root=str(data_dir / "digits"), transform=transform, split="test"
    )
    loader = torch.utils.data.DataLoader(ds.batched(64), batch_size=None, num_workers=0)
    classifier = zc.zero_shot_classifier(
        model, tokenizer, ds.classes, ds.templates, "cpu", amp=False
    )
    logits, target = zc.run_classification(model, classifier, loader, "cpu", amp=False)
    theirs = logits.argmax(dim=1).numpy()
    np.testing.assert_array_equal(target.numpy(), labels[held_out])  # the same order
    their_top1 = float(np.mean(theirs == target.numpy()))
    print(
        f"top-1: clip_jax {record['metrics']['acc1']:.4f}, CLIP_benchmark {their_top1:.4f}; "
        f"same answer for {np.mean(ours == theirs):.4f} of {len(theirs)} images"
    )
    assert abs(record["metrics"]["acc1"] - their_top1) <= 1 / len(theirs) + 1e-9
    assert np.mean(ours == theirs) >= 0.995
    assert their_top1 > 0.5  # a model that has learnt, so that agreeing means something
