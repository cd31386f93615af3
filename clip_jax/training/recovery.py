"""Recovery from divergence: branches of a run, rollbacks, and the words that halt it.

A *branch* is abandoned when a run goes back to an earlier checkpoint: by hand
(`--config.resume_step=N`) or by itself (`nonfinite="rollback"` or `spike.policy="rollback"`).
Nothing of it is deleted: its checkpoints after N, its eval results and its metrics rows move to
`workdir/abandoned/<branch>/` (a workdir of its own: `load_pretrained` and `Checkpointer` read
it), and `workdir/branches.jsonl` gets a row saying what was moved, from where to where, and which
batches a rollback skipped, so that a resume from N skips them too.

`Recovery` is what the training loop asks after each step's figures are read: go on, roll back
(it restores the checkpoint and says from which step to go on), or halt with a message that names
the newest checkpoint from before the trouble and the command that resumes from it.
"""

import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils

from clip_jax.evals.runner import RESULTS_DIR
from clip_jax.infra import paths
from clip_jax.infra.errors import UsageError
from clip_jax.training import checkpoint
from clip_jax.training.guard import LossSpikeError, NonFiniteGuard, NonFiniteLossError
from clip_jax.training.metrics import METRICS_FILE, MetricsWriter, parse_rows
from clip_jax.training.spikes import SpikeDetector

ABANDONED_DIR = "abandoned"  # workdir/abandoned/<branch>/: checkpoints, evals, metrics.jsonl
BRANCHES_FILE = "branches.jsonl"  # one row per abandoned branch


# --- Branches ----------------------------------------------------------------------------------


def branch_records(workdir: str) -> list[dict]:
    """The rows of `workdir/branches.jsonl`, oldest first."""
    path = paths.path(workdir) / BRANCHES_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"clip_jax {name}")


def abandon_after(
    workdir: str, ckpt: checkpoint.Checkpointer, step: int, record: dict[str, Any]
) -> dict[str, Any]:
    """Moves what the run wrote after `step` (checkpoints, eval results, metrics rows) into
    `workdir/abandoned/<branch>/` and appends `record` (what happened) to branches.jsonl, with
    the moved steps and the folder; returns that row. Process 0 moves, all processes wait."""
    root = paths.path(workdir)
    ckpt.wait()  # a write in flight finishes (and is moved with the rest)
    moved = sorted(s for s in ckpt.all_steps() if s > step)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"after_step_{step}_{stamp}"
    folder = root / ABANDONED_DIR / name
    row = {**record, "to_step": int(step), "moved_steps": moved, "folder": str(folder)}
    row["time"] = time.time()
    if jax.process_index() == 0:
        (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
        for s in moved:
            (paths.path(ckpt.directory) / str(s)).rename(folder / "checkpoints" / str(s))
        evals = root / RESULTS_DIR
        if evals.exists():
            for entry in evals.iterdir():
                k = entry.name.removeprefix("step_")
                if k.isdigit() and int(k) > step:
                    (folder / RESULTS_DIR).mkdir(parents=True, exist_ok=True)
                    entry.rename(folder / RESULTS_DIR / entry.name)
        metrics = root / METRICS_FILE
        if metrics.exists():
            rows = parse_rows(metrics.read_text(), str(metrics))
            later = "".join(json.dumps(r) + "\n" for r in rows if r["step"] > step)
            paths.write_text(folder / METRICS_FILE, later)
        for name_ in ("config.json",):  # the branch reads as a run of its own
            if (root / name_).exists():
                paths.write_text(folder / name_, (root / name_).read_text())
        previous = (root / BRANCHES_FILE).read_text() if (root / BRANCHES_FILE).exists() else ""
        paths.write_text(root / BRANCHES_FILE, previous + json.dumps(row) + "\n")
    _sync(f"abandon after step {step}")
    ckpt.reload()
    return row


def keep_count(config) -> int:
    """How many of the newest checkpoints to keep: `keep_checkpoints`, and at least 2 while
    spikes are watched or non-finite steps roll back, since trouble seen at the step after the
    newest checkpoint goes back to the one before it (`Recovery._sane_step`)."""
    watched = config.spike.window > 0 or config.nonfinite == "rollback"
    return max(config.keep_checkpoints, 2) if watched else config.keep_checkpoints


def resume_step_target(config, ckpt: checkpoint.Checkpointer, workdir: str) -> int | None:
    """The step `--config.resume_step` asks for, once: None when it is unset, or when this
    workdir already went back to it and has trained on since (a relaunch of the same command,
    after a preemption, goes on from the newest checkpoint of the new branch). A step without a
    checkpoint is a UsageError naming those there are."""
    wanted = config.resume_step
    if wanted is None:
        return None
    steps = ckpt.all_steps()
    records = branch_records(workdir)
    _sync("resume_step read")  # every process has read before process 0 moves anything
    last = records[-1] if records else None
    done = (
        last is not None
        and last.get("kind") == "resume_step"
        and last["to_step"] == wanted
        and steps
        and max(steps) > wanted
    )
    if done:
        logging.info(
            "resume_step=%d was applied on %s; going on from the newest checkpoint of that "
            "branch (step %d)",
            wanted,
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(last["time"])),
            max(steps),
        )
        return None
    if wanted not in steps:
        there = ", ".join(map(str, steps)) if steps else "none"
        raise UsageError(
            f"resume_step={wanted}: {ckpt.directory} has no checkpoint at step {wanted} "
            f"(its checkpoints: {there})"
        )
    return wanted


def resume_command(step: int) -> str:
    """The command that resumes this run from `step`: the command line this process was started
    with, when it is `python -m clip_jax.main`, with `--config.resume_step=STEP`."""
    flag = f"--config.resume_step={step}"
    argv = sys.argv
    main = os.path.join("clip_jax", "main.py")
    if not argv or not argv[0].endswith(main):
        return f"rerun with {flag}"
    args = [a for a in argv[1:] if not a.startswith("--config.resume_step")]
    return "rerun: " + shlex.join(["python", "-m", "clip_jax.main", *args, flag])


# --- The loop's questions ----------------------------------------------------------------------


class Recovery:
    """Reads each step's loss and non-finite count (`check`), keeps the spike detector, the
    rollback count and the skipped batches (the trainer's record in each checkpoint), and acts
    on `nonfinite` and `spike.policy`."""

    def __init__(
        self,
        config,
        ckpt: checkpoint.Checkpointer,
        writer: MetricsWriter,
        workdir: str,
        start_step: int,
        start_nonfinite: int,
        record: dict | None,
        restore_fn: Callable[[int], Any],
    ):
        self.config, self.ckpt, self.writer, self.workdir = config, ckpt, writer, workdir
        self._restore = restore_fn
        self._start(start_step, start_nonfinite, record or {})

    def _start(self, step: int, nonfinite: int, record: dict) -> None:
        spike = self.config.spike
        self.detector = SpikeDetector(
            spike.window, spike.factor, spike.length, state=record.get("detector")
        )
        self.guard = NonFiniteGuard(self.config, step, nonfinite)
        self.rollbacks = int(record.get("rollbacks", 0))
        self.skipped_batches = int(record.get("skipped_batches", 0))
        self.lr_scale = float(record.get("lr_scale", 1.0))
        self.ckpt.protect(self._sane_step(self.detector.episode_start))

    def record(self) -> dict[str, Any]:
        """The trainer's record saved with each checkpoint (JSON)."""
        return {
            "detector": self.detector.state(),
            "spiking": self.detector.episode_start is not None,
            "rollbacks": self.rollbacks,
            "skipped_batches": self.skipped_batches,
            "lr_scale": self.lr_scale,
        }

    def metrics(self) -> dict[str, int]:
        return {
            "spikes": self.detector.spikes,
            "rollbacks": self.rollbacks,
            "skipped_batches": self.skipped_batches,
        }

    def check(self, step: int, count: jax.Array, loss: jax.Array, now: int):
        """Reads the figures of `step` (`count`: nonfinite_steps after it, `loss`: its loss);
        `now` is the step whose batch was taken last. Returns None to go on, or after a
        rollback `(step, state, values)`: the restored checkpoint's step and state, and the
        rollback's metrics row. Raises NonFiniteLossError or LossSpikeError to halt."""
        if step <= self.guard.checked and step <= self.detector.checked:
            return None
        started = self.detector.episode_start
        try:
            nonfinite = self.guard.check(step, count)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"{e}; {self._advice(started or step)}") from None
        loss = float(loss)  # waits for the step: the previous one, while this one runs
        act = self.detector.observe(step, loss)
        if self.detector.episode_start is not None and started is None:
            logging.warning(
                "step %d: loss spike (%.4f, above %.4f: the mean of the last %d calm steps plus "
                "%g times their spread)",
                step,
                loss,
                self._last_threshold(),
                self.config.spike.window,
                self.config.spike.factor,
            )
            self.ckpt.protect(self._sane_step(self.detector.episode_start))
        elif self.detector.episode_start is None and started is not None:
            logging.info("step %d: the loss is back under the spike threshold", step)
            self.ckpt.protect(None)
        if nonfinite is not None:
            return self._rollback(started or step, now, f"non-finite loss at step {step}")
        if act:
            first = self.detector.episode_start
            length = self.config.spike.length
            reason = (
                f"a loss spike at step {step}"
                if length == 1
                else f"{length} loss spikes in a row up to step {step} (from step {first} on)"
            )
            if self.config.spike.policy == "halt":
                raise LossSpikeError(f"{reason}; {self._advice(first)}")
            if self.config.spike.policy == "rollback":
                return self._rollback(first, now, reason)
            logging.warning("%s (spike.policy=log: going on)", reason)
        return None

    def _last_threshold(self) -> float:
        limit = self.detector.threshold()
        return float("nan") if limit is None else limit

    def _sane_step(self, trouble: int | None) -> int | None:
        """The newest checkpoint from before the trouble that began at step `trouble`: written
        at `trouble - 2` or earlier (the loss of a step is computed with the weights of the step
        before, whose update may be what went wrong) and outside a spike episode."""
        if trouble is None:
            return None
        for s in sorted(self.ckpt.all_steps(), reverse=True):
            if s <= trouble - 2 and not (self.ckpt.trainer_record(s) or {}).get("spiking"):
                return s
        return None

    def _advice(self, trouble: int) -> str:
        sane = self._sane_step(trouble)
        if sane is None:
            return (
                f"no checkpoint was written before the trouble began (step {trouble}): lower "
                "optim.learning_rate or set optim.grad_clip_norm and start the run again"
            )
        return (
            f"the newest checkpoint from before the trouble began (step {trouble}) is step "
            f"{sane}; lower optim.learning_rate or set optim.grad_clip_norm, and resume from it "
            f"({resume_command(sane)})"
        )

    def _rollback(self, trouble: int, now: int, reason: str):
        self.ckpt.wait()
        target = self._sane_step(trouble)
        limit = self.config.max_rollbacks
        if target is None or self.rollbacks >= limit:
            why = "no checkpoint to roll back to" if target is None else f"{limit} rollbacks"
            raise NonFiniteLossError(f"{reason}, after {why}: halted; {self._advice(trouble)}")
        skipped = now - target
        rollbacks = self.rollbacks + 1
        record = self.ckpt.trainer_record(target) or {}
        detector = {**record.get("detector", {}), "spikes": self.detector.spikes}
        after = {
            **record,
            "detector": detector,  # the target's window, and every spike so far counted
            "rollbacks": rollbacks,
            "skipped_batches": self.skipped_batches + skipped,
            "lr_scale": self.lr_scale * self.config.rollback_lr_scale,
        }
        self.writer.flush()  # the rows past `target` go with the branch
        row = abandon_after(
            self.workdir,
            self.ckpt,
            target,
            {
                "kind": "rollback",
                "reason": reason,
                "from_step": now,
                "skipped_batches": skipped,
                "trainer": after,
            },
        )
        self.writer.rewind(target)
        state, _ = self._restore(target)
        self._start(target, int(state.nonfinite_steps), after)
        logging.warning(
            "%s: rolled back to step %d (rollback %d of at most %d); the batches of steps "
            "%d-%d are skipped; what the run wrote after step %d (checkpoints %s) is in %s",
            reason,
            target,
            rollbacks,
            limit,
            target + 1,
            now,
            target,
            row["moved_steps"] or "none",
            row["folder"],
        )
        return (
            target,
            state,
            {
                "rollback/from_step": now,
                "rollback/skipped_batches": skipped,
                "rollback/lr_scale": self.lr_scale,
            },
        )


def pending_skip(workdir: str, step: int) -> dict | None:
    """The trainer's record to resume `step` with when the run rolled back to `step` and wrote
    no checkpoint since (its row in branches.jsonl: skipped batches, counts); else None."""
    records = branch_records(workdir)
    if records and records[-1].get("kind") == "rollback" and records[-1]["to_step"] == step:
        return records[-1]
    return None
