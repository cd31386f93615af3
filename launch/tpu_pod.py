"""Runs clip_jax on a Cloud TPU VM slice until the run is done (entry: launch/tpu_pod.sh).

Creates the slice (or reuses it), copies the code to every worker and installs it once per code
version, starts the run on all workers detached, then watches the slice and WORKDIR/done.json:
after a preemption it deletes and recreates the slice (or its queued resource) and starts again,
the run resuming from its latest checkpoint; a run that stopped with exit status 0 but without
done.json (it saved on SIGTERM) is started again, and so is one whose process was lost (the others
stopped with RELAUNCH_STATUS; the lost one may have been killed); a run that fails otherwise ends
the watch with status 1.
`--dry-run` prints the commands one per line on stdout (what each group is for on stderr) and
runs none. Standard library only.
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

# The runtime (OS image) per TPU generation, after Cloud TPU's "TPU software versions" page.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# Node states (and queued-resource states) by what the watch does about them; others wait.
READY_STATES = {"READY", "ACTIVE"}
RECREATE_STATES = {"PREEMPTED", "TERMINATED", "SUSPENDED", "FAILED"}
# Everything on a worker lives under the ssh user's ~/clip_jax: code/VERSION, logs/, state/.
REMOTE = "clip_jax"
TPUS = ["gcloud", "compute", "tpus"]
# clip_jax.infra.watchdog.RELAUNCH_STATUS: a process of the run was lost and the others stopped.
RELAUNCH_STATUS = 75
STATUS = re.compile(r"clip_jax-status: (running|lost|absent|exited) ?(-?\d+)?")
ZONE = re.compile(r"^[a-z]+-[a-z]+\d+-[a-z]$")


class UsageError(Exception):
    """A mistake the user can fix: one line, exit status 2."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch/tpu_pod.sh",
        allow_abbrev=False,
        description="Train clip_jax on a Cloud TPU VM slice, relaunched after preemption.",
        epilog="Everything after WORKDIR goes to `python -m clip_jax.main` unchanged.",
    )
    add = p.add_argument
    add("tpu_name", help="the TPU VM (and queued resource) to create or reuse")
    add("config", help="config file, relative to the repository root")
    add("workdir", help="gs://bucket/path, or an absolute path that every worker mounts")
    add("flags", nargs=argparse.REMAINDER, help="clip_jax.main flags (--config.KEY=VALUE ...)")
    add("--zone", default="us-central2-b", help="(default: %(default)s)")
    add("--project", help="(default: gcloud's configured project)")
    add("--accelerator-type", default="v4-32", help="(default: %(default)s)")
    add("--runtime-version", help="the TPU software version (default: by accelerator type)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="a Spot slice: cheaper, preemptible")
    kind.add_argument("--preemptible", action="store_true", help="a preemptible slice (24 h)")
    add("--queued", action="store_true", help="create through a queued resource (waits)")
    add("--python", default="python3", help="the workers' interpreter (default: %(default)s)")
    add("--packages", default="jax[tpu]", help="installed with the code (default: %(default)s)")
    add("--run-name", help="names the logs and state on the workers (default: WORKDIR's name)")
    add("--poll-seconds", type=float, default=60.0, help="(default: %(default)s)")
    add("--max-relaunches", type=int, default=100, help="(default: %(default)s)")
    add("--max-failures", type=int, default=10, help="failed gcloud calls in a row (default: 10)")
    add("--no-watch", action="store_true", help="return once the run is started")
    add("--delete-when-done", action="store_true", help="delete the slice after the run")
    add("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)

    options = {o for action in p._actions for o in action.option_strings}
    misplaced = [flag for flag in args.flags if flag.split("=")[0] in options]
    if misplaced:
        raise UsageError(f"{misplaced[0]} is a launcher option: put it before TPU_NAME")
    if ZONE.match(args.config) and args.flags:
        raise UsageError(f"the zone is a flag: --zone={args.config} {args.tpu_name} CONFIG WORKDIR")
    if not (args.workdir.startswith("gs://") or os.path.isabs(args.workdir)):
        raise UsageError(f"WORKDIR {args.workdir!r}: give gs://... or an absolute shared path")
    if "" in args.flags:
        raise UsageError("an empty argument among the clip_jax.main flags; remove it")
    if args.queued and args.preemptible:
        raise UsageError("queued resources take --spot, not --preemptible")
    if args.runtime_version is None:
        family = args.accelerator_type.split("-")[0]
        if family not in RUNTIME_VERSIONS:
            raise UsageError(f"no default for {args.accelerator_type}: give --runtime-version")
        args.runtime_version = RUNTIME_VERSIONS[family]
    args.run_name = args.run_name or os.path.basename(args.workdir.rstrip("/")) or "run"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", args.run_name):
        raise UsageError(f"--run-name {args.run_name!r}: use letters, digits, '.', '_', '-'")
    return args


class Commands:
    """Every command the launcher runs, as argument lists, built in one place."""

    def __init__(self, args: argparse.Namespace, version: str, tarball: str):
        self.a = args
        self.version = version
        self.tarball = tarball
        self.code = f"{REMOTE}/code/{version}"
        self.remote_tarball = f"{REMOTE}-{version}.tar.gz"
        self.log = f"~/{REMOTE}/logs/{args.run_name}.log"
        self.gcs = args.workdir.startswith("gs://")
        self.where = [f"--zone={args.zone}"] + [f"--project={args.project}"] * bool(args.project)
        self.kind = ["--spot"] * args.spot + ["--preemptible"] * args.preemptible

    def tpu(self, verb: str, *rest: str) -> list[str]:
        return [*TPUS, "tpu-vm", verb, self.a.tpu_name, *self.where, *rest]

    def queued(self, verb: str, *rest: str) -> list[str]:
        return [*TPUS, "queued-resources", verb, self.a.tpu_name, *self.where, *rest]

    def describe(self) -> list[str]:
        return self.tpu("describe", "--format=value(state)")

    def describe_slice(self) -> list[str]:
        if self.a.queued:
            return self.queued("describe", "--format=value(state.state)")
        return self.describe()

    def create(self) -> list[str]:
        a = self.a
        if a.queued:
            node = [f"--node-id={a.tpu_name}", f"--runtime-version={a.runtime_version}"]
            return self.queued(
                "create", *node, f"--accelerator-type={a.accelerator_type}", *self.kind
            )
        return self.tpu(
            "create",
            f"--accelerator-type={a.accelerator_type}",
            f"--version={a.runtime_version}",
            *self.kind,
        )

    def delete(self) -> list[str]:
        if self.a.queued:
            return self.queued("delete", "--force", "--quiet")
        return self.tpu("delete", "--quiet")

    def ssh(self, command: str) -> list[str]:
        return self.tpu("ssh", "--worker=all", f"--command={command}")

    def archive(self, repo: str, tree: str) -> list[str]:
        return ["git", "-C", repo, "archive", "--format=tar.gz", f"--output={self.tarball}", tree]

    def copy(self) -> list[str]:
        target = f"{self.a.tpu_name}:{self.remote_tarball}"
        return [*TPUS, "tpu-vm", "scp", self.tarball, target, *self.where, "--worker=all"]

    def installed(self) -> list[str]:
        return self.ssh(f"test -f {self.code}/.installed")

    def install(self) -> list[str]:
        pip = [self.a.python, "-m", "pip", "install", "--quiet", "-e", self.code]
        pip = shlex.join(pip + shlex.split(self.a.packages))
        unpack = f"rm -rf $d; mkdir -p $d; tar -xzf {self.remote_tarball} -C $d"
        return self.ssh(
            f"set -e; d={self.code}; if [ ! -f $d/.installed ]; then {unpack}; {pip}; "
            f"touch $d/.installed; fi; rm -f {self.remote_tarball}"
        )

    def worker(self, *args: str) -> list[str]:
        """launch/tpu_worker.sh on every worker; status "absent" where this version is missing."""
        script = f"{self.code}/launch/tpu_worker.sh"
        run = shlex.join(["bash", script, *args])
        return self.ssh(f'if [ -f {script} ]; then {run}; else echo "clip_jax-status: absent"; fi')

    def start(self) -> list[str]:
        a = self.a
        script = f"{self.code}/launch/tpu_worker.sh"
        run = ["bash", script, "start", a.run_name, a.python, a.config, a.workdir, *a.flags]
        return self.ssh(shlex.join(run))

    def status(self) -> list[str]:
        return self.worker("status", self.a.run_name, *[self.a.workdir] * (not self.gcs))

    def stop(self) -> list[str]:
        return self.worker("stop", self.a.run_name)

    def done_marker(self, verb: str) -> list[str]:
        return ["gcloud", "storage", verb, f"{self.a.workdir.rstrip('/')}/done.json"]


def say(message: str) -> None:
    print(f"tpu_pod {time.strftime('%H:%M:%S')}: {message}", file=sys.stderr, flush=True)


def git(repo: str, *args: str) -> str:
    command = ["git", "-C", repo, *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def code_version(repo: str) -> tuple[str, str]:
    """The tree to ship (HEAD plus uncommitted changes to tracked files) and its short name."""
    lines = git(repo, "--no-optional-locks", "status", "--porcelain").splitlines()
    untracked = [line[3:] for line in lines if line.startswith("??")]
    if untracked:
        more = " ..." if len(untracked) > 5 else ""
        say(f"not shipped (untracked; `git add` to ship): {' '.join(untracked[:5])}{more}")
    # The tree of the tracked files as they are on disk, through a scratch index: the repository's
    # own index, work tree and refs stay untouched (only objects are added).
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "GIT_INDEX_FILE": os.path.join(scratch, "index")}
        for args in (["read-tree", "HEAD"], ["add", "--update"], ["write-tree"]):
            command = ["git", "-C", repo, *args]
            result = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    tree = result.stdout.strip()
    return tree, tree[:12]


def dry_run(c: Commands, repo: str, tree: str) -> None:
    def group(comment: str, *commands: list[str]) -> None:
        print(f"# {comment}", file=sys.stderr, flush=True)
        for command in commands:
            print(shlex.join(command), flush=True)

    group(f"package the code (version {c.version})", c.archive(repo, tree))
    group("create the slice unless it exists", c.describe_slice(), c.create())
    install = [c.installed(), c.copy(), c.install()]
    group("copy and install the code once per version (skipped where installed)", *install)
    group(f"start the run on every worker, detached; each logs to {c.log}", c.start())
    look = [c.done_marker("ls")] * c.gcs + [c.describe_slice(), c.status()]
    group(f"every {c.a.poll_seconds:g} s: the done marker, the slice, the workers", *look)
    group(
        "after a preemption: recreate, then copy, install and start as above",
        c.delete(),
        c.create(),
    )
    group("if the run fails on a worker: stop it on the others", c.stop())
    if c.gcs:
        group("once done", c.done_marker("cat"))
    if c.a.delete_when_done:
        group("then delete the slice", c.delete())


class Watch:
    """The loop: look at the done marker, the slice and the workers; act; sleep; until done."""

    def __init__(self, c: Commands, repo: str, tree: str):
        self.c, self.repo, self.tree = c, repo, tree
        self.failures = 0  # failed gcloud calls, in steps that failed one after another
        self.started = False  # by this launcher: a failure seen before is not this run's
        self.relaunches = 0
        self.packaged = False

    def call(self, command: list[str], quiet: bool = False) -> subprocess.CompletedProcess:
        """Runs a command; a quiet one (a look) is captured, the others print as they go."""
        if not quiet:
            say("+ " + shlex.join(command))
        return subprocess.run(command, capture_output=quiet, text=True)

    def act(self, what: str, command: list[str]) -> bool:
        result = self.call(command)
        if result.returncode != 0:
            self.failed(what, result)
        return result.returncode == 0

    def failed(self, what: str, result: subprocess.CompletedProcess) -> None:
        self.failures += 1
        last = (result.stderr or "").strip().splitlines()[-1:]
        say(f"{what} failed (status {result.returncode}){''.join(': ' + x for x in last)}")
        if self.failures >= self.c.a.max_failures:
            raise SystemExit(
                f"tpu_pod: giving up after {self.failures} failed gcloud calls in a row"
            )

    def slice_state(self) -> str:
        result = self.call(self.c.describe_slice(), quiet=True)
        if result.returncode != 0:
            if "NOT_FOUND" in result.stderr or "not found" in result.stderr:
                return "ABSENT"
            self.failed("describe", result)
            return "UNKNOWN"
        state = result.stdout.strip() or "UNKNOWN"
        if self.c.a.queued and state == "ACTIVE":  # the queued resource is there; and its node?
            node = self.call(self.c.describe(), quiet=True)
            state = node.stdout.strip() if node.returncode == 0 else "UNKNOWN"
        return state

    def done(self, statuses: str = "") -> bool:
        if self.c.gcs:
            return self.call(self.c.done_marker("ls"), quiet=True).returncode == 0
        return "clip_jax-done" in statuses

    def statuses(self) -> tuple[list[tuple[str, int]], str] | None:
        result = self.call(self.c.status(), quiet=True)
        found = [(m[1], int(m[2] or 0)) for m in STATUS.finditer(result.stdout)]
        if result.returncode != 0 or not found:
            self.failed("the workers' status", result)
            return None
        return found, result.stdout

    def deploy_and_start(self) -> bool:
        c = self.c
        if self.call(c.installed(), quiet=True).returncode != 0:
            if not self.packaged:
                os.makedirs(os.path.dirname(c.tarball), exist_ok=True)
                if subprocess.run(c.archive(self.repo, self.tree)).returncode != 0:
                    raise SystemExit("tpu_pod: git archive failed; the code cannot be packaged")
                self.packaged = True
            if not (self.act("copy", c.copy()) and self.act("install", c.install())):
                return False
        if not self.act("start", c.start()):
            return False
        self.started = True
        tail = shlex.join([*c.tpu("ssh", "--worker=0"), f"--command=tail -f {c.log}"])
        say(f"started; each worker logs to {c.log} (worker 0's: {tail})")
        return True

    def relaunch(self, why: str) -> None:
        self.relaunches += 1
        if self.relaunches > self.c.a.max_relaunches:
            raise SystemExit(
                f"tpu_pod: {why}, and the {self.c.a.max_relaunches} relaunches are used"
            )
        say(f"{why}: relaunch {self.relaunches}")

    def finish(self) -> int:
        say(f"the run is done: {self.c.a.workdir}/done.json")
        if self.c.gcs:
            self.call(self.c.done_marker("cat"))
        if self.c.a.delete_when_done:
            self.act("delete", self.c.delete())
        return 0

    def step(self) -> int | None:
        """One look and what follows from it; the exit status once the watch is over."""
        c = self.c
        if self.done():
            return self.finish()
        state = self.slice_state()
        if state == "ABSENT" or state in RECREATE_STATES:
            if self.started:
                self.relaunch(f"the slice is {state.lower()}")
            if state != "ABSENT":
                self.act("delete", c.delete())
            say(f"creating {c.a.tpu_name}: {c.a.accelerator_type}, runtime {c.a.runtime_version}")
            self.act("create", c.create())
            self.started = False  # nothing runs on a new slice: the next start is the relaunch
            return None
        if state == "STOPPED":
            self.act("start the slice", c.tpu("start"))
            return None
        if state not in READY_STATES:
            say(f"the slice is {state}; waiting")
            return None
        looked = self.statuses()
        if looked is None:
            return None
        statuses, text = looked
        if self.done(text):
            return self.finish()
        failed = [rc for status, rc in statuses if status == "exited" and rc != 0]
        # A process lost: the others stopped with the relaunch status; it may have been killed.
        lost = RELAUNCH_STATUS in failed and all(rc == RELAUNCH_STATUS or rc > 128 for rc in failed)
        if failed and self.started and not lost:
            say(f"the run failed with status {failed[0]}: stopping it; see {c.log} on the workers")
            self.call(c.stop())
            return 1
        if any(status == "running" for status, _ in statuses):
            if lost and self.started:  # they stop by themselves; SIGTERM for one that hangs
                say("a process of the run was lost: stopping the others")
                self.call(c.stop())
                return None
            if c.a.no_watch:
                say(f"the run is running; each worker logs to {c.log}")
                return 0
            return None
        if self.done():  # it may have finished since the first look
            return self.finish()
        if self.started:
            why = (
                f"a process was lost (exit status {RELAUNCH_STATUS})"
                if lost
                else "the run stopped without done.json (it saved)"
            )
            self.relaunch(why)
        if self.deploy_and_start() and c.a.no_watch:
            return 0
        return None

    def run(self) -> int:
        while True:
            failures = self.failures
            status = self.step()
            if status is not None:
                return status
            if self.failures == failures:  # a step without a failure ends the series
                self.failures = 0
            time.sleep(self.c.a.poll_seconds)


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
        repo = git(os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--show-toplevel")
    except UsageError as e:
        print(f"tpu_pod: error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"tpu_pod: error: run it from a git checkout ({e.stderr.strip()})", file=sys.stderr)
        return 2
    try:
        tree, version = code_version(repo)
    except subprocess.CalledProcessError as e:
        print(f"tpu_pod: error: cannot name the code version: {e.stderr.strip()}", file=sys.stderr)
        return 2
    tarball = os.path.join(tempfile.gettempdir(), "clip_jax-launch", f"{REMOTE}-{version}.tar.gz")
    commands = Commands(args, version, tarball)
    if args.dry_run:
        dry_run(commands, repo, tree)
        return 0
    if shutil.which("gcloud") is None:
        print(
            "tpu_pod: error: gcloud is not on PATH: install the Google Cloud CLI", file=sys.stderr
        )
        return 2
    say(f"run {args.run_name}: {args.config} in {args.workdir} on {args.tpu_name}, code {version}")
    try:
        return Watch(commands, repo, tree).run()
    except KeyboardInterrupt:
        say("interrupted; the run goes on on the workers: run the same command to watch it again")
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
