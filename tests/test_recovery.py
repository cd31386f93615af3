"""Recovery from divergence: resume from a chosen step, spike detection, rollback and halt, the
keep policy around a spike; nothing moved aside is lost (every moved checkpoint restores)."""

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from clip_jax.infra.errors import UsageError
from clip_jax.training import checkpoint, guard, recovery, runs
from clip_jax.training import trainer as train
from clip_jax.training.spikes import SpikeDetector
from tests import spiked_run
from tests.conftest import ROOT, cpu_env, free_port, read_losses, read_rows, tiny_config

SANE = {"checkpoint_every_steps": 1, "optim.warmup_steps": 0, "spike.window": 3}


def every_moved_checkpoint_restores(workdir):
    """Each checkpoint under workdir/abandoned/ loads as a run of its own (the folder is a
    workdir: runs.load_run, as load_pretrained reads a run); returns how many there are."""
    root = os.path.join(workdir, recovery.ABANDONED_DIR)
    count = 0
    for branch in sorted(os.listdir(root)):
        folder = os.path.join(root, branch)
        for step in checkpoint.Checkpointer(folder, create=False).all_steps():
            _, variables, loaded = runs.load_run(folder, step)
            assert loaded == step and variables["params"]
            count += 1
    return count


# --- The detector ------------------------------------------------------------------------------


def test_detector_counts_spikes_acts_on_a_run_of_them_and_resumes_exactly():
    losses = [3.0, 3.1, 2.9, 3.0, 9.0, 8.0, 2.95, 3.05, 3.0, 7.0]
    detector = SpikeDetector(window=4, factor=6.0, length=2)
    acted, copies = [], []
    for step, loss in enumerate(losses, 1):
        copies.append(SpikeDetector(4, 6.0, 2, state=json.loads(json.dumps(detector.state()))))
        acted.append(detector.observe(step, loss))
    assert acted == [False] * 5 + [True] + [False] * 4  # steps 5, 6: two in a row
    assert detector.spikes == 3  # 5, 6 and 10
    assert detector.episode_start == 10  # 7, 8 (two calm steps) ended the first episode
    # A detector restored from any step's state reads the rest exactly as the original did.
    for start, copy in enumerate(copies):
        again = [copy.observe(step, loss) for step, loss in enumerate(losses, 1)][start:]
        assert again == acted[start:] and copy.state() == detector.state()
    assert not SpikeDetector(0, 6.0, 1).observe(1, 1e9)  # window 0: off
    # A loss that stopped moving: the spread is at least 1% of the mean (2.12 here).
    for last, spike in ((2.11, False), (2.13, True)):
        flat = SpikeDetector(3, 6.0, 1)
        assert [flat.observe(s, v) for s, v in enumerate([2.0, 2.0, 2.0, last], 1)][3] == spike


# --- Halt: the message names the sane checkpoint and the command that resumes from it ---------


def main_cli(workdir, *args):
    flags = [f"--config.{k}={v}" for k, v in SANE.items()] + ["--config.log_every_steps=1"]
    cmd = [sys.executable, "-m", "clip_jax.main", "--config=configs/tiny.py"]
    return subprocess.run(
        cmd + [f"--workdir={workdir}", *flags, *args],
        cwd=ROOT,
        env=cpu_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_halt_names_the_sane_checkpoint_and_its_command_finishes_the_run(tmp_path):
    workdir = str(tmp_path / "run")
    done = main_cli(workdir, "--config.total_steps=4")
    assert done.returncode == 0, done.stderr[-2000:]
    blown = main_cli(workdir, "--config.total_steps=8", "--config.optim.learning_rate=1e30")
    assert blown.returncode == 3, blown.stderr[-2000:]
    line = [x for x in blown.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in blown.stderr
    assert "non-finite at step 6" in line[0] and "is step 4" in line[0], line[0]
    command = shlex.split(line[0].split("(rerun: ")[1].rstrip(")"))
    assert command[:3] == ["python", "-m", "clip_jax.main"]
    assert "--config.resume_step=4" in command
    # Step 5 holds the exploded weights: the resume leaves it aside. The user lowers the rate.
    args = [a for a in command[3:] if not a.startswith("--config.optim.learning_rate")]
    resumed = subprocess.run(
        [sys.executable, "-m", "clip_jax.main", *args],
        cwd=ROOT,
        env=cpu_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = [r for r in read_rows(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) for r in rows) and rows[-1]["nonfinite_steps"] == 0
    (branch,) = recovery.branch_records(workdir)
    assert branch["kind"] == "resume_step" and branch["to_step"] == 4
    assert branch["moved_steps"] == [5]
    assert every_moved_checkpoint_restores(workdir) == 1


# --- Rollback --------------------------------------------------------------------------------


def test_rollback_after_a_blown_learning_rate_recovers_and_finishes(tmp_path):
    workdir = str(tmp_path)
    train.run(tiny_config(total_steps=4, **SANE), workdir)
    blown = {
        **SANE,
        "optim.learning_rate": 1.0,
        "nonfinite": "rollback",
        "spike.policy": "rollback",
        "spike.length": 1,
        "rollback_lr_scale": 0.1,
    }
    last = train.run(tiny_config(total_steps=10, **blown), workdir)
    assert last["rollbacks"] >= 1 and np.isfinite(last["loss"])
    rows = read_rows(workdir)
    backs = [r for r in rows if "rollback/from_step" in r]
    assert backs and all(r["step"] == 4 for r in backs)
    assert [r["rollback/lr_scale"] for r in backs] == [0.1**k for k in range(1, len(backs) + 1)]
    assert rows[-1]["skipped_batches"] == sum(r["rollback/skipped_batches"] for r in backs)
    assert rows[-1]["spikes"] >= len(backs)
    assert sorted(r["step"] for r in rows if "loss" in r) == list(range(1, 11))
    assert every_moved_checkpoint_restores(workdir) == len(backs)
    assert len(recovery.branch_records(workdir)) == len(backs)


SPIKE = {
    "total_steps": 12,
    "checkpoint_every_steps": 2,
    "log_every_steps": 1,
    "spike.window": 3,
    "spike.length": 1,
    "spike.policy": "rollback",
}


def spiked_cli(workdir, devices=1, process=None):
    """`python -m tests.spiked_run` (batch 8's captions swapped) with SPIKE's config."""
    cmd = [sys.executable, "-m", "tests.spiked_run", "--config=configs/tiny.py"]
    cmd += [f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in SPIKE.items()]]
    if process is not None:
        port, index = process
        cmd += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
        cmd += [f"--process_id={index}"]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=cpu_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def spiked_reference(tmp_path_factory):
    """The spiked run rolled back on one process with one device."""
    workdir = str(tmp_path_factory.mktemp("spiked"))
    p = spiked_cli(workdir)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out[-3000:]
    return workdir


def test_a_spike_is_detected_and_rolled_back_past(spiked_reference):
    rows = read_rows(spiked_reference)
    (back,) = [r for r in rows if "rollback/from_step" in r]
    # Batch 8 spiked at step 8; checkpoint 6 is the newest from before (its weights made step
    # 7's loss, which was calm); the batches of steps 7 and 8 are skipped.
    assert back["step"] == 6 and back["rollback/from_step"] == 8
    assert back["rollback/skipped_batches"] == 2 and back["spikes"] == 1
    losses = read_losses(spiked_reference)
    assert sorted(losses) == list(range(1, 13))
    assert max(losses[s] for s in range(7, 13)) < losses[6] + 0.3  # no spike after it
    assert rows[-1]["skipped_batches"] == 2 and rows[-1]["rollbacks"] == 1


def test_a_spike_rolled_back_on_two_processes_gives_the_same_losses(tmp_path, spiked_reference):
    workdir = str(tmp_path)
    port = free_port()
    procs = [spiked_cli(workdir, devices=4, process=(port, i)) for i in range(2)]
    for p in procs:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out[-3000:]
    ours, reference = read_losses(workdir), read_losses(spiked_reference)
    assert sorted(ours) == sorted(reference)
    for step in reference:
        assert abs(ours[step] - reference[step]) <= 1e-5, step
    (back,) = [r for r in read_rows(workdir) if "rollback/from_step" in r]
    assert back["step"] == 6 and back["rollback/skipped_batches"] == 2


def test_spike_policy_halt_names_the_checkpoint_before_the_spike(tmp_path):
    saved = spiked_run.patch()
    try:
        with pytest.raises(guard.LossSpikeError) as e:
            train.run(tiny_config(**{**SPIKE, "spike.policy": "halt"}), str(tmp_path))
    finally:
        spiked_run.unpatch(saved)
    assert "a loss spike at step 8" in str(e.value) and "is step 6" in str(e.value)
    assert "rerun with --config.resume_step=6" in str(e.value)
    assert 8 not in checkpoint.Checkpointer(str(tmp_path), create=False).all_steps()


class StopAfterRollback(Exception):
    pass


def test_a_resume_right_after_a_rollback_skips_the_same_batches(tmp_path, monkeypatch):
    """Stopped before the first checkpoint after the rollback: the resume from step 6 skips the
    batches the rollback skipped, so the run is the same as the uninterrupted one."""
    rollback = recovery.Recovery._rollback

    def rollback_then_stop(self, *args):
        rollback(self, *args)
        raise StopAfterRollback

    saved = spiked_run.patch()
    try:
        whole = str(tmp_path / "whole")
        train.run(tiny_config(**SPIKE), whole)
        stopped = str(tmp_path / "stopped")
        monkeypatch.setattr(recovery.Recovery, "_rollback", rollback_then_stop)
        with pytest.raises(StopAfterRollback):
            train.run(tiny_config(**SPIKE), stopped)
        monkeypatch.undo()
        assert checkpoint.Checkpointer(stopped, create=False).all_steps()[-1] == 6
        train.run(tiny_config(**SPIKE), stopped)
    finally:
        spiked_run.unpatch(saved)
    ours, reference = read_losses(stopped), read_losses(whole)
    for step in range(7, 13):
        assert ours[step] == reference[step], step
    assert read_rows(stopped)[-1]["skipped_batches"] == 2


# --- The keep policy ---------------------------------------------------------------------------


def test_the_newest_checkpoint_before_a_spike_is_kept_until_the_run_recovers(tmp_path):
    listings, spiking = {}, {}
    save = checkpoint.Checkpointer.save

    def save_and_list(self, step, *args, **kwargs):
        self.wait()  # the previous write done, and what the keep policy deletes deleted
        listings[step] = self.all_steps()
        spiking[step] = kwargs["trainer"]["spiking"]
        return save(self, step, *args, **kwargs)

    saved = spiked_run.patch()
    checkpoint.Checkpointer.save = save_and_list
    try:
        config = {**SPIKE, "checkpoint_every_steps": 1, "keep_checkpoints": 1}
        config.update({"spike.policy": "log", "spike.length": 2})
        train.run(tiny_config(**config), str(tmp_path))
    finally:
        checkpoint.Checkpointer.save = save
        spiked_run.unpatch(saved)
    # keep_checkpoints=1 keeps 2 while spikes are watched (a spike at the next step goes back
    # to the one before the newest); the spike at step 8 keeps checkpoint 6 until two calm
    # steps (9, 10) end the episode.
    assert listings[8] == [6, 7]
    assert listings[9] == [6, 7, 8] and listings[10] == [6, 8, 9]
    assert listings[11] == [9, 10]
    assert [s for s, marked in sorted(spiking.items()) if marked] == [8, 9]  # the episode's
    ckpt = checkpoint.Checkpointer(str(tmp_path), create=False)
    assert ckpt.trainer_record(12)["spiking"] is False


# --- resume_step -----------------------------------------------------------------------------


def test_resume_step_moves_the_newer_checkpoints_aside_once(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.Checkpointer, "busy", lambda self: False)  # every save made
    workdir = str(tmp_path)
    config = {"checkpoint_every_steps": 2, "total_steps": 6}
    train.run(tiny_config(**config), workdir)
    with pytest.raises(UsageError, match=r"no checkpoint at step 3 \(its checkpoints: 2, 4, 6\)"):
        train.run(tiny_config(**config, resume_step=3), workdir)
    last = train.run(tiny_config(**{**config, "total_steps": 8}, resume_step=2), workdir)
    assert last
    rows = read_rows(workdir)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    (branch,) = recovery.branch_records(workdir)
    assert branch["moved_steps"] == [4, 6] and branch["to_step"] == 2
    moved = os.path.join(branch["folder"], "metrics.jsonl")
    with open(moved) as f:
        assert [json.loads(x)["step"] for x in f] == [3, 4, 5, 6]
    assert every_moved_checkpoint_restores(workdir) == 2
    # The same command again (a relaunch after a preemption) goes on from the new branch.
    train.run(tiny_config(**{**config, "total_steps": 10}, resume_step=2), workdir)
    assert len(recovery.branch_records(workdir)) == 1
    assert max(checkpoint.Checkpointer(workdir, create=False).all_steps()) == 10
    assert re.search("rerun with --config.resume_step=4", recovery.resume_command(4))
