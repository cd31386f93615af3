"""Checkpoints: exact resume after SIGTERM (one and two processes), SIGKILL during an asynchronous
save, restore onto another mesh and device count, export / init_from / LiT."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import clip_jax
from clip_jax import convert
from clip_jax.inference import load
from clip_jax.parallel import sharding
from clip_jax.training import checkpoint
from clip_jax.training import state as state_lib
from clip_jax.training import trainer as train
from tests.conftest import (
    ROOT,
    cpu_env,
    free_port,
    read_losses,
    run_python,
    tiny_config,
    write_shard_with_bad_records,
    write_wds_with_bad_records,
)

TOTAL = 20
CHECKPOINTED = {"total_steps": TOTAL, "checkpoint_every_steps": 7}  # the runs these tests stop


def config_overrides(total=TOTAL, source="synthetic"):
    """make_config's run, total steps and training data as command-line flags."""
    keys = {**CHECKPOINTED, "log_every_steps": 1, "total_steps": total, "train_data.source": source}
    return [f"--config.{key}={value}" for key, value in keys.items()]


def make_config(**overrides):
    return tiny_config(**{**CHECKPOINTED, **overrides})


def saved_steps(workdir):
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    return sorted(int(n) for n in names if n.isdigit())


def cli(workdir, *args, devices=8, process=None):
    cmd = [
        sys.executable,
        "-m",
        "clip_jax.main",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
    ]
    if process is not None:
        port, index, count = process
        cmd += [
            f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={count}",
            f"--process_id={index}",
        ]
    return subprocess.Popen(
        cmd + list(args),
        cwd=ROOT,
        env=cpu_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_step(workdir, step, procs, timeout=300):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.path.exists(path) and max(read_losses(workdir), default=0) >= step:
                return
        except json.JSONDecodeError:  # a line being written
            pass
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a run ended early:\n" + procs[0].communicate()[0][-3000:])
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged")


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    """Real data: the handwritten digits as TFRecord shards, with planted bad records."""
    directory = tmp_path_factory.mktemp("digits")
    return write_shard_with_bad_records(directory, good=200)[0]


@pytest.fixture(scope="module")
def digit_tars(tmp_path_factory):
    """The same as webdataset tars (3, so that files are shuffled too), with bad samples."""
    directory = tmp_path_factory.mktemp("digit_tars")
    return write_wds_with_bad_records(directory, good=200, shards=3)[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's losses (8 devices, data=8)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    train.run(make_config(), workdir)
    return read_losses(workdir)


@pytest.fixture(scope="module")
def reference_shards(tmp_path_factory, digit_shards):
    workdir = str(tmp_path_factory.mktemp("reference_shards"))
    train.run(make_config(**{"train_data.source": digit_shards}), workdir)
    return read_losses(workdir)


@pytest.fixture(scope="module")
def reference_tars(tmp_path_factory, digit_tars):
    workdir = str(tmp_path_factory.mktemp("reference_tars"))
    train.run(make_config(**{"train_data.source": digit_tars}), workdir)
    return read_losses(workdir)


# Steps across processes are slow on CPUs (gloo collectives, seconds per step): a shorter run.
TOTAL_MP = 8


@pytest.fixture(scope="module")
def reference_mp(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference_mp"))
    train.run(make_config(total_steps=TOTAL_MP), workdir)
    return read_losses(workdir)


@pytest.mark.parametrize(
    "data,sig,reason",
    [
        ("synthetic", signal.SIGTERM, "preempted"),
        ("tfrecord", signal.SIGTERM, "preempted"),
        ("wds", signal.SIGTERM, "preempted"),
        ("synthetic", signal.SIGINT, "interrupted"),  # Ctrl-C: the same save and exit
    ],
)
def test_sigterm_saves_exits_zero_and_resumes_exactly(tmp_path, data, sig, reason, request):
    if data == "synthetic":
        source, reference = "synthetic", request.getfixturevalue("reference")
    elif data == "tfrecord":
        source = request.getfixturevalue("digit_shards")
        reference = request.getfixturevalue("reference_shards")
    else:
        source = request.getfixturevalue("digit_tars")
        reference = request.getfixturevalue("reference_tars")
    workdir = str(tmp_path)
    proc = cli(workdir, *config_overrides(source=source))
    wait_for_step(workdir, 3, [proc])
    proc.send_signal(sig)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    k = max(read_losses(workdir))
    assert 3 <= k < TOTAL and k in saved_steps(workdir)
    assert f"{reason}: saved step {k}" in out

    proc = cli(workdir, *config_overrides(source=source))
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert f"resuming from the checkpoint at step {k}" in out
    got = read_losses(workdir)
    for step in range(k + 1, TOTAL + 1):
        assert abs(got[step] - reference[step]) <= 1e-6, (step, got[step], reference[step])
    if data == "wds":  # bit-identical, not merely close
        assert {s: got[s] for s in range(k + 1, TOTAL + 1)} == {
            s: reference[s] for s in range(k + 1, TOTAL + 1)
        }


TWO_CTRL_C = """
import os, signal, time
from clip_jax.training import checkpoint
watcher = checkpoint.PreemptionWatcher()
assert not watcher.reached(1)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.1)  # the handler runs in the main thread, at its next instruction
assert watcher.reached(2) and watcher.reason == "interrupted"
print("first: save and stop", flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("not reached", flush=True)
"""


def test_first_ctrl_c_asks_for_a_save_and_the_second_aborts():
    result = run_python(["-c", TWO_CTRL_C], timeout=120)
    assert result.returncode == 130, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["first: save and stop"]
    assert result.stderr.strip().splitlines()[-1].startswith("error: interrupted twice")
    assert "Traceback" not in result.stderr


KILL_DURING_SAVE = """
import json, os, signal, sys
from clip_jax.training import checkpoint, trainer as train
from tests.conftest import tiny_config

save = checkpoint.Checkpointer.save
steps = []

def save_then_die(self, step, state, data_state, **kwargs):
    blocked = save(self, step, state, data_state, **kwargs)
    steps.append(step)
    if len(steps) == 2:  # the asynchronous write of the second checkpoint has just begun
        os.kill(os.getpid(), signal.SIGKILL)
    return blocked

checkpoint.Checkpointer.save = save_then_die
train.run(tiny_config(**json.loads(sys.argv[2])), sys.argv[1])
"""


def test_sigkill_during_async_save_keeps_the_previous_checkpoint(tmp_path, reference):
    workdir = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, workdir, json.dumps(CHECKPOINTED)],
        cwd=ROOT,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    assert saved_steps(workdir) == [7]
    partial = [n for n in names if "tmp" in n]  # the second save (step 14, or just after it)
    assert len(partial) == 1 and int(partial[0].split(".")[0]) >= 14, names

    train.run(make_config(), workdir)  # resumes from 7, cleans the partial 14
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    assert not any("tmp" in n for n in names), names
    got = read_losses(workdir)
    for step in range(8, TOTAL + 1):
        assert abs(got[step] - reference[step]) <= 1e-6, step


def test_two_processes_sigterm_to_one_both_save_the_same_step(tmp_path, reference_mp):
    workdir = str(tmp_path)

    def launch():
        port = free_port()
        overrides = config_overrides(TOTAL_MP)
        return [cli(workdir, *overrides, devices=4, process=(port, i, 2)) for i in range(2)]

    procs = launch()
    wait_for_step(workdir, 2, procs)
    procs[1].send_signal(signal.SIGTERM)  # one process only, as when one host is preempted
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    saved = [int(out.split("preempted: saved step ")[1].split()[0]) for out in outs]
    assert saved[0] == saved[1] and saved[0] in saved_steps(workdir)
    k = saved[0]
    assert k < TOTAL_MP

    for p in launch():
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out[-3000:]
    got = read_losses(workdir)
    for step in range(k + 1, TOTAL_MP + 1):
        assert abs(got[step] - reference_mp[step]) <= 1e-6, step


def restore_params(workdir, mesh, config):
    spec = state_lib.build(config, mesh)
    ckpt = checkpoint.Checkpointer(workdir)
    restored, _ = ckpt.restore(ckpt.latest_step(), spec.abstract_with_shardings())
    ckpt.close()
    return restored.params


def test_restore_onto_another_mesh_and_device_count_is_bit_exact(tmp_path):
    config = make_config(total_steps=2, **{"mesh.data": 2, "mesh.fsdp": 4})
    train.run(config, str(tmp_path))
    saved_on = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
    four = sharding.make_mesh(dict(data=4, fsdp=1, tensor=1), devices=jax.devices()[:4])
    original = restore_params(str(tmp_path), saved_on, config)
    moved = restore_params(str(tmp_path), four, config)
    kernel = moved["visual"]["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"]
    assert len(kernel.sharding.device_set) == 4
    for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(moved), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_finished_run_says_so_and_exits_zero(tmp_path):
    train.run(make_config(total_steps=2), str(tmp_path))
    proc = cli(str(tmp_path), *config_overrides(total=2))
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "already reached step 2 of 2" in out


def test_export_init_from_and_lit(tmp_path):
    base = str(tmp_path / "base")
    train.run(make_config(total_steps=2), base)
    exported = str(tmp_path / "base.safetensors")
    assert convert.main(["export", "--workdir", base, "--out", exported]) == 0
    _, variables = clip_jax.load_pretrained(exported)
    restored = restore_params(
        base, sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)), make_config(total_steps=2)
    )
    for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # LiT: start from those weights with the image tower frozen.
    lit = str(tmp_path / "lit")
    train.run(make_config(total_steps=3, init_from=exported, **{"optim.frozen": ("visual",)}), lit)
    lit_file = str(tmp_path / "lit.safetensors")
    assert load.export_run(lit, lit_file) == 3
    _, after = clip_jax.load_pretrained(lit_file)
    for a, b in zip(
        jax.tree.leaves(after["params"]["visual"]),
        jax.tree.leaves(variables["params"]["visual"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    text_before = variables["params"]["text_tower"]["text_projection"]
    assert not np.array_equal(after["params"]["text_tower"]["text_projection"], text_before)
