"""`python -m clip_jax.benchmark` modes run on a tiny config and print JSON as their last line."""

import json
import os
import platform
import subprocess
import sys

import pytest

from tests.conftest import ROOT, write_wds_with_bad_records


def run_benchmark(*args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("GLIBC_TUNABLES", None)
    env.update(env_vars)
    return subprocess.run(
        [sys.executable, "-m", "clip_jax.benchmark", "--config=configs/tiny.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_input_mode_prints_examples_per_second_last():
    done = run_benchmark("--what=input", "--steps=2", "--batch_size=16")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["what"] == "input" and result["image_size"] == 32
    assert result["examples_per_sec"] > 0 and result["per_core"] > 0 and result["cores"] >= 1
    # Without a source: the same made-up JPEGs as TFRecords and as webdataset tars.
    assert result["tfrecord_examples_per_sec"] > 0 and result["wds_examples_per_sec"] > 0
    assert result["wds_over_tfrecord"] > 0


def test_input_mode_reads_the_configs_source(tmp_path):
    source, bad = write_wds_with_bad_records(tmp_path, good=40, image_size=24)
    done = run_benchmark(
        "--what=input",
        "--steps=2",
        "--batch_size=16",
        f"--config.train_data.source={source}",
        "--config.train_data.shuffle_buffer=0",  # file order: the bad samples come first
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["source"] == source and result["image_shape"] == [16, 32, 32, 3]
    # Warm-up and timed batches take 2 passes over the 40 good samples: 5 bad ones per pass.
    assert result["skipped_examples"] == 2 * bad


def test_an_unknown_mode_is_a_usage_error():
    done = run_benchmark("--what=nonsense")
    assert done.returncode != 0 and "--what=nonsense: choose one of" in done.stderr


def test_train_step_mode_reports_pairs_per_second_and_flops():
    done = run_benchmark("--what=train_step", "--steps=2", "--batch_size=16")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["what"] == "train_step" and result["pairs_per_sec"] > 0
    assert result["flops_per_step"] > 0 and result["mfu"] is None  # no known peak on a CPU
    assert result["minor_faults_per_step"] >= 0 and result["glibc_tunables"] == ""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_a_command_keeps_the_steps_temporaries_mapped_by_itself():
    """At batch 1024 the tiny step's temporaries are large blocks that glibc, left at its
    defaults, maps afresh each step (and the mode says so). A command sets the allocator itself
    at start-up (`infra.allocator`), in the default environment: a timed step (the median of the
    steps, as for the step time) then faults in less than a third of the default's pages (the
    heap's last growths, which may fall after the warm-up when the cores are busy, come once, not
    every step). One CPU device, as a CPU run has (with many forced devices one arena is shared
    by all their threads, and the settings are not applied)."""
    from clip_jax.tools.benchmark_step import FAULTS_HINT

    steps = 6
    args = ("--what=train_step", f"--steps={steps}", "--batch_size=1024")
    default = run_benchmark(*args, XLA_FLAGS="", CLIP_JAX_MALLOC="default")
    assert default.returncode == 0, default.stderr[-2000:]
    result = json.loads(default.stdout.splitlines()[-1])
    per_step = result["minor_faults_per_step"]
    assert per_step > FAULTS_HINT
    assert result["allocator"] == "glibc defaults (CLIP_JAX_MALLOC=default)"
    assert "page faults a step" in default.stderr
    tuned = run_benchmark(*args, XLA_FLAGS="")
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    result = json.loads(tuned.stdout.splitlines()[-1])
    assert result["minor_faults_per_step"] * steps < 2 * per_step
    assert result["allocator"] == "one arena, no mmap, no trim" and result["glibc_tunables"] == ""
    assert "page faults a step" not in tuned.stderr
    eight = run_benchmark("--what=train_step", "--steps=1", "--batch_size=64")  # 8 devices
    assert json.loads(eight.stdout.splitlines()[-1])["allocator"].endswith("several CPU devices)")


def test_loss_memory_mode_compares_gathered_and_chunked():
    done = run_benchmark("--what=loss_memory", "--batch_size=1024", "--config.loss.chunk_size=64")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 < result["chunked_temp_bytes"] < result["gathered_temp_bytes"]


def test_zeroshot_mode_compares_the_eval_step_with_the_tower():
    done = run_benchmark("--what=zeroshot", "--steps=2", "--batch_size=16")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["what"] == "zeroshot" and result["classes"] == 1000
    for key in (
        "tower_examples_per_sec",
        "zeroshot_examples_per_sec",
        "zeroshot_over_tower",
        "end_to_end_examples_per_sec",
    ):
        assert result[key] > 0, key


def test_vs_openclip_mode_needs_the_peers_model_name():
    done = run_benchmark("--what=vs_openclip", "--steps=1")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--openclip_model" in done.stderr.strip().splitlines()[-1]


def test_vs_openclip_mode_refuses_another_model():
    pytest.importorskip("open_clip")
    done = run_benchmark("--what=vs_openclip", "--steps=1", "--openclip_model=RN50")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "compare the same model" in done.stderr.strip().splitlines()[-1]


def test_vs_openclip_mode_times_both_steps_and_the_matmuls():
    pytest.importorskip("open_clip")
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "XLA_FLAGS": "",  # one CPU device, as the peer has
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_jax.benchmark",
            "--what=vs_openclip",
            "--config=configs/b32.py",
            "--config.model.dtype=float32",
            "--openclip_model=ViT-B-32",
            "--batch_size=2",
            "--steps=1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["clip_jax_pairs_per_sec"] > 0 and result["open_clip_pairs_per_sec"] > 0
    assert result["ratio"] > 0 and result["mfu_of_matmul"] > 0
    assert result["model_flops_per_step"] == pytest.approx(88.66e9, rel=1e-3)
    assert set(result["matmul_tflops_per_sec"]) == {"1024", "2048", "3072"}
    assert result["minor_faults_per_step"] >= 0


@pytest.mark.parametrize(
    "kind,peak",
    [
        ("TPU v5", 459.0),  # v5p, as JAX names it
        ("TPU v5 lite", 197.0),
        ("TPU v4", 275.0),
        ("TPU v6 lite", 918.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA A100-SXM4-40GB", 312.0),
        ("cpu", None),
        ("TPU v7", None),
    ],
)
def test_mfu_and_pod_fit_read_one_chip_table(kind, peak):
    from clip_jax.tools import chips

    assert chips.peak_tflops(kind) == peak
    if kind.startswith("TPU") and peak is not None:
        (chip,) = [c for c in chips.TPUS.values() if c.kind == kind]
        assert chip.peak_tflops == peak
