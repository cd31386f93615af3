"""Checkpoints over orbax: asynchronous atomic saves, exact resume, preemption, resharding.

A checkpoint holds everything a resume needs: the train state (parameters, optimizer state, step,
BatchNorm statistics, the non-finite counters) and every process's input-pipeline position, so that
the resumed run sees exactly the batches the uninterrupted run would have seen. Nothing else is
random during training (no dropout), so no RNG state needs saving beyond the data position.

Orbax writes each step into a temporary directory and renames it when complete, so a save killed
at any moment leaves the previous checkpoint as the latest; leftovers are removed at start-up.
Restoring takes the target's shardings, so a run saved on one mesh resumes on any other.
"""

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from clip_jax.infra import paths
from clip_jax.infra.errors import UsageError

ITEMS = ("state", "data", "config", "trainer")


class CheckpointWriteError(UsageError):
    """An asynchronous checkpoint write failed (a full disk, lost access): one line, and the
    checkpoints written before it stay."""


def _os_reason(e: BaseException) -> str | None:
    """The operating system's words for a failed write: the error's errno, or the
    `os_error_code` that TensorStore writes into its message ("No space left on device")."""
    code = getattr(e, "errno", None)
    if code is None:
        found = re.search(r"os_error_code='?(\d+)", str(e))
        code = int(found.group(1)) if found else None
    return os.strerror(code) if code else None


class _Protected(ocp.checkpoint_managers.PreservationPolicy):
    """Keeps the steps in `steps` whatever the other rules say."""

    def __init__(self):
        self.steps: set[int] = set()

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [info.step in self.steps for info in checkpoints]


class Checkpointer:
    """Saves and restores `(train_state, data_state)` under `workdir/checkpoints`, with the
    trainer's own record of each step (`trainer_record`: spikes, rollbacks).

    Keeps the last `keep` checkpoints (None: all of them), plus every step that is a multiple of
    `keep_period` (None or 0: none), plus the step `protect` names (the newest one from before a
    loss spike, while the run has not recovered).
    """

    def __init__(
        self,
        workdir: str,
        keep: int | None = None,
        keep_period: int | None = None,
        async_save: bool = True,
        create: bool = True,
    ):
        self._protected = _Protected()
        policies = [ocp.checkpoint_managers.LatestN(n=keep), self._protected]
        if keep_period:
            policies.append(ocp.checkpoint_managers.EveryNSteps(keep_period))
        options = ocp.CheckpointManagerOptions(
            # readers (evaluation, export) never delete
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies)
            if create
            else None,
            cleanup_tmp_directories=create,  # what a killed save left behind (writers only)
            enable_async_checkpointing=async_save,
            create=create,
            read_only=not create,  # readers (evaluation, export) never delete or write
        )
        self.directory = str(paths.path(workdir) / "checkpoints")
        self._writing: int | None = None  # the step whose asynchronous write is in flight
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict,
        config: dict | None = None,
        trainer: dict | None = None,
    ) -> float:
        """Starts saving; returns the seconds the training loop was blocked.

        `config` (the run's config as a dict) is saved with the step, so that the step can be
        read back as the run that wrote it, whatever config.json says later; `trainer` is the
        trainer's own record (JSON), read back by `trainer_record`.
        """
        t0 = time.perf_counter()
        self._check_previous_write()
        states = gather_process_states(data_state)
        items = {
            "state": ocp.args.StandardSave(state),
            "data": ocp.args.JsonSave({"process_count": len(states), "states": states}),
        }
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        if trainer is not None:
            items["trainer"] = ocp.args.JsonSave(trainer)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._writing = step
        return time.perf_counter() - t0

    def _check_previous_write(self) -> None:
        """Raises CheckpointWriteError when the last asynchronous write failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - the write's own error, whatever it is
            failed, self._writing = self._writing, None
            kept = [s for s in self.all_steps() if s != failed]
            cause = " ".join(str(e).split())
            cause = cause[-240:] if len(cause) > 240 else cause  # the OS's reason comes last
            reason = _os_reason(e)
            if reason and reason not in cause:  # it came earlier: a long TensorStore spec after it
                cause = f"{reason}: {cause}"
            previous = f"the checkpoint at step {max(kept)} is kept" if kept else "none is kept"
            raise CheckpointWriteError(
                f"writing the checkpoint of step {failed} to {self.directory} failed "
                f"(...{cause}); {previous}: free space (or fix access) and rerun to resume"
            ) from None

    def busy(self) -> bool:
        """Whether the previous asynchronous save is still being written, on any process (all
        processes must agree, since saving is collective)."""
        busy = np.array([self._manager.is_saving_in_progress()], np.int32)
        if jax.process_count() > 1:
            busy = multihost_utils.process_allgather(busy)
        return bool(busy.any())

    def config(self, step: int) -> dict | None:
        """The config saved with `step`; None for checkpoints written without one."""
        return self._json_item(step, "config")

    def trainer_record(self, step: int) -> dict | None:
        """The trainer's record saved with `step`; None for checkpoints written without one."""
        return self._json_item(step, "trainer")

    def _json_item(self, step: int, name: str) -> dict | None:
        if not (paths.path(self.directory) / str(step) / name).exists():
            return None
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()})
        )
        return restored[name]

    def protect(self, step: int | None) -> None:
        """Keeps `step` whatever `keep` says, until another step (or None) is protected."""
        self._protected.steps = set() if step is None else {step}

    def reload(self) -> None:
        """Reads the directory again, after checkpoints were moved out of it."""
        self._manager.reload()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict | None]:
        """The state at `step`, laid out as `abstract_state`'s shardings say, and this process's
        data position (None when the process count changed, so the data restarts)."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        data = restored["data"]
        if data["process_count"] != jax.process_count():
            logging.warning(
                "checkpoint was written by %d processes, this run has %d: the input pipeline "
                "starts afresh (parameters and optimizer state are restored exactly)",
                data["process_count"],
                jax.process_count(),
            )
            return restored["state"], None
        return restored["state"], data["states"][jax.process_index()]

    def restore_latest(self, abstract_state: Any) -> tuple[int | None, Any, dict | None]:
        """`(step, state, data position)` of the newest checkpoint that reads back, or
        `(None, None, None)` when there is none.

        An unreadable latest checkpoint (a truncated file, a missing manifest, garbage
        metadata) does not stop a run that has an older readable one: the older one is
        restored, the unreadable ones are moved out of the way, each said in one line. When no
        checkpoint reads back (another model's checkpoints under --config_change_ok, or all of
        them damaged), nothing is moved and the newest one's error is raised.
        """
        failed: list[tuple[int, Exception]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, data = self.restore(step, abstract_state)
                ok = True
            except Exception as e:  # noqa: BLE001 - whatever the damage, the older one may read
                failed.append((step, e))
                ok = False
            if jax.process_count() > 1:  # a damaged shard may be one process's only
                flags = multihost_utils.process_allgather(np.array([ok], np.int32))
                if ok and not flags.all():
                    failed.append((step, RuntimeError("unreadable on another process")))
                ok = bool(flags.all())
            if ok:
                for bad, e in failed:
                    cause = " ".join(str(e).split())
                    cause = f"{type(e).__name__}: {cause[:200]}{'...' if len(cause) > 200 else ''}"
                    logging.warning(
                        "the checkpoint at step %d is unreadable (%s); moved it to %s and "
                        "resuming from step %d",
                        bad,
                        cause,
                        self._set_aside(bad),
                        step,
                    )
                return step, state, data
        if failed:
            raise failed[0][1]
        return None, None, None

    def _set_aside(self, step: int) -> str:
        """Moves the checkpoint at `step` to `workdir/checkpoints_unreadable/` (process 0; all
        processes wait for it) so that no later run tries it again; returns where it went."""
        source = paths.path(self.directory) / str(step)
        target = paths.path(self.directory).parent / "checkpoints_unreadable" / f"{step}"
        if target.exists():
            target = target.parent / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"clip_jax set aside checkpoint {step}")
        self.reload()
        return str(target)

    def wait(self) -> None:
        self._check_previous_write()

    def close(self) -> None:
        try:
            self._check_previous_write()
        except CheckpointWriteError:
            with contextlib.suppress(Exception):  # the failed write again: said already
                self._manager.close()
            raise
        self._manager.close()


def gather_process_states(data_state: dict) -> list[dict]:
    """Every process's JSON-able data state, in process order, on every process."""
    if jax.process_count() == 1:
        return [data_state]
    raw = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    gathered = multihost_utils.process_allgather(padded)
    return [
        json.loads(bytes(row[: int(n)]).decode())
        for row, n in zip(gathered, lengths.reshape(-1), strict=True)
    ]


class PreemptionWatcher:
    """Says when to save and stop: the job is being preempted (SIGTERM) or the user pressed
    Ctrl-C (the first SIGINT is taken as SIGTERM; a second one aborts at once).

    With several processes, JAX's coordination service owns SIGTERM (a signal no longer kills the
    process once `jax.distributed` is initialised) and `reached_preemption_sync_point` makes every
    process agree on the same step; a SIGINT is passed on to it as a SIGTERM of this process. A
    single process catches SIGTERM itself.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._multi = jax.process_count() > 1
        self._previous: dict[int, Any] = {}
        self.reason = "preempted"
        if threading.current_thread() is not threading.main_thread():
            return
        if not self._multi:
            self._previous[signal.SIGTERM] = signal.signal(
                signal.SIGTERM, lambda *_: self._flag.set()
            )
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupted)

    def _interrupted(self, signum, frame) -> None:
        if self.reason == "interrupted":  # the second Ctrl-C: now, without waiting for a write
            print(
                "error: interrupted twice: stopped at once; a checkpoint being written is "
                "dropped, the ones before it stay",
                file=sys.stderr,
                flush=True,
            )
            os._exit(130)
        self.reason = "interrupted"
        logging.warning("interrupted: saving after this step, then stopping (Ctrl-C again aborts)")
        if self._multi:
            os.kill(os.getpid(), signal.SIGTERM)  # the coordination service tells every process
        else:
            self._flag.set()

    def reached(self, step: int) -> bool:
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag.is_set()

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
