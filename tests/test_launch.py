"""The launchers without a cluster: launch/slurm.sbatch under fake srun, scancel and scontrol in a
fake SLURM environment; launch/local_multiprocess.sh under a fake python; launch/tpu_pod.sh
against a fake gcloud whose TPU workers are local folders, in which it runs the workers' commands
(the worker script, a fake python3 and the metadata server's curl) as a TPU VM would. Each
relaunches a run whose process was lost (exit status watchdog.RELAUNCH_STATUS)."""

import contextlib
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from clip_jax.infra import watchdog
from tests.conftest import ROOT

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
    if mode == "wait_fail":  # the save itself fails
        note("save failed")
        sys.exit(2)
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
if mode == "lost":  # a process was lost: the others stopped with the relaunch status
    sys.exit(75)
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


def signalled(slurm, mode: str, sig: int) -> tuple[int, str]:
    """The batch script's exit status and stderr when `sig` reaches it while the run runs."""
    proc = slurm.start("configs/b16.py", slurm.workdir, mode=mode)
    wait_for(lambda: slurm.events("running"))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


def test_slurm_time_limit_after_the_end_does_not_requeue(slurm):
    code, err = signalled(slurm, "wait_done", signal.SIGUSR1)
    assert code == 0, err
    assert slurm.events("saved") and slurm.events("scontrol") == []


def test_slurm_time_limit_with_a_failed_save_does_not_requeue(slurm):
    code, err = signalled(slurm, "wait_fail", signal.SIGUSR1)
    assert code == 2, err
    assert slurm.events("save failed") and slurm.events("scontrol") == []
    assert "failed with status 2; not requeueing" in err


def test_slurm_scancel_saves_and_stops(slurm):
    proc = slurm.start("configs/b16.py", slurm.workdir, mode="wait")
    wait_for(lambda: slurm.events("running"))
    proc.send_signal(signal.SIGTERM)  # scancel, or a preemption that cancels
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert slurm.events("saved") and slurm.events("scontrol") == []
    assert "not requeueing" in err


def test_slurm_lost_process_requeues(slurm):
    code, _, err = slurm.run("configs/b16.py", slurm.workdir, mode="lost")
    assert code == 0, err
    assert slurm.events("scontrol")[0]["argv"] == ["requeue", "4242"]
    assert f"a process was lost (status {watchdog.RELAUNCH_STATUS}); requeueing" in err


def test_slurm_failed_run_is_not_requeued(slurm):
    code, _, err = slurm.run("configs/b16.py", slurm.workdir, mode="fail")
    assert code == 3
    assert slurm.events("scontrol") == []
    assert "failed with status 3" in err


def test_every_launcher_knows_the_relaunch_status():
    status = watchdog.RELAUNCH_STATUS
    for name, line in [
        ("slurm.sbatch", f"RELAUNCH_STATUS={status}\n"),
        ("local_multiprocess.sh", f"RELAUNCH_STATUS={status}\n"),
        ("tpu_pod.py", f"RELAUNCH_STATUS = {status}\n"),
    ]:
        with open(os.path.join(ROOT, "launch", name)) as f:
            assert line in f.read(), name


# --- One machine, several processes ----------------------------------------------------------

LOCAL = os.path.join(ROOT, "launch", "local_multiprocess.sh")
# python: logs its argv, then exits with the status FAKE_PLAN gives this launch and process.
FAKE_LOCAL_PYTHON = r"""#!PYTHON
import json, os, sys
log = os.environ["FAKE_LOG"]
index = int(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--process_id=")))
launch = 0
if os.path.exists(log):
    with open(log) as f:
        launch = sum(1 for line in f if json.loads(line)["index"] == index)
with open(log, "a") as f:
    f.write(json.dumps({"index": index, "argv": sys.argv[1:]}) + "\n")
sys.exit(json.loads(os.environ["FAKE_PLAN"])[launch][index])
"""


def run_local(tmp_path, plan: list[list[int]], **extra: str):
    """local_multiprocess.sh for 2 processes under a fake python; (status, stderr, launches)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    write_executable(bin_dir / "python", FAKE_LOCAL_PYTHON)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_LOG": str(tmp_path / "events.jsonl"),
        "FAKE_PLAN": json.dumps(plan),
        **extra,
    }
    env.pop("PORT", None)
    command = ["bash", LOCAL, "2", "configs/tiny.py", str(tmp_path / "run"), "--config.seed=1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    runs = events(tmp_path / "events.jsonl")
    return done.returncode, done.stderr, [runs[i : i + 2] for i in range(0, len(runs), 2)]


def test_local_relaunches_after_a_lost_process(tmp_path):
    lost = watchdog.RELAUNCH_STATUS
    code, err, launches = run_local(tmp_path, [[lost, 137], [0, 0]])  # process 1 killed
    assert code == 0, err
    assert len(launches) == 2 and "relaunch 1 of 3" in err, err
    for launch in launches:
        assert sorted(e["index"] for e in launch) == [0, 1]
        assert all(e["argv"][-1] == "--config.seed=1" for e in launch)
    code, err, launches = run_local(tmp_path / "again", [[lost, lost]] * 3, RELAUNCHES="1")
    assert code == lost and len(launches) == 2, err


def test_local_does_not_relaunch_a_mistake_or_a_bug(tmp_path):
    lost = watchdog.RELAUNCH_STATUS
    for name, plan, status in [("usage", [[2, 2]], 2), ("bug", [[lost, 1]], 1)]:
        code, err, launches = run_local(tmp_path / name, plan)
        assert code == status and len(launches) == 1, (name, err)


# --- TPU pods -------------------------------------------------------------------------------

# gcloud: a slice of FAKE state.json's "workers" workers, each a folder used as its home; ssh runs
# the command there with bash, scp copies there, storage maps gs:// to a folder. A describe after
# the first start reports PREEMPTED once when "preempt" is set, SIGTERMing the workers' runs.
FAKE_GCLOUD = r"""#!PYTHON
import json, os, shutil, signal, subprocess, sys, time
cloud = os.environ["FAKE_CLOUD"]
argv = sys.argv[1:]
with open(os.path.join(cloud, "gcloud.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\n")
with open(os.path.join(cloud, "state.json")) as f:
    state = json.load(f)
def save():
    with open(os.path.join(cloud, "state.json"), "w") as f:
        json.dump(state, f)
def flag(name):
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), None)
homes = [os.path.join(cloud, "workers", str(i)) for i in range(state["workers"])]
def stop_runs():  # what a VM going down does to its processes
    groups = []
    for home in homes:
        folder = os.path.join(home, "clip_jax", "state")
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if name.endswith(".pid"):
                with open(os.path.join(folder, name)) as f:
                    groups.append(int(f.read()))
    for group in groups:
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{g}") for g in groups):
        time.sleep(0.02)
def fresh_homes():
    for home in homes:
        shutil.rmtree(home, ignore_errors=True)
        os.makedirs(home)
def gcs(url):
    return os.path.join(cloud, "gcs", url[len("gs://"):])
if argv[:3] == ["compute", "tpus", "tpu-vm"]:
    verb = argv[3]
    if verb == "describe":
        if not state["exists"]:
            print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND", file=sys.stderr)
            sys.exit(1)
        if state["preempt"] and state["starts"] and state["node"] == "READY":
            state.update(preempt=False, node="PREEMPTED")
            save()
            stop_runs()
        print(state["node"])
    elif verb == "create":
        fresh_homes()
        state.update(exists=True, node="READY")
        save()
    elif verb == "delete":
        stop_runs()
        fresh_homes()
        state.update(exists=False)
        save()
    elif verb == "scp":
        for home in homes:
            shutil.copy(argv[4], os.path.join(home, argv[5].split(":", 1)[1]))
    elif verb == "ssh":
        assert flag("worker") == "all", argv
        command = flag("command")
        if "tpu_worker.sh start" in command:
            state["starts"] += 1
            save()
        status = 0
        for i, home in enumerate(homes):
            env = {**os.environ, "HOME": home, "FAKE_WORKER": str(i),
                   "FAKE_WORKERS": str(len(homes)),
                   "PATH": os.environ["FAKE_WORKER_BIN"] + os.pathsep + os.environ["PATH"]}
            done = subprocess.run(["bash", "-c", command], cwd=home, env=env, timeout=60)
            status = max(status, done.returncode)
        sys.exit(status)
    else:
        sys.exit(f"fake gcloud: {argv}")
elif argv[:2] in (["storage", "ls"], ["storage", "cat"]):
    if not os.path.exists(gcs(argv[2])):
        print("ERROR: (gcloud.storage.ls) One or more URLs matched no objects.", file=sys.stderr)
        sys.exit(1)
    with open(gcs(argv[2])) as f:
        print(argv[2] if argv[1] == "ls" else f.read())
else:
    sys.exit(f"fake gcloud: {argv}")
"""
# The metadata server, as curl on a worker sees it.
FAKE_CURL = r"""#!PYTHON
import os, sys
key = sys.argv[-1].rsplit("/", 1)[1]
n = int(os.environ["FAKE_WORKERS"])
if key == "worker-network-endpoints":
    print(",".join(f"w{i}:{i}:10.0.0.{10 + i}" for i in range(n)), end="")
elif key == "agent-worker-number":
    print(os.environ["FAKE_WORKER"], end="")
else:
    sys.exit(22)
"""
# python3 on a worker: pip installs are noted; the trainer does what state.json's "train" says
# for this launch and worker: finish (worker 0 writes done.json), exit0, fail, lost (the
# others of a run whose process was lost), killed (SIGKILL), or wait (saves and exits 0 on
# SIGTERM).
FAKE_PYTHON = r"""#!PYTHON
import json, os, signal, sys, time
cloud, worker = os.environ["FAKE_CLOUD"], int(os.environ["FAKE_WORKER"])
log = os.path.join(cloud, "workers.jsonl")
def note(**kw):
    with open(log, "a") as f:
        f.write(json.dumps({"worker": worker, **kw}) + "\n")
args = sys.argv[1:]
if args[:2] == ["-m", "pip"]:
    note(event="pip", argv=args[2:])
    sys.exit(0)
assert args[:2] == ["-m", "clip_jax.main"], args
with open(os.path.join(cloud, "state.json")) as f:
    plan = json.load(f)["train"]
launch = 0
if os.path.exists(log):
    with open(log) as f:
        launch = sum(1 for line in f if '"train"' in line and json.loads(line)["worker"] == worker)
note(event="train", argv=args[2:], launch=launch, cwd=os.getcwd())
behaviour = plan[min(launch, len(plan) - 1)][worker]
workdir = next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))
workdir = os.path.join(cloud, "gcs", workdir[len("gs://"):])
if behaviour == "finish":
    if worker == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "done.json"), "w") as f:
            f.write('{"step": 10}')
    sys.exit(0)
if behaviour in ("exit0", "fail", "lost", "killed"):
    sys.exit({"exit0": 0, "fail": 3, "lost": 75, "killed": 137}[behaviour])
def on_term(*_):
    note(event="saved")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
time.sleep(20)
sys.exit(1)
"""


@pytest.fixture
def pod(tmp_path):
    """A git checkout holding the launcher, a fake gcloud on PATH and a fake cloud behind it."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    (repo / "configs").mkdir()
    for name in ("tpu_pod.sh", "tpu_pod.py", "tpu_worker.sh"):
        shutil.copy2(os.path.join(ROOT, "launch", name), repo / "launch" / name)
    (repo / "configs" / "tiny.py").write_text("# the config\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "code"], check=True)
    tree = subprocess.run(
        [*git, "rev-parse", "HEAD^{tree}"], check=True, capture_output=True, text=True
    ).stdout.strip()
    cloud, bin_dir, worker_bin = tmp_path / "cloud", tmp_path / "bin", tmp_path / "worker_bin"
    for folder in (cloud, bin_dir, worker_bin, tmp_path / "tmp"):
        folder.mkdir()
    write_executable(bin_dir / "gcloud", FAKE_GCLOUD)
    write_executable(worker_bin / "curl", FAKE_CURL)
    write_executable(worker_bin / "python3", FAKE_PYTHON)

    class Pod:
        version = tree[:12]
        code = f"clip_jax/code/{tree[:12]}"

        def __init__(self):
            self.state(exists=True, node="READY", preempt=False, train=[["finish", "finish"]])
            for worker in range(2):  # the slice exists: so do its workers
                (cloud / "workers" / str(worker)).mkdir(parents=True)

        def state(self, **changes) -> None:
            path = cloud / "state.json"
            state = json.loads(path.read_text()) if path.exists() else {"workers": 2, "starts": 0}
            path.write_text(json.dumps({**state, **changes}))

        def run(self, *args: str, timeout: float = 60):
            env = {
                **os.environ,
                "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                "FAKE_CLOUD": str(cloud),
                "FAKE_WORKER_BIN": str(worker_bin),
                "TMPDIR": str(tmp_path / "tmp"),
            }
            command = ["bash", str(repo / "launch" / "tpu_pod.sh"), *args]
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
            return done.returncode, done.stdout, done.stderr

        def gcloud(self) -> list[list[str]]:
            return [json.loads(line) for line in open(cloud / "gcloud.jsonl")]

        def verbs(self) -> list[str]:
            return [a[3] if a[:2] == ["compute", "tpus"] else a[1] for a in self.gcloud()]

        def workers(self, event: str) -> list[dict]:
            return [e for e in events(cloud / "workers.jsonl") if e["event"] == event]

        def worker_file(self, worker: int, path: str) -> str:
            return (cloud / "workers" / str(worker) / path).read_text()

    yield Pod()
    # Nothing started here outlives the test (a pid still naming its worker script is ours).
    for pidfile in cloud.glob("workers/*/clip_jax/state/*.pid"):
        pid = pidfile.read_text().strip()
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if str(cloud).encode() in f.read():
                os.killpg(int(pid), signal.SIGKILL)


LAUNCH = [
    "--spot",
    "--poll-seconds=0.05",
    "--max-failures=3",
    "my-tpu",
    "configs/tiny.py",
    "gs://bucket/run",
]


def remote_argv(command: list[str]) -> list[str]:
    """The argv a worker's shell makes of an ssh command's --command."""
    (script,) = [a.split("=", 1)[1] for a in command if a.startswith("--command=")]
    return shlex.split(script)


def trainer_argv(worker: int, flags: list[str]) -> list[str]:
    distributed = ["--coordinator_address=10.0.0.10:8476", "--num_processes=2"]
    workdir = ["--config=configs/tiny.py", "--workdir=gs://bucket/run"]
    return [*workdir, *distributed, f"--process_id={worker}", *flags]


@pytest.mark.parametrize("flags", [[], USER_FLAGS], ids=["no_flags", "user_flags"])
def test_tpu_dry_run_prints_every_command(pod, flags):
    code, out, err = pod.run("--dry-run", *LAUNCH, *flags)
    assert code == 0, err
    commands = [shlex.split(line) for line in out.splitlines()]
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["my-tpu", "--zone=us-central2-b"]
    assert commands[0][:4] == ["git", "-C", commands[0][2], "archive"]
    assert commands[1] == [*tpu, "describe", *where, "--format=value(state)"]
    create = [*tpu, "create", *where, "--accelerator-type=v4-32"]
    assert commands[2] == [*create, "--version=tpu-ubuntu2204-base", "--spot"]
    ssh = [*tpu, "ssh", *where, "--worker=all"]
    assert commands[3] == [*ssh, f"--command=test -f {pod.code}/.installed"]
    tarball = f"clip_jax-{pod.version}.tar.gz"
    assert commands[4][:6] == [*tpu, "scp", commands[0][-2].split("=", 1)[1]]
    assert commands[4][6:] == [f"my-tpu:{tarball}", "--zone=us-central2-b", "--worker=all"]
    assert "pip install --quiet -e" in commands[5][-1] and "'jax[tpu]'" in commands[5][-1]
    start = ["bash", f"{pod.code}/launch/tpu_worker.sh", "start", "run", "python3"]
    assert remote_argv(commands[6]) == [*start, "configs/tiny.py", "gs://bucket/run", *flags]
    assert commands[7] == ["gcloud", "storage", "ls", "gs://bucket/run/done.json"]
    verbs = [c[4] if c[1] == "compute" else c[2] for c in commands[8:]]
    assert verbs == ["describe", "ssh", "delete", "create", "ssh", "cat"]
    assert commands[10] == [*tpu, "delete", *where, "--quiet"]
    # No empty argument anywhere, neither in the commands nor in what the workers' shells run.
    for command in commands:
        assert "" not in command
        if any(a.startswith("--command=") for a in command):
            assert "" not in remote_argv(command)
    with pytest.raises(FileNotFoundError):
        pod.gcloud()  # nothing ran


def test_tpu_dry_run_with_a_queued_resource(pod):
    code, out, err = pod.run("--dry-run", "--queued", *LAUNCH)
    assert code == 0, err
    commands = [shlex.split(line) for line in out.splitlines()]
    queued = ["gcloud", "compute", "tpus", "queued-resources"]
    where = ["my-tpu", "--zone=us-central2-b"]
    assert commands[1] == [*queued, "describe", *where, "--format=value(state.state)"]
    node = ["--node-id=my-tpu", "--runtime-version=tpu-ubuntu2204-base"]
    assert commands[2] == [*queued, "create", *where, *node, "--accelerator-type=v4-32", "--spot"]
    assert [*queued, "delete", *where, "--force", "--quiet"] in commands


def test_tpu_relaunches_after_preemption_until_done(pod):
    pod.state(preempt=True, train=[["wait", "wait"], ["finish", "finish"]])
    code, _, err = pod.run(*LAUNCH, *USER_FLAGS)
    assert code == 0, err
    verbs = pod.verbs()
    # Reused the slice; after the preemption deleted and recreated it, then copied again.
    assert verbs.count("delete") == 1 and verbs.count("create") == 1
    assert verbs.index("delete") < verbs.index("create")
    assert verbs.count("scp") == 2 and verbs[-1] == "cat"
    assert len(pod.workers("pip")) == 4  # each worker, once per slice
    assert len(pod.workers("saved")) == 2  # both saved when preempted
    trains = pod.workers("train")
    assert sorted((e["worker"], e["launch"]) for e in trains) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for e in trains:
        assert e["argv"] == trainer_argv(e["worker"], USER_FLAGS)
        assert e["cwd"].endswith(pod.code)
    assert "relaunch 1" in err and "~/clip_jax/logs/run.log" in err
    assert "worker 1 of 2" in pod.worker_file(1, "clip_jax/logs/run.log")


def test_tpu_resume_on_the_same_slice_does_not_reinstall(pod):
    pod.state(exists=False, train=[["exit0", "exit0"], ["finish", "finish"]])
    code, _, err = pod.run(*LAUNCH)
    assert code == 0, err
    verbs = pod.verbs()
    assert verbs.count("create") == 1 and verbs.count("delete") == 0
    assert verbs.count("scp") == 1 and len(pod.workers("pip")) == 2
    assert len(pod.workers("train")) == 4
    for e in pod.workers("train"):
        assert e["argv"] == trainer_argv(e["worker"], [])  # no empty argument
    log = pod.worker_file(0, "clip_jax/logs/run.log")
    assert log.count("worker 0 of 2") == 2 and log.count("exit status 0") == 2


def test_tpu_relaunches_a_run_whose_process_was_lost(pod):
    pod.state(train=[["lost", "killed"], ["finish", "finish"]])  # worker 1 killed, 0 stopped
    code, _, err = pod.run(*LAUNCH)
    assert code == 0, err
    assert f"a process was lost (exit status {watchdog.RELAUNCH_STATUS}): relaunch 1" in err
    assert len(pod.workers("train")) == 4
    assert pod.verbs().count("create") == 0 and pod.verbs().count("scp") == 1  # the same slice


def test_tpu_failed_run_stops_the_others_and_is_not_relaunched(pod):
    pod.state(train=[["wait", "fail"]])
    code, _, err = pod.run(*LAUNCH)
    assert code == 1
    assert "failed with status 3" in err and "~/clip_jax/logs/run.log" in err
    assert len(pod.workers("train")) == 2
    wait_for(lambda: pod.workers("saved"))  # worker 0 was stopped with SIGTERM: it saved


def test_tpu_usage_errors(pod):
    for args, message in [
        (["my-tpu", "us-central2-b", "configs/tiny.py", "gs://b/r"], "the zone is a flag"),
        (["my-tpu", "configs/tiny.py", "gs://b/r", "--spot"], "is a launcher option"),
        (["my-tpu", "configs/tiny.py", "runs/r"], "absolute shared path"),
        (["my-tpu", "configs/tiny.py", "gs://b/r", ""], "empty argument"),
    ]:
        code, _, err = pod.run(*args)
        assert code == 2 and message in err, err
