"""The launchers without a cluster: launch/slurm.sbatch under fake srun, scancel and scontrol in a
fake SLURM environment; launch/tpu_pod.sh against a fake gcloud whose TPU workers are local
folders, in which it runs the workers' commands (the worker script, a fake python3 and the
metadata server's curl) as a TPU VM would."""

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(ROOT, "launch", "slurm.sbatch")
# Flags a user passes on: a glob with a space, quotes of both kinds.
USER_FLAGS = [
    "--config.train_data.source=tfrecord:/data/my set/*.tfrecord",
    '--config.note=it\'s "quoted"',
]


def write_executable(path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text.replace("PYTHON", sys.executable, 1))
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def events(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def wait_for(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- SLURM ----------------------------------------------------------------------------------

# srun: logs its argv, then behaves as FAKE_SRUN says; its SIGTERM is the tasks' (scancel's).
FAKE_SRUN = r"""#!PYTHON
import json, os, signal, sys, time
log, mode = os.environ["FAKE_LOG"], os.environ["FAKE_SRUN"]
def note(event, **kw):
    with open(log, "a") as f:
        f.write(json.dumps({"event": event, **kw}) + "\n")
workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
def finish():
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "done.json"), "w") as f:
        f.write('{"step": 10}')
def on_term(*_):
    note("saved")
    if mode == "wait_done":
        finish()
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
with open(os.environ["FAKE_PID"], "w") as f:
    f.write(str(os.getpid()))
note("srun", argv=sys.argv[1:], setup=os.environ.get("SETUP_RAN"))
if mode == "finish":
    finish()
    sys.exit(0)
if mode == "fail":
    sys.exit(3)
note("running")
time.sleep(20)
sys.exit(1)
"""
# scancel --signal=TERM JOB: what slurmd does for the job's steps, to the fake srun.
FAKE_SCANCEL = r"""#!PYTHON
import json, os, signal, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"event": "scancel", "argv": sys.argv[1:]}) + "\n")
with open(os.environ["FAKE_PID"]) as f:
    os.kill(int(f.read()), signal.SIGTERM)
"""
FAKE_SCONTROL = r"""#!PYTHON
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"event": "scontrol", "argv": sys.argv[1:]}) + "\n")
"""
SLURM_JOB = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_GPUS_ON_NODE": "4",
    "SLURM_JOB_CPUS_PER_NODE": "48(x2)",
}


@pytest.fixture
def slurm(tmp_path):
    """A fake SLURM: bin/ with srun, scancel and scontrol, their event log, a workdir."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)]:
        write_executable(bin_dir / name, text)

    class Slurm:
        log = tmp_path / "events.jsonl"
        workdir = str(tmp_path / "run")

        def env(self, mode: str = "finish", **extra: str) -> dict:
            env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
            env.pop("DRY_RUN", None)
            env.pop("CLIP_JAX_SETUP", None)
            return {
                **env,
                "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                "FAKE_LOG": str(self.log),
                "FAKE_PID": str(tmp_path / "srun.pid"),
                "FAKE_SRUN": mode,
                **SLURM_JOB,
                **extra,
            }

        def start(self, *args: str, mode: str = "finish", **extra: str) -> subprocess.Popen:
            return subprocess.Popen(
                ["bash", SBATCH, *args],
                env=self.env(mode, **extra),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

        def run(self, *args: str, mode: str = "finish", **extra: str):
            proc = self.start(*args, mode=mode, **extra)
            out, err = proc.communicate(timeout=60)
            return proc.returncode, out, err

        def events(self, name: str | None = None) -> list[dict]:
            return [e for e in events(self.log) if name is None or e["event"] == name]

    return Slurm()


def srun_line(nodes, tasks, per_node, cpus, gpus, workdir, flags):
    gpu_flags = [f"--gpus-per-node={gpus}", "--gpu-bind=none"] if gpus else []
    return [
        "srun", f"--nodes={nodes}", f"--ntasks={tasks}", f"--ntasks-per-node={per_node}",
        f"--cpus-per-task={cpus}", *gpu_flags, "--kill-on-bad-exit=1", "python", "-m",
        "clip_jax.main", "--config=configs/b16.py", f"--workdir={workdir}", *flags,
    ]  # fmt: skip


@pytest.mark.parametrize("how", ["flag", "env"])
@pytest.mark.parametrize("flags", [[], USER_FLAGS], ids=["no_flags", "user_flags"])
def test_slurm_dry_run(slurm, how, flags):
    args = ["--dry-run"] * (how == "flag") + ["configs/b16.py", slurm.workdir, *flags]
    code, out, err = slurm.run(*args, **({"DRY_RUN": "1"} if how == "env" else {}))
    assert code == 0, err
    lines = [shlex.split(line) for line in out.splitlines()]
    assert lines == [
        srun_line(2, 8, 4, 12, 4, slurm.workdir, flags),
        ["scancel", "--signal=TERM", "4242"],
        ["scontrol", "requeue", "4242"],
    ]
    assert all("" not in line for line in lines)
    assert slurm.events() == []  # nothing ran


@pytest.mark.parametrize(
    "allocation, tasks_per_node, cpus, gpus",
    [
        ({"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "a100:8"}, 8, 4, 8),
        ({"SLURM_GPUS_ON_NODE": "", "SLURM_JOB_GPUS": "0,1"}, 2, 16, 2),
        ({"SLURM_GPUS_ON_NODE": "", "SLURM_NTASKS_PER_NODE": "3"}, 3, 10, 0),
    ],
    ids=["gpus_per_node_typed", "job_gpus_list", "cpu_only"],
)
def test_slurm_counts_from_the_allocation(slurm, allocation, tasks_per_node, cpus, gpus):
    extra = {"SLURM_JOB_CPUS_PER_NODE": "64(x1),32", **allocation}
    if not gpus:
        extra["SLURM_JOB_CPUS_PER_NODE"] = "30(x2)"
    code, out, err = slurm.run("--dry-run", "configs/b16.py", slurm.workdir, **extra)
    assert code == 0, err
    expected = srun_line(2, 2 * tasks_per_node, tasks_per_node, cpus, gpus, slurm.workdir, [])
    assert shlex.split(out.splitlines()[0]) == expected


def test_slurm_refuses_what_cannot_run(slurm):
    code, _, err = slurm.run("configs/b16.py", slurm.workdir, SLURM_JOB_CPUS_PER_NODE="2")
    assert code == 2 and "--ntasks-per-node=4" in err
    code, _, err = slurm.run("configs/b16.py", slurm.workdir, "", "--config.seed=1")
    assert code == 2 and "empty argument" in err
    code, _, err = slurm.run("configs/b16.py", slurm.workdir, SLURM_JOB_ID="")
    assert code == 2 and "not inside a SLURM job" in err
    assert slurm.events() == []


def test_slurm_finished_run_is_not_requeued(slurm, tmp_path):
    setup = tmp_path / "setup.sh"
    setup.write_text('export SETUP_RAN="venv activated"\nfalse_but_harmless=$UNSET_VARIABLE\n')
    code, _, err = slurm.run(
        "configs/b16.py", slurm.workdir, *USER_FLAGS, CLIP_JAX_SETUP=str(setup)
    )
    assert code == 0, err
    (step,) = slurm.events("srun")
    assert step["argv"] == srun_line(2, 8, 4, 12, 4, slurm.workdir, USER_FLAGS)[1:]
    assert step["setup"] == "venv activated"
    assert slurm.events("scontrol") == [] and slurm.events("scancel") == []
    assert "the run is done" in err


def test_slurm_time_limit_saves_then_requeues(slurm):
    proc = slurm.start("configs/b16.py", slurm.workdir, mode="wait")
    wait_for(lambda: slurm.events("running"))
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert [e["event"] for e in slurm.events()] == [
        "srun",
        "running",
        "scancel",
        "saved",
        "scontrol",
    ]
    assert slurm.events("scancel")[0]["argv"] == ["--signal=TERM", "4242"]
    assert slurm.events("scontrol")[0]["argv"] == ["requeue", "4242"]


def test_slurm_time_limit_after_the_end_does_not_requeue(slurm):
    proc = slurm.start("configs/b16.py", slurm.workdir, mode="wait_done")
    wait_for(lambda: slurm.events("running"))
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert slurm.events("saved") and slurm.events("scontrol") == []


def test_slurm_scancel_saves_and_stops(slurm):
    proc = slurm.start("configs/b16.py", slurm.workdir, mode="wait")
    wait_for(lambda: slurm.events("running"))
    proc.send_signal(signal.SIGTERM)  # scancel, or a preemption that cancels
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert slurm.events("saved") and slurm.events("scontrol") == []
    assert "not requeueing" in err


def test_slurm_failed_run_is_not_requeued(slurm):
    code, _, err = slurm.run("configs/b16.py", slurm.workdir, mode="fail")
    assert code == 3
    assert slurm.events("scontrol") == []
    assert "failed with status 3" in err
