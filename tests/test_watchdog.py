"""A multi-process job whose process is lost, or stops on its own, ends on every process within
the heartbeat timeout, with one line naming that process: the watch itself (a fake key-value
store), a real two-process training run with process 1 killed, then process 0 (whose host runs
the coordination service), and a small program whose one process makes a user's mistake or hits
a bug.

Run as a program (`python -m tests.test_watchdog`), this module is one process of such a job:
it joins, then takes part in a collective every 0.1 s; `--fail_on=I --end=usage|bug` makes
process I fail at the third."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from clip_jax.infra import cli, watchdog
from clip_jax.infra.errors import UsageError

TIMEOUT = 10  # --heartbeat_timeout_seconds in these tests
RESUME = "rerun the same command (a training run resumes from its last checkpoint)"


def _program(argv: list[str], join, fail_on: int, end: str) -> None:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    join()
    i = jax.process_index()
    for step in range(1, 1000):
        if i == fail_on and step == 3:
            if end == "usage":
                with cli.user_errors():
                    raise UsageError(f"a user's mistake on process {i}")
            raise RuntimeError(f"a bug on process {i}")
        multihost_utils.process_allgather(np.array([step]))  # waits for every process
        time.sleep(0.1)


# --- The watch, on a fake store -----------------------------------------------------------------


class FakeStore:
    """The coordination service's key-value store as the watchdog uses it."""

    def __init__(self):
        self.entries: dict[str, str] = {}

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        self.entries[key] = value

    def key_value_dir_get(self, prefix: str) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.entries.items() if k.startswith(prefix)]


def test_a_process_whose_beat_stops_is_lost_after_the_timeout():
    store = FakeStore()
    dog = watchdog.Watchdog(store, 0, 3, TIMEOUT, "10.0.0.1:8476")
    for beat in ("1", "2"):
        store.key_value_set(f"{watchdog.KEYS}beat/1", beat)
        store.key_value_set(f"{watchdog.KEYS}beat/2", beat)
        dog._read(dict(store.key_value_dir_get(watchdog.KEYS)))
    assert dog.verdict() is None
    dog.peers[2].changed -= TIMEOUT + 1  # process 2 has not beaten since
    assert dog.verdict() == (
        watchdog.RELAUNCH_STATUS,
        f"process 2 of 3 lost: no heartbeat for 10 s (killed, out of memory, or its host gone); "
        f"{RESUME}",
    )
    dog.peers[1].changed -= TIMEOUT + 1
    assert dog.verdict()[1].startswith("processes [1, 2] of 3 lost: ")


def test_a_stopped_process_stops_the_others_with_its_status_and_an_ended_one_does_not():
    store = FakeStore()
    dog = watchdog.Watchdog(store, 1, 3, TIMEOUT, "10.0.0.1:8476")
    store.key_value_set(f"{watchdog.KEYS}stop/2", json.dumps({"status": 0, "cause": "ended"}))
    dog._read(dict(store.key_value_dir_get(watchdog.KEYS)))
    dog.peers[2].changed -= TIMEOUT + 1  # silent since it ended: not lost
    assert dog.verdict() is None
    cause = "no files match 'x*' (train_data.source); check the path"
    store.key_value_set(f"{watchdog.KEYS}stop/0", json.dumps({"status": 2, "cause": cause}))
    dog._read(dict(store.key_value_dir_get(watchdog.KEYS)))
    assert dog.verdict() == (2, f"process 0 of 3 stopped: {cause}")


def test_a_coordinator_that_does_not_answer_is_lost():
    dog = watchdog.Watchdog(FakeStore(), 1, 2, TIMEOUT, "10.0.0.1:8476")
    dog.answered -= TIMEOUT + 1
    assert dog.verdict() == (
        watchdog.RELAUNCH_STATUS,
        f"process 0 of 2 lost: the coordinator at 10.0.0.1:8476 has not answered for 10 s; "
        f"{RESUME}",
    )


# --- Real processes -------------------------------------------------------------------------


def _start(module: str, args: list[str], port: int, index: int, devices: int):
    from tests.conftest import ROOT, cpu_env  # here: conftest imports open_clip, the program not

    command = [sys.executable, "-m", module, *args, f"--heartbeat_timeout_seconds={TIMEOUT}"]
    command += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    return subprocess.Popen(
        [*command, f"--process_id={index}"],
        cwd=ROOT,
        env={**cpu_env(devices), "CLIP_JAX_DEBUG": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _no_stack_trace(err: str) -> None:
    for mark in ("Traceback", "F0000", "Check failure", "Fatal Python error", "*** "):
        assert mark not in err, err[-3000:]


def test_a_killed_process_stops_the_other_within_the_timeout(tmp_path):
    """SIGKILL process 1 of a real two-process training run: process 0 ends with one line naming
    it and the relaunch status within the timeout (JAX alone: aborted with a stack trace after
    about 75 s)."""
    from tests.conftest import free_port, read_losses

    args = ["--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.log_every_steps=1"]
    args += ["--config.total_steps=100000", "--config.mesh.data=8"]
    port = free_port()
    procs = [_start("clip_jax.main", args, port, i, devices=4) for i in range(2)]
    deadline = time.monotonic() + 240
    while not (tmp_path / "metrics.jsonl").exists() or max(read_losses(tmp_path), default=0) < 3:
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
        assert time.monotonic() < deadline, "step 3 never logged"
        time.sleep(0.05)
    err, seconds = _kill_and_wait(procs, victim=1)
    assert procs[0].returncode == watchdog.RELAUNCH_STATUS, err[-3000:]
    assert TIMEOUT - 3 < seconds < TIMEOUT + 20, seconds  # its last beat came before the kill
    assert [line for line in err.splitlines() if "error:" in line] == [
        f"error: process 1 of 2 lost: no heartbeat for 10 s (killed, out of memory, or its host "
        f"gone); {RESUME}"
    ], err[-3000:]
    _no_stack_trace(err)


def _kill_and_wait(procs, victim: int) -> tuple[str, float]:
    """SIGKILLs process `victim` of two; returns the survivor's stderr and the seconds from the
    kill to its exit."""
    procs[victim].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = procs[1 - victim].communicate(timeout=120)
    seconds = time.monotonic() - killed
    procs[victim].communicate()
    return err, seconds


def _coordination_processes(port: int) -> list[int]:
    """The running (not zombie) coordination service processes for `port`, from /proc."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:  # ended since listed
            continue
        if "clip_jax.infra.coordination" in command and f":{port}" in command and state != "Z":
            found.append(int(pid))
    return found


def _port_free(port: int) -> bool:
    """Whether nothing listens on `port` of any interface (`::`, as the service binds)."""
    try:
        s, address = socket.socket(socket.AF_INET6), ("::", port)
    except OSError:  # a host without IPv6
        s, address = socket.socket(), ("0.0.0.0", port)
    with s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError:
            return False
    return True


def _gone(port: int, seconds: float) -> bool:
    """Whether the coordination service's process for `port` ends within `seconds` (it exits
    once process 0 is gone and no process is connected to it) and leaves its port free."""
    deadline = time.monotonic() + seconds
    while _coordination_processes(port) or not _port_free(port):  # its /proc entry goes first
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_killed_process_0_stops_the_other_within_the_timeout_and_the_run_resumes(tmp_path):
    """SIGKILL process 0, beside which the coordination service runs in a process of its own:
    process 1 ends as when any process is lost (JAX alone: aborted with its fatal error and a
    stack trace 0.2 s after the kill, exit status 134); the service's process is gone right
    after, its port free, and the same command resumes the run and finishes it."""
    from tests.conftest import free_port, read_losses

    args = ["--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.log_every_steps=1"]
    args += ["--config.total_steps=6", "--config.checkpoint_every_steps=2"]
    args += ["--config.mesh.data=8"]
    port = free_port()
    procs = [_start("clip_jax.main", args, port, i, devices=4) for i in range(2)]

    def resumable() -> bool:  # step 3 logged, step 2's checkpoint complete (orbax renames it)
        with contextlib.suppress(OSError, json.JSONDecodeError):  # not yet there, half written
            steps = max(read_losses(tmp_path), default=0)
            return steps >= 3 and "2" in os.listdir(tmp_path / "checkpoints")
        return False

    deadline = time.monotonic() + 240
    while not resumable():
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
        assert time.monotonic() < deadline, "step 3 never logged"
        time.sleep(0.05)
    assert len(_coordination_processes(port)) == 1
    err, seconds = _kill_and_wait(procs, victim=0)
    assert procs[1].returncode == watchdog.RELAUNCH_STATUS, err[-3000:]
    assert TIMEOUT - 3 < seconds < TIMEOUT + 20, seconds  # its last beat came before the kill
    assert [line for line in err.splitlines() if "error:" in line] == [
        f"[process 1] error: process 0 of 2 lost: no heartbeat for 10 s (killed, out of memory, "
        f"or its host gone); {RESUME}"
    ], err[-3000:]
    _no_stack_trace(err)
    assert _gone(port, 2)

    procs = [_start("clip_jax.main", args, port, i, devices=4) for i in range(2)]
    outs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "resuming from the checkpoint at step" in outs[0], outs[0][-3000:]
    assert max(read_losses(tmp_path)) == 6
    assert _gone(port, 2)


def _run_program(fail_on: int, end: str) -> list[tuple[int, str, float]]:
    from tests.conftest import free_port

    port = free_port()
    args = [f"--fail_on={fail_on}", f"--end={end}"]
    t0 = time.monotonic()
    procs = [_start("tests.test_watchdog", args, port, i, devices=1) for i in range(2)]
    results = []
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        results.append((proc.returncode, err, time.monotonic() - t0))
    return results


@pytest.mark.parametrize("fail_on", [0, 1])
def test_a_users_mistake_on_one_process_stops_the_other_with_status_2(fail_on):
    results = _run_program(fail_on, "usage")
    mistake = f"a user's mistake on process {fail_on}"
    for i, (code, err, seconds) in enumerate(results):
        assert code == 2, (i, err[-3000:])
        prefix = "[process 1] " if i == 1 else ""
        line = mistake if i == fail_on else f"process {fail_on} of 2 stopped: {mistake}"
        assert [x for x in err.splitlines() if "error:" in x] == [f"{prefix}error: {line}"], err
        _no_stack_trace(err)
        assert seconds < 60, seconds  # JAX alone: the other process waits for good


def test_a_bug_on_one_process_keeps_its_traceback_and_stops_the_other():
    (code0, err0, _), (code1, err1, seconds) = _run_program(1, "bug")
    assert code1 == 1 and "[process 1] Traceback" in err1, err1[-3000:]
    assert err1.splitlines()[-1] == "[process 1] RuntimeError: a bug on process 1", err1[-3000:]
    assert code0 == 1, err0[-3000:]
    assert err0.splitlines()[-1] == (
        "error: process 1 of 2 stopped: RuntimeError: a bug on process 1 (a bug: see process 1's "
        "traceback)"
    ), err0[-3000:]
    _no_stack_trace(err0)
    assert seconds < 60, seconds


if __name__ == "__main__":
    from absl import flags

    _FAIL_ON = flags.DEFINE_integer("fail_on", 1, "The process that fails.")
    _END = flags.DEFINE_enum("end", "usage", ["usage", "bug"], "How it fails.")
    _JOIN = cli.define_distributed_flags()
    cli.run(lambda argv: _program(argv, _JOIN, _FAIL_ON.value, _END.value))
