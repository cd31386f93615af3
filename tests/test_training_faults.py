"""Faults and bad input in training, each reproduced first: a halting step never poisons the
checkpoint; a dead run under nonfinite=skip stops; metrics.jsonl shows each step once after a
resume; config.json is replaced only by an accepted config; a finished run says so; a damaged
latest checkpoint falls back to the one before; a periodic save never waits for the previous
write; one run per workdir; a failed write (full disk: checkpoint, metrics.jsonl; TensorBoard warns)
and an unwritable workdir are one line."""

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from absl import logging

from clip_jax.infra import runlock
from clip_jax.infra.errors import UsageError
from clip_jax.training import checkpoint, guard, metrics, runs
from clip_jax.training import trainer as train
from clip_jax.weights import files as weight_files
from tests.conftest import ROOT, read_rows, run_python, tiny_config


def test_halting_step_is_not_saved_and_a_resume_with_a_lower_rate_goes_on(tmp_path):
    workdir = str(tmp_path)
    base = {"checkpoint_every_steps": 2, "optim.warmup_steps": 0}
    train.run(tiny_config(total_steps=4, **base), workdir)
    blown = tiny_config(total_steps=8, **{**base, "optim.learning_rate": 1e30})
    with pytest.raises(guard.NonFiniteLossError, match=r"non-finite at step [56] "):
        train.run(blown, workdir)
    assert checkpoint.Checkpointer(workdir, create=False).all_steps() == [2, 4]
    # What the message advises: a lower learning rate, and the run goes on from step 4.
    last = train.run(tiny_config(total_steps=8, **base), workdir)
    assert last["nonfinite_steps"] == 0
    assert sorted(r["step"] for r in read_rows(workdir) if "loss" in r) == list(range(1, 9))


def test_dead_run_under_skip_halts_and_each_skip_is_logged(tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
    config = tiny_config(total_steps=10, **{"optim.learning_rate": 1e30, "optim.warmup_steps": 0})
    config.nonfinite = "skip"
    with pytest.raises(guard.NonFiniteLossError, match="not learning"):
        train.run(config, str(tmp_path))
    skips = [w for w in warnings if "update skipped" in w]
    assert len(skips) == config.nonfinite_max_consecutive


def test_guard_fraction_rule():
    config = tiny_config()
    config.nonfinite = "skip"
    config.nonfinite_max_consecutive = 3
    config.nonfinite_max_fraction = 0.25
    checker = guard.NonFiniteGuard(config, start_step=0, start_count=0)
    count = 0
    for step in range(1, 13):  # steps 4, 8, 12 skipped: never 3 in a row, never > 25%
        count += step % 4 == 0
        checker.check(step, count)
    checker = guard.NonFiniteGuard(config, start_step=0, start_count=0)
    count = 0
    with pytest.raises(guard.NonFiniteLossError, match="3 of the 8 steps"):
        for step in range(1, 13):
            count += step % 3 == 2  # steps 2, 5, 8, 11
            checker.check(step, count)


def test_metrics_show_each_step_once_after_a_resume(tmp_path):
    workdir = str(tmp_path)
    config = tiny_config(total_steps=6, checkpoint_every_steps=4)
    train.run(config, workdir)
    # An attempt that logged steps 5 and 6 but was killed before it saved them: forget 6.
    ckpt = checkpoint.Checkpointer(workdir)
    ckpt._manager.delete(6)
    ckpt.close()
    train.run(config, workdir)
    steps = [r["step"] for r in read_rows(workdir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_config_json_is_replaced_only_once_accepted_and_each_checkpoint_keeps_its_own(tmp_path):
    workdir = str(tmp_path)
    train.run(tiny_config(total_steps=2, checkpoint_every_steps=2), workdir)
    before = (tmp_path / "config.json").read_text()
    # Another model on this workdir, asked for: it fails to restore the other run's weights.
    other = tiny_config(total_steps=4, **{"model.embed_dim": 24})
    with pytest.raises(ValueError):  # orbax: the shapes differ
        train.run(other, workdir, config_change_ok=True)
    assert (tmp_path / "config.json").read_text() == before
    saved = runs.read_run_config(workdir, 2)
    assert saved.model.to_dict() == json.loads(before)["model"]
    model, variables, step = runs.load_run(workdir)
    assert step == 2 and model.embed_dim == saved.model.embed_dim


def test_done_marker(tmp_path):
    workdir = str(tmp_path)
    train.run(tiny_config(total_steps=2), workdir)
    assert json.loads((tmp_path / train.DONE_FILE).read_text())["step"] == 2
    train.run(tiny_config(total_steps=4), workdir)  # more steps: not done until they ran
    assert json.loads((tmp_path / train.DONE_FILE).read_text())["step"] == 4


def _truncate_largest_data_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    largest = max(files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


def _delete_manifest(step_dir):
    for manifest in (step_dir / "state").rglob("manifest.ocdbt"):
        manifest.unlink()


def _garbage_metadata(step_dir):
    (step_dir / "_CHECKPOINT_METADATA").write_bytes(b"\xff\xfe\x00garbage\x80")
    (step_dir / "data" / "metadata").write_bytes(b"\xff\xfe\x00garbage\x80")


@pytest.mark.parametrize(
    "damage", [_truncate_largest_data_file, _delete_manifest, _garbage_metadata]
)
def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(tmp_path, damage, caplog):
    workdir = str(tmp_path)
    config = tiny_config(total_steps=4, checkpoint_every_steps=2)
    train.run(config, workdir)
    damage(tmp_path / "checkpoints" / "4")
    config.total_steps = 6
    last = train.run(config, workdir)
    assert sorted(r["step"] for r in read_rows(workdir) if "loss" in r) == list(range(1, 7))
    assert (tmp_path / "checkpoints_unreadable" / "4").is_dir()
    assert checkpoint.Checkpointer(workdir, create=False).all_steps()[-1] == 6
    assert last["loss"] > 0
    said = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
    assert len(said) == 1 and "step 4" in said[0] and "\n" not in said[0], said


def test_a_periodic_save_waits_for_the_previous_write_instead_of_the_loop(tmp_path, monkeypatch):
    answers = iter([False, True, False])  # steps 2, 4, 5: the save of step 2 still writing at 4
    monkeypatch.setattr(checkpoint.Checkpointer, "busy", lambda self: next(answers))
    workdir = str(tmp_path)
    last = train.run(tiny_config(total_steps=6, checkpoint_every_steps=2), workdir)
    assert checkpoint.Checkpointer(workdir, create=False).all_steps() == [2, 5, 6]
    assert last["checkpoint/blocking_seconds"] >= 0


def test_a_workdir_in_use_is_refused_with_one_line_naming_its_owner(tmp_path):
    workdir = str(tmp_path)
    holder = subprocess.Popen(  # another run, in another process, holding the workdir
        [sys.executable, "-c", HOLD_LOCK, workdir],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runlock.WorkdirLockedError, match=rf"pid {holder.pid} "):
            train.run(tiny_config(total_steps=2), workdir)
        result = run_python(
            ["-m", "clip_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}"]
            + ["--config.total_steps=2"]
        )
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "is in use by another run" in errors[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    finally:
        holder.kill()
        holder.wait()
    train.run(tiny_config(total_steps=2), workdir)  # the holder died: the lock went with it


HOLD_LOCK = """
import sys, time
from clip_jax.infra import runlock
lock = runlock.RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_object_store_lease(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock.paths, "is_remote", lambda p: True)  # the lease code path

    # An object store's upload is atomic; on this local stand-in, a rename makes it so, else a
    # read here (or a second RunLock's) can meet the renewer's half-written, empty file.
    def atomic_write_text(p, text):
        tmp = pathlib.Path(f"{p}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(text)
        tmp.replace(p)

    monkeypatch.setattr(runlock.paths, "write_text", atomic_write_text)
    lock_file = tmp_path / runlock.LOCK_FILE
    other = {"host": "worker-7", "pid": 4242, "started": time.time() - 60}
    lock_file.write_text(json.dumps({**other, "expires": time.time() + 300}))
    with pytest.raises(runlock.WorkdirLockedError, match="host worker-7 pid 4242"):
        runlock.RunLock(str(tmp_path)).acquire()
    lock_file.write_text(json.dumps({**other, "expires": time.time() - 1}))  # its run died
    lock = runlock.RunLock(str(tmp_path), lease_seconds=0.3).acquire()
    try:  # a failure here must not leave the renewer writing on through the tests after it
        first = json.loads(lock_file.read_text())
        assert first["pid"] == os.getpid()
        time.sleep(0.5)  # renewed meanwhile
        assert json.loads(lock_file.read_text())["expires"] > first["expires"]
        with pytest.raises(runlock.WorkdirLockedError):
            runlock.RunLock(str(tmp_path)).acquire()
    finally:
        lock.release()
    assert not lock_file.exists()


@pytest.mark.parametrize("metrics_fail_too", [False, True], ids=["", "metrics-fail-too"])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_one(
    tmp_path, monkeypatch, metrics_fail_too
):
    import orbax.checkpoint as ocp

    save, wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished
    saving = []

    def fake_save(self, step, *args, **kwargs):
        started = save(self, step, *args, **kwargs)
        saving.append(step)  # the write of this step is now in flight
        return started

    def full_disk(self):
        wait(self)
        if saving and saving[-1] == 4:
            raise ValueError(
                'RESOURCE_EXHAUSTED: Error writing "params.visual.conv1.kernel/0.0" ...: Failed '
                "to write 2375680 bytes to file 11: No space left on device [os_error_code='28']"
            )

    monkeypatch.setattr(ocp.CheckpointManager, "save", fake_save)
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", full_disk)
    if metrics_fail_too:  # the same full disk fails the metrics' last flush, closed first

        def failing_close(self):
            raise metrics.MetricsWriteError("writing metrics.jsonl failed (No space left)")

        monkeypatch.setattr(metrics.MetricsWriter, "close", failing_close)
    workdir = str(tmp_path)
    with pytest.raises(checkpoint.CheckpointWriteError) as failed:
        train.run(tiny_config(total_steps=4, checkpoint_every_steps=2), workdir)
    message = str(failed.value)
    assert "\n" not in message
    assert "checkpoint of step 4" in message and "No space left on device" in message
    assert "the checkpoint at step 2 is kept" in message
    monkeypatch.undo()
    assert checkpoint.Checkpointer(workdir, create=False).all_steps()[0] == 2


def test_tensorboard_refused_by_the_os_is_a_warning_and_metrics_go_on(tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
    writer = metrics.MetricsWriter(str(tmp_path))
    writer.write(1, {"loss": 1.0})
    tb = writer._tb

    def no_space():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tb, "flush", no_space)
    writer.flush()  # a warning, not an error
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert all(w.event_writer._closed for w in tb.all_writers.values())  # nothing at exit
    writer.write(2, {"loss": 0.5})
    writer.close()
    assert [r["step"] for r in read_rows(str(tmp_path))] == [1, 2]


def test_metrics_refused_by_the_os_is_one_line(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path))
    writer._path = writer._path.parent / "gone" / "metrics.jsonl"  # its directory vanished
    with pytest.raises(metrics.MetricsWriteError, match=r"^writing .*metrics.jsonl failed \(No "):
        writer.write(1, {"loss": 1.0})


def test_a_full_disk_for_real(tmp_path):
    """On a 10 MB tmpfs (one tiny checkpoint fits, two do not), where mounting is allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a small tmpfs is not allowed here")
    try:
        result = run_python(
            ["-m", "clip_jax.main", "--config=configs/tiny.py", f"--workdir={mount}/run"]
            + ["--config.total_steps=4", "--config.checkpoint_every_steps=2"]
        )
        assert result.returncode == 2, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: writing the checkpoint of step 4 to "), last
        assert "No space left on device" in last and "step 2 is kept" in last
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        steps = [p.name for p in (mount / "run" / "checkpoints").iterdir() if p.name.isdigit()]
        assert steps == ["2"]
    finally:
        subprocess.run(["umount", str(mount)])


@pytest.mark.parametrize(
    "where,message",
    [
        ("a_file", "is a file, not a directory"),
        ("a_file/run", "cannot write the workdir .*: Not a directory"),
        ("/proc/clip_jax_run", "cannot write the workdir /proc/clip_jax_run: "),
    ],
)
def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path, where, message):
    (tmp_path / "a_file").write_text("not a directory")
    workdir = where if where.startswith("/") else str(tmp_path / where)
    with pytest.raises(UsageError, match=message) as refused:
        train.run(tiny_config(total_steps=2), workdir)
    assert "\n" not in str(refused.value)


def test_a_half_written_metrics_line_does_not_stop_a_resume(tmp_path):
    workdir = str(tmp_path)
    config = tiny_config(total_steps=4, checkpoint_every_steps=2)
    train.run(config, workdir)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 2.3')  # killed in the middle of a line
    config.total_steps = 6
    train.run(config, workdir)
    assert [r["step"] for r in read_rows(workdir) if "loss" in r] == list(range(1, 7))


def test_a_garbage_config_json_is_one_line(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{not json")
    with pytest.raises(UsageError, match="config.json is not a run's config") as refused:
        train.run(tiny_config(total_steps=2), str(tmp_path))
    assert "\n" not in str(refused.value)
    with pytest.raises(UsageError, match="config.json is not a run's config"):
        runs.read_run_config(str(tmp_path))


def test_a_truncated_npz_is_one_line(tmp_path):

    path = tmp_path / "weights.npz"
    np.savez(path, a=np.arange(1000.0))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UsageError, match="not a readable .npz file"):
        weight_files.read_state_dict(str(path))


def test_a_failed_write_names_the_os_reason_even_after_a_long_spec(monkeypatch, tmp_path):
    # TensorStore puts its JSON spec after the reason: a tail of the message would lose it.
    import orbax.checkpoint as ocp

    spec = '{"driver":"zarr3","kvstore":{"path":"' + "x" * 400 + '"}}'

    def full_disk(self):
        raise ValueError(f"to write: No space left on device [os_error_code='28'] {spec}")

    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", full_disk)
    ckpt._writing = 4
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device: "):
        ckpt._check_previous_write()
    monkeypatch.undo()
    ckpt.close()
