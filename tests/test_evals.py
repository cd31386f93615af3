"""Evaluation end to end on the tiny model: evals during training (same losses with and without
them, results in metrics.jsonl, rerun after a preemption), a run's weights and tokenizer by its
directory, the batch jobs, and identical results on 1 device, 8 devices and 2 processes."""

import io
import json
import os
import shutil
import subprocess
import sys
from typing import ClassVar

import jax
import numpy as np
import pytest

import clip_jax
from clip_jax.evals import extract, registry, runner
from clip_jax.evals.evaluator import Evaluator, Key
from clip_jax.inference import jobs
from clip_jax.infra.errors import UsageError
from clip_jax.infra.rules import POSITIVE_INT
from clip_jax.parallel import sharding
from clip_jax.training import metrics, runs, validate
from clip_jax.training import trainer as train
from tests.conftest import (
    ROOT,
    cpu_env,
    read_losses,
    read_rows,
    run_processes,
    run_python,
    tiny_config,
)

STEPS, EVERY = 4, 2


def pil(data: bytes):
    """Encoded image bytes as the PIL image open_clip's users open."""
    from PIL import Image

    return Image.open(io.BytesIO(data))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    pytest.importorskip("sklearn")
    from clip_jax.data import digits

    out = tmp_path_factory.mktemp("digits")
    digits.write_digits(str(out), image_size=32)
    return str(out)


def eval_entries(digits_dir):
    test = f"tfrecord:{digits_dir}/test-*.tfrecord"
    train_src = f"tfrecord:{digits_dir}/train-*.tfrecord"
    return {
        # 300 test digits in batches of 64: a ragged last batch of 44.
        "digits": dict(
            type="zeroshot",
            source=test,
            classnames="digits",
            templates="digits",
            batch_size=64,
            every_steps=EVERY,
        ),
        "probe": dict(type="linear_probe", train_source=train_src, source=test, batch_size=64),
        "shots": dict(
            type="fewshot",
            train_source=train_src,
            source=test,
            batch_size=64,
            shots=(1, 5),
            every_steps=EVERY,
        ),
    }


def config_with_evals(digits_dir, **overrides):
    config = tiny_config(total_steps=STEPS, checkpoint_every_steps=EVERY, **overrides)
    for name, entry in eval_entries(digits_dir).items():
        config.evals[name] = entry
    return config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_dir):
    workdir = str(tmp_path_factory.mktemp("run"))
    train.run(config_with_evals(digits_dir), workdir)
    return workdir


def training_losses(workdir):
    """{step: loss} of the training rows (evals write rows of their own)."""
    return {r["step"]: r["loss"] for r in read_rows(workdir) if "loss" in r}


def test_evals_run_on_schedule_and_never_change_training(tmp_path, run_dir):
    train.run(tiny_config(total_steps=STEPS, checkpoint_every_steps=EVERY), str(tmp_path))
    assert training_losses(run_dir) == read_losses(str(tmp_path))
    assert sorted(training_losses(run_dir)) == [1, 2, 3, 4]
    evals = {}
    for row in read_rows(run_dir):
        for key, value in row.items():
            if "/" in key:
                evals.setdefault(key, {})[row["step"]] = value
    assert sorted(evals["zeroshot/digits/top1"]) == [2, 4]
    assert sorted(evals["fewshot/shots/5shot"]) == [2, 4]
    assert sorted(evals["linear_probe/probe/top1"]) == [4]  # every_steps=0: at the end only
    for key in (
        "zeroshot/digits/top5",
        "zeroshot/digits/mean_per_class_recall",
        "linear_probe/probe/C",
        "fewshot/shots/1shot",
        "eval/probe/seconds",
    ):
        assert key in evals, key
    assert 0.5 < evals["linear_probe/probe/top1"][4] <= 1.0  # even a barely trained tower
    with open(os.path.join(run_dir, "evals", "step_4", "digits.json")) as f:
        result = json.load(f)
    assert result["task"] == "zeroshot_classification"
    assert set(result["metrics"]) == {"top1", "top5", "mean_per_class_recall"}


def test_a_run_preempted_during_its_final_evals_finishes_them(tmp_path, run_dir, digits_dir):
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    os.remove(os.path.join(workdir, "evals", "step_4", "probe.json"))
    before = len(read_rows(workdir))
    config = config_with_evals(digits_dir)
    result = train.run(config, workdir)
    assert set(result) == {
        "linear_probe/probe/top1",
        "linear_probe/probe/C",
        "linear_probe/probe/val_top1",
        "eval/probe/seconds",
    }
    rows = read_rows(workdir)
    assert len(rows) == before + 1
    # The step's row holds every eval of the step again: those that had finished and the new one.
    assert rows[-1]["step"] == 4 and "zeroshot/digits/top1" in rows[-1]
    assert "linear_probe/probe/top1" in rows[-1]
    assert train.run(config, workdir) == {}  # now nothing is left to do


def test_a_run_preempted_during_evals_mid_run_runs_them_on_resume(tmp_path, run_dir, digits_dir):
    """Preempted while the evals of step 2 ran: the resume from step 2's checkpoint runs the one
    that had not finished, then trains on exactly as before."""
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    shutil.rmtree(os.path.join(workdir, "evals", "step_4"))
    os.remove(os.path.join(workdir, "evals", "step_2", "shots.json"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        kept = [line for line in f if json.loads(line)["step"] <= 2][:-1]  # step 2's evals lost
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(kept)
    train.run(config_with_evals(digits_dir), workdir)
    rows = read_rows(workdir)
    step2 = [r for r in rows if r["step"] == 2 and "fewshot/shots/1shot" in r]
    assert len(step2) == 1 and "zeroshot/digits/top1" in step2[0]
    assert training_losses(workdir) == training_losses(run_dir)
    assert os.path.exists(os.path.join(workdir, "evals", "step_4", "probe.json"))


def test_load_pretrained_and_tokenizer_of_a_run(run_dir):
    model, variables = clip_jax.load_pretrained(run_dir)
    _, at_two = clip_jax.load_pretrained(run_dir, step=2)
    tokenizer = clip_jax.get_tokenizer(run_dir)
    assert tokenizer.context_length == model.text["context_length"] == 16
    images = np.zeros((2, 32, 32, 3), np.float32)
    last = model.apply(variables, images, method="encode_image")
    early = model.apply(at_two, images, method="encode_image")
    assert last.shape == (2, model.embed_dim)
    assert not np.allclose(last, early)  # two different checkpoints
    with pytest.raises(UsageError, match="no checkpoint at step 3"):
        clip_jax.load_pretrained(run_dir, step=3)


def one_device_results(run_dir):
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    model, variables, _ = runs.load_run(run_dir, mesh=mesh)
    config = runs.read_run_config(run_dir)
    results = {}
    for e in runner.make_evaluators(config, model, mesh, sharding.DEFAULT_RULES):
        results.update(e.run(variables))
    return results


def assert_same_results(a, b):
    keys = sorted(k for k in a if metrics.is_eval_value(k))
    assert keys == sorted(k for k in b if metrics.is_eval_value(k))
    for k in keys:
        assert a[k] == b[k], (k, a[k], b[k])


def test_results_identical_on_one_and_eight_devices(run_dir):
    eight = {}
    for row in read_rows(run_dir):
        if row["step"] == 4:
            eight.update({k: v for k, v in row.items() if metrics.is_eval_value(k)})
    assert_same_results(one_device_results(run_dir), eight)


ONE_DEVICE_IN_A_CHILD = """
import json, sys
from tests.test_evals import one_device_results
results = one_device_results(sys.argv[1])
print(json.dumps({k: v for k, v in results.items() if k.split("/")[1] in ("digits", "probe")}))
"""


def test_evaluate_job_on_two_processes_matches_one_device(tmp_path, run_dir):
    output = tmp_path / "results.json"
    args = [f"--workdir={run_dir}", "--evals=digits,probe", f"--output={output}"]
    for returncode, out in run_processes("clip_jax.evaluate", args, devices=4):
        assert returncode == 0, out[-3000:]
    records = json.loads(output.read_text())
    kind = {cls.TASK: kind for kind, cls in registry.TYPES.items()}
    got = {
        f"{kind[r['task']]}/{r['dataset']}/{k}": v for r in records for k, v in r["metrics"].items()
    }
    # One device of a process set up as each of the job's is (4 CPU devices). The probe's
    # L-BFGS fit runs on one device in both; on the CPU backend its last bits change with the
    # host's device count (same features, 1, 2 and 4 devices: top-1 0.823; 8: 0.830, C=3162,
    # where the objective is flat), so the reference must have the job's count.
    child = subprocess.run(
        [sys.executable, "-c", ONE_DEVICE_IN_A_CHILD, run_dir],
        cwd=ROOT,
        env=cpu_env(4),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    expected = json.loads(child.stdout.strip().splitlines()[-1])
    assert_same_results(expected, got)
    assert (tmp_path / "results.md").read_text().count("| digits |") == 1


def test_linear_probe_job_resumes_from_its_feature_cache(tmp_path, run_dir, digits_dir, capsys):
    args = dict(workdir=run_dir, step=None, pretrained=None, cache_dir=str(tmp_path / "cache"))

    def entry():
        return dict(
            type="linear_probe",
            name="digits",
            train_source=f"tfrecord:{digits_dir}/train-*.tfrecord",
            source=f"tfrecord:{digits_dir}/test-*.tfrecord",
            val_source="",
            batch_size=64,
        )

    first = jobs.probe(None, entry=entry(), fewshot=(1,), **args)
    chunks = sorted(os.listdir(tmp_path / "cache" / "digits" / "train"))
    assert chunks[0] == "chunk-000000.npz" and "meta.json" in chunks
    os.remove(tmp_path / "cache" / "digits" / "train" / chunks[1])  # preempted: one chunk lost
    second = jobs.probe(None, entry=entry(), fewshot=(1,), **args)
    assert first[0]["metrics"] == second[0]["metrics"]
    assert first[1]["metrics"] == second[1]["metrics"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--workdir=RUN", "--evals=nope"], "no eval named nope"),
        (["--workdir=RUN", "--pretrained=x.safetensors"], "either --workdir"),
        (["--pretrained=missing.safetensors", "--evals=paper"], "no checkpoint at"),
    ],
)
def test_evaluate_user_errors_are_one_line(run_dir, args, message):
    args = [a.replace("RUN", run_dir) for a in args]
    result = run_python(["-m", "clip_jax.evaluate", *args], timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert message in result.stderr


def test_retrieval_eval_equals_the_metrics_of_the_embeddings(run_dir, digits_dir):
    """Digits shards hold one caption per record under a unique key: retrieval over them equals
    `retrieval.metrics` of the embeddings computed directly."""
    from clip_jax.evals import data, retrieval

    config = runs.read_run_config(run_dir)
    config.evals = {
        "r": dict(
            type="retrieval",
            source=f"tfrecord:{digits_dir}/test-*.tfrecord",
            batch_size=48,
            max_captions=1,
            ks=(1, 5),
        )
    }
    mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
    model, variables, _ = runs.load_run(run_dir, mesh=mesh)
    got = runner.make_evaluators(config, model, mesh, sharding.DEFAULT_RULES)[0].run(variables)
    source = data.open_source(f"tfrecord:{digits_dir}/test-*.tfrecord")
    records = list(source.records().as_numpy_iterator())
    images = np.concatenate([clip_jax.preprocess(pil(r["image"]), 32) for r in records])
    tokens = clip_jax.get_tokenizer(run_dir)([r["captions"].decode() for r in records])
    m, v = clip_jax.load_pretrained(run_dir)
    expected = retrieval.metrics(
        np.asarray(m.apply(v, images, method="encode_image")),
        np.asarray(m.apply(v, tokens, method="encode_text")),
        np.arange(len(records)),
        ks=(1, 5),
    )
    assert expected["image_to_text_r@5"] > 0
    for key, value in expected.items():
        assert abs(got[f"retrieval/r/{key}"] - value) <= 1e-6, key


def test_suite_results_get_a_mean_record():
    records = [
        {
            "dataset": d,
            "source": d,
            "model": "m",
            "task": "zeroshot_classification",
            "metrics": {"top1": t, "top5": 1.0},
            "seconds": 1.0,
        }
        for d, t in (("a", 0.5), ("b", 0.75))
    ]
    mean = jobs.with_mean(records)[-1]
    assert mean["dataset"] == "mean" and mean["metrics"] == {"top1": 0.625, "top5": 1.0}
    assert jobs.with_mean(records[:1]) == records[:1]
    assert "| mean |" in jobs.format_table(jobs.with_mean(records))


def test_bad_eval_entries_are_clear(digits_dir):
    test = f"tfrecord:{digits_dir}/test-*.tfrecord"
    with pytest.raises(ValueError, match="choose one of"):
        registry.entry_config("x", dict(type="zero_shot", source=test))
    with pytest.raises(ValueError, match="unknown key"):
        registry.entry_config("x", dict(type="zeroshot", source=test, every=5))
    with pytest.raises(ValueError, match="train_source is empty"):
        registry.entry_config("x", dict(type="linear_probe", source=test))
    with pytest.raises(ValueError, match="features="):
        registry.entry_config(
            "x", dict(type="fewshot", source=test, train_source=test, features="mid")
        )
    assert jobs.select_evals(None, "paper", "/data", 0)["cifar10"]["data_dir"] == "/data"


class ImageNorm(Evaluator):
    """A new eval type, whole: the mean p-norm of the image embeddings of a source."""

    KEYS: ClassVar[dict[str, Key]] = {"order": Key(2, "the norm's order p", POSITIVE_INT)}
    TASK = "image_norm"

    def _predict(self):
        model = self.model

        def predict(variables, batch, extra):
            del extra
            images = extract.normalize(batch["image"])
            return {"emb": model.apply(variables, images, method="encode_image")}

        return predict

    def evaluate(self, variables, model_id, cache_root):
        out, _ = self.extract("emb", self._predict, variables, self.source)
        norms = np.linalg.norm(out["emb"].astype(np.float64), ord=self.cfg["order"], axis=1)
        return {"value": float(norms.mean())}


def test_a_new_eval_type_is_one_class_and_one_registry_line(
    monkeypatch, tmp_path, run_dir, digits_dir
):
    monkeypatch.setitem(registry.TYPES, "image_norm", ImageNorm)  # the one registry line
    test = f"tfrecord:{digits_dir}/test-*.tfrecord"
    entry = dict(type="image_norm", source=test, order=1, batch_size=48, every_steps=1)
    config = tiny_config(total_steps=2, checkpoint_every_steps=2, **{"evals.norm": entry})
    validate.validate(config)  # its keys have their rules and meanings with the class
    assert validate.config_meanings()["evals.*.order"] == "the norm's order p"
    with pytest.raises(UsageError, match=r"^evals.norm.order=0: use a positive integer$"):
        validate.validate(tiny_config(**{"evals.norm": {**entry, "order": 0}}))
    with pytest.raises(UsageError, match="unknown key"):
        registry.entry_config("norm", {**entry, "ks": (1,)})

    train.run(config, str(tmp_path))  # scheduled, logged and recorded like the others
    rows = [r for r in read_rows(str(tmp_path)) if "image_norm/norm/value" in r]
    assert [r["step"] for r in rows] == [1, 2]
    with open(tmp_path / "evals" / "step_2" / "norm.json") as f:
        assert json.load(f)["task"] == "image_norm"

    from clip_jax.evals import data  # TensorFlow: see tests/test_imports.py

    model, variables = clip_jax.load_pretrained(str(tmp_path))
    source = data.open_source(test)
    images = np.concatenate(
        [clip_jax.preprocess(pil(r["image"]), 32) for r in source.records().as_numpy_iterator()]
    )
    emb = np.asarray(model.apply(variables, images, method="encode_image"), np.float64)
    expected = np.abs(emb).sum(axis=1).mean()
    np.testing.assert_allclose(rows[-1]["image_norm/norm/value"], expected, rtol=1e-5)
