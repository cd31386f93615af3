"""The one-command demo: `digits:` sources write their cache once, held-out zero-shot templates,
the curves PNG and results table, and a shortened `python -m clip_jax.main --config=configs/demo.py`
end to end (the full demo takes minutes and is not run here)."""

import json
import os
import re
import subprocess
import sys
import threading

import pytest
from PIL import Image

from clip_jax.data import digits
from clip_jax.evals import prompts
from clip_jax.infra import cache
from clip_jax.infra.errors import UsageError
from clip_jax.training import plots
from tests.conftest import PNG_SIGNATURE, ROOT


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_digits_cache_is_written_once(cache_root, monkeypatch):
    pattern = digits.cached_shards("train")
    directory = os.path.dirname(pattern)
    assert directory.startswith(str(cache_root / "digits"))
    files = sorted(os.listdir(directory))
    assert files == ["classnames.txt", "test-00000.tfrecord", "train-00000.tfrecord",
                     "train-00001.tfrecord"]  # fmt: skip
    stamps = {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in files}

    def fail(*args, **kwargs):
        raise AssertionError("the cache was written again")

    monkeypatch.setattr(digits, "write_digits", fail)
    assert digits.cached_shards("test") == os.path.join(directory, "test-*.tfrecord")
    assert digits.cached_shards("train") == pattern
    assert {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in files} == stamps
    # Nothing half-written is left beside it.
    assert sorted(os.listdir(os.path.dirname(directory))) == ["v1-32px", "v1-32px.lock"]


def test_concurrent_first_uses_write_the_cache_once(tmp_path, monkeypatch):
    calls, started = [], threading.Event()

    def slow_write(output, image_size):
        calls.append(output)
        started.set()
        threading.Event().wait(0.3)  # the others arrive while this one writes
        for split in digits.SPLITS:
            open(os.path.join(output, f"{split}-00000.tfrecord"), "w").close()

    monkeypatch.setattr(digits, "write_digits", slow_write)
    directory = str(tmp_path / "digits")
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(digits.cached_shards("test", directory)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and started.is_set()
    assert results == [os.path.join(directory, "test-*.tfrecord")] * 4
    assert sorted(os.listdir(directory)) == ["test-00000.tfrecord", "train-00000.tfrecord"]
    assert sorted(os.listdir(tmp_path)) == ["digits", "digits.lock"]  # the temporary is gone


def test_a_failed_write_leaves_no_cache(tmp_path, monkeypatch):
    def broken(output, image_size):
        open(os.path.join(output, "train-00000.tfrecord"), "w").close()
        raise RuntimeError("disk full")

    monkeypatch.setattr(digits, "write_digits", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        digits.cached_shards("train", str(tmp_path / "digits"))
    assert sorted(os.listdir(tmp_path)) == ["digits.lock"]  # the next use writes it afresh


def test_unknown_digits_split_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"digits:val: no such split; use digits:train or"):
        digits.cached_shards("val", str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_digits_eval_source_has_labels_and_class_names(cache_root):
    from clip_jax.evals import data

    source = data.open_source("digits:test")
    assert source.name == "digits:test" and source.has_labels
    assert source.classnames == list(digits.CLASS_NAMES)
    assert source.num_examples == digits.TEST_SIZE


def _normalized(template: str) -> str:
    return re.sub(r"[^a-z{} ]", "", template.lower()).strip()


def test_heldout_templates_are_not_training_templates():
    heldout = prompts.templates("digits_heldout")
    training = {
        t.replace("{word}", "{}").replace("{digit}", "{}") for t in digits.TEMPLATES
    }  # as the digit's word or numeral, both become the class name's slot
    assert len(heldout) >= 5
    assert not set(heldout) & training
    assert not {_normalized(t) for t in heldout} & {_normalized(t) for t in training}


def test_demo_config_evaluates_with_heldout_templates_on_test_digits():
    sys.path.insert(0, ROOT)
    from configs import demo

    c = demo.get_config()  # no side effect: nothing is written at config load
    assert c.train_data.source == "digits:train"
    zeroshot = [e for e in c.evals.values() if e.type == "zeroshot"]
    probes = [e for e in c.evals.values() if e.type == "linear_probe"]
    assert zeroshot and probes
    assert all(e.templates == "digits_heldout" and e.source == "digits:test" for e in zeroshot)
    assert all(e.train_source == "digits:train" and e.source == "digits:test" for e in probes)


def _write_metrics(workdir, with_evals: bool):
    rows = [
        {"step": s, "loss": 4.0 - s / 50, "learning_rate": 1e-3 * min(1, s / 20),
         "logit_scale": 14.0 - s / 100, "pairs_per_sec": 100.0}
        for s in range(10, 101, 10)
    ]  # fmt: skip
    if with_evals:
        rows += [
            {"step": 50, "zeroshot/digits/top1": 0.5, "zeroshot/digits/top5": 0.9,
             "eval/digits/seconds": 2.0},
            {"step": 100, "zeroshot/digits/top1": 0.9, "zeroshot/digits/top5": 1.0,
             "linear_probe/probe/top1": 0.96, "linear_probe/probe/C": 3.16,
             "eval/digits/seconds": 2.0},
        ]  # fmt: skip
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.mark.parametrize("with_evals", [False, True])
def test_plot_run_writes_a_png(tmp_path, with_evals):
    _write_metrics(tmp_path, with_evals)
    path = plots.plot_run(str(tmp_path))
    assert path == str(tmp_path / "curves.png")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width > 600 and height > 300  # two columns; two rows with evals
    table = plots.results_table(str(tmp_path))
    if not with_evals:
        assert table == ""
        return
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "step", "value"]
    assert "linear_probe/probe/top1      100  0.9600" in table
    assert "zeroshot/digits/top1         100  0.9000" in table
    assert "seconds" not in table


def test_plot_run_keeps_the_last_value_of_a_step_logged_twice(tmp_path):
    _write_metrics(tmp_path, with_evals=True)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a resumed run logs step 100 again
        f.write(json.dumps({"step": 100, "zeroshot/digits/top1": 0.8}) + "\n")
    assert plots.read_series(str(tmp_path))["zeroshot/digits/top1"] == [(50, 0.5), (100, 0.8)]
    plots.plot_run(str(tmp_path))


def test_plot_run_of_a_folder_without_metrics_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="metrics.jsonl: no such file"):
        plots.plot_run(str(tmp_path))


def test_shortened_demo_runs_end_to_end(tmp_path):
    """The demo's own command with fewer steps and a fresh cache: data written, trained,
    evaluated on the held-out digits, curves drawn."""
    workdir = tmp_path / "run"
    # One CPU device, as on a user's machine (the tests' 8 simulated devices cost seconds here).
    env = {**os.environ, cache.ENV: str(tmp_path / "cache"), "XLA_FLAGS": ""}
    command = [
        sys.executable,
        "-m",
        "clip_jax.main",
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        "--config.total_steps=4",
        "--config.log_every_steps=2",
        "--config.evals.digits.every_steps=2",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "zeroshot/digits/top1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    final = {k: v for r in rows if r["step"] == 4 for k, v in r.items()}
    for key in ("zeroshot/digits/top1", "zeroshot/digits/top5", "linear_probe/probe/top1"):
        assert 0 <= final[key] <= 1, key
    assert os.path.isdir(tmp_path / "cache" / "digits" / "v1-32px")
    result = json.loads((workdir / "evals" / "step_4" / "probe.json").read_text())
    assert result["source"] == "digits:test"
    assert (workdir / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
