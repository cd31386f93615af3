"""The processes of a multi-process job watch each other, so that none waits forever for one that
is gone, and they stop together.

A process that dies (SIGKILL, out of memory, its host lost) leaves the others waiting in their
next collective; JAX's coordination service notices only after its own heartbeat timeout and then
aborts every process with a C++ stack trace. Instead, once a process has joined the job
(`cli.initialize_distributed`), a thread of it beats in the coordination service's key-value store
every few seconds and reads the others' beats:

- a process whose beat has not changed for `--heartbeat_timeout_seconds` is lost: every other
  process stops with one line naming it and exit status `RELAUNCH_STATUS` (75), which the
  launchers take as "relaunch"; rerunning the same command resumes the run from its last
  checkpoint. Process 0 is no exception: the coordination service runs in a process of its own
  beside it (`clip_jax.infra.coordination`), which outlives it until the others have stopped. A
  coordination service that stops answering (process 0's host gone) is lost the same way.
- a process that stops on its own with a non-zero status (a user's mistake, a bug, a non-finite
  loss) records it before it exits, and the others stop at once with its status and a line
  naming it (`Watchdog.stop`).

A process that has stopped skips JAX's shutdown barrier (which only waits for the processes still
running).
"""

import atexit
import dataclasses
import json
import os
import sys
import threading
import time
import traceback
from typing import Any, NoReturn

from absl import logging

from clip_jax.infra import logs
from clip_jax.infra.errors import UsageError

RELAUNCH_STATUS = 75  # EX_TEMPFAIL (sysexits.h): a process of the job was lost; rerun to resume
HEARTBEAT_TIMEOUT_HELP = (
    "In a multi-process job, a process whose heartbeat is missing this long is taken as lost: "
    f"the others stop with one line naming it and exit status {RELAUNCH_STATUS}, which the "
    "launchers relaunch (the run resumes from its last checkpoint)."
)
KEYS = "clip_jax/watchdog/"  # in the coordination service's key-value store: beat/I, stop/I
RESUME = "rerun the same command (a training run resumes from its last checkpoint)"


@dataclasses.dataclass
class _Peer:
    """What this process knows of another: its last beat, when that changed (this process's
    monotonic clock: hosts' clocks are never compared), and its stop record once it has one."""

    beat: str | None
    changed: float
    stop: dict | None = None


class Watchdog:
    """Beats for this process and watches the others' beats and stop records (see the module
    docstring); `stop` ends this process the way the others expect."""

    def __init__(self, client: Any, index: int, count: int, timeout: float, coordinator: str):
        self.client = client  # JAX's DistributedRuntimeClient, already connected
        self.index, self.count = index, count
        self.timeout = timeout
        self.coordinator = coordinator
        self.interval = min(max(timeout / 6, 0.2), 10.0)  # between beats
        now = time.monotonic()
        self.answered = now  # the coordination service's last answer
        self.peers = {i: _Peer(None, now) for i in range(count) if i != index}
        self.lock = threading.Lock()
        self.stopping = threading.Lock()  # held by the one thread that ends the process
        self.ended = False

    def start(self) -> None:
        threading.Thread(target=self._beat, name="watchdog-beat", daemon=True).start()
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()
        atexit.register(self.end)  # runs before JAX's shutdown (registered earlier)

    # --- Beating and reading (one thread; a call that hangs is caught by the other) ------------

    def _beat(self) -> None:
        beats = 0
        while not self.ended:
            beats += 1
            self._poll(str(beats))
            time.sleep(self.interval)

    def _poll(self, beat: str | None) -> bool:
        """Beats (unless `beat` is None) and reads the store; False if the service did not
        answer."""
        import jax

        try:
            if beat is not None:
                self.client.key_value_set(f"{KEYS}beat/{self.index}", beat, True)
            entries = self.client.key_value_dir_get(KEYS)
        except jax.errors.JaxRuntimeError as e:  # the coordination service did not answer
            logging.log_every_n_seconds(logging.WARNING, "watchdog: %s", 10, e)
            return False
        self._read(dict(entries))
        return True

    def _read(self, entries: dict[str, str]) -> None:
        now = time.monotonic()
        with self.lock:
            self.answered = now
            for i, peer in self.peers.items():
                beat = entries.get(f"{KEYS}beat/{i}")
                if beat != peer.beat:
                    peer.beat, peer.changed = beat, now
                if peer.stop is None and f"{KEYS}stop/{i}" in entries:
                    peer.stop = json.loads(entries[f"{KEYS}stop/{i}"])

    # --- Watching -------------------------------------------------------------------------------

    def _watch(self) -> None:
        last = time.monotonic()
        while not self.ended:
            time.sleep(self.interval / 2)
            now = time.monotonic()
            stalled, last = now - last - self.interval / 2, now
            if stalled > self.interval:  # this process did not run (the GIL held too long, the
                self._forgive(stalled)  # machine suspended): the others' silence was its own
            verdict = self.verdict()
            if verdict is not None:
                self.stop(*verdict)

    def _forgive(self, seconds: float) -> None:
        with self.lock:
            self.answered += seconds
            for peer in self.peers.values():
                peer.changed += seconds

    def verdict(self) -> tuple[int, str] | None:
        """(status, line) once the job cannot go on: a process stopped or lost; else None."""
        now = time.monotonic()
        with self.lock:
            if now - self.answered > self.timeout:
                return RELAUNCH_STATUS, (
                    f"process 0 of {self.count} lost: the coordinator at {self.coordinator} "
                    f"has not answered for {self.timeout:g} s; {RESUME}"
                )
            for i, peer in self.peers.items():
                if peer.stop and peer.stop["status"] != 0:
                    status, cause = peer.stop["status"], peer.stop["cause"]
                    if status == RELAUNCH_STATUS:  # it saw a process lost: so does this one
                        return status, cause
                    return status, f"process {i} of {self.count} stopped: {cause}"
            lost = [
                i
                for i, peer in self.peers.items()
                if peer.stop is None and now - peer.changed > self.timeout
            ]
        if not lost:
            return None
        which = f"process {lost[0]}" if len(lost) == 1 else f"processes {lost}"
        return RELAUNCH_STATUS, (
            f"{which} of {self.count} lost: no heartbeat for {self.timeout:g} s (killed, out of "
            f"memory, or its host gone); {RESUME}"
        )

    def wait_for_verdict(self) -> tuple[int, str] | None:
        """The verdict, waiting for one at most the timeout: for an error that a lost process
        may have caused (a collective that failed)."""
        deadline = time.monotonic() + self.timeout + 2 * self.interval
        while (verdict := self.verdict()) is None and time.monotonic() < deadline:
            time.sleep(self.interval / 4)
        return verdict

    # --- Stopping -----------------------------------------------------------------------------

    def stop(self, status: int, line: str) -> NoReturn:
        """Ends this process with `error: LINE` and `status`, after recording both for the
        others."""
        self.stopping.acquire()  # a second caller waits here for the first one's exit
        logs.print_error(line)
        self._record(status, line)
        logs.flush()
        os._exit(status)

    def stop_with_traceback(self, error: BaseException) -> NoReturn:
        """Ends this process after an exception: if another process has stopped or is lost (a
        collective's error may only be the news of it), with that one line; else as a bug, its
        traceback as Python prints it and exit status 1 (2 for a UsageError shown with its
        traceback), the others stopping with a line naming this process."""
        _in_thread(self._poll, None, timeout=self.interval)  # the others' records as they are
        verdict = self.verdict()
        if verdict is None and _from_the_runtime(error):
            verdict = self.wait_for_verdict()
        if verdict is not None:
            self.stop(*verdict)
        self.stopping.acquire()
        sys.excepthook(type(error), error, error.__traceback__)
        text = traceback.format_exception_only(type(error), error)[-1].strip().splitlines()[0]
        if isinstance(error, UsageError):  # shown with its traceback: CLIP_JAX_DEBUG=1
            status, cause = 2, f"{error} (see process {self.index}'s traceback)"
        else:
            status, cause = 1, f"{text} (a bug: see process {self.index}'s traceback)"
        self._record(status, cause)
        logs.flush()
        os._exit(status)

    def end(self) -> None:
        """A normal exit: the others stop watching this process (it waits in JAX's shutdown).
        Once a stop has begun, it waits for that stop's exit instead."""
        self.stopping.acquire()
        self.ended = True
        self._record(0, "ended")

    def _record(self, status: int, cause: str) -> None:
        """`stop/I` in the store, unless the coordination service does not answer at once."""
        record = json.dumps({"status": status, "cause": cause})
        key = f"{KEYS}stop/{self.index}"
        _in_thread(self.client.key_value_set, key, record, True, timeout=self.interval)


def _in_thread(fn, *args, timeout: float) -> None:
    """`fn(*args)`, given up on after `timeout` seconds: a call to a coordination service on a
    host that is gone may hang."""
    call = threading.Thread(target=fn, args=args, daemon=True)
    call.start()
    call.join(timeout)


# How XLA's runtime errors begin (an absl status code): the ones a collective raises when a peer
# is gone (on a CPU, gloo's "UNKNOWN: Gloo AllGather failed: ... Connection closed by peer").
RUNTIME_CODES = ("UNKNOWN:", "INTERNAL:", "UNAVAILABLE:", "ABORTED:", "CANCELLED:")


def _from_the_runtime(error: BaseException | None) -> bool:
    """Whether an error of XLA's runtime is in the chain of `error` (JAX raises some as
    JaxRuntimeError, some as ValueError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__name__ == "JaxRuntimeError" or str(error).startswith(RUNTIME_CODES):
            return True
        error = error.__cause__ or error.__context__
    return False


ACTIVE: Watchdog | None = None  # this process's, once it has joined a multi-process job


def start(timeout: float, coordinator: str) -> None:
    """Starts this process's watchdog; for a job of more than one process, once joined."""
    global ACTIVE
    import jax
    from jax._src import distributed  # JAX's client: its key-value store is not public API

    if jax.process_count() < 2 or ACTIVE is not None:
        return
    client = distributed.global_state.client
    ACTIVE = Watchdog(client, jax.process_index(), jax.process_count(), timeout, coordinator)
    ACTIVE.start()
