"""One run per workdir: two runs writing the same checkpoints and metrics race (orbax's temporary
directories, metrics.jsonl), so a training run holds `workdir/lock.json` while it lives.

Local disks: an exclusive `flock` on the file, which the kernel releases when the process dies,
however it dies. Object stores (no locks): a lease, the file naming the owner (host, pid) and
when the lease expires, renewed by a thread; a lease left by a run that died expires after
`LEASE_SECONDS` and is then taken over. Process 0 holds it for all the processes of a run.
"""

import json
import os
import socket
import threading
import time

from clip_jax.infra import paths
from clip_jax.infra.errors import UsageError

LOCK_FILE = "lock.json"
LEASE_SECONDS = 120.0  # renewed every 40 s; a relaunch after a hard kill waits at most this


class WorkdirLockedError(UsageError):
    """Another live run holds the workdir."""


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}


def _describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"host {owner.get('host', '?')} pid {owner.get('pid', '?')} (since {started})"


class RunLock:
    """Holds `workdir/lock.json` from `acquire` to `release` (or the process's end)."""

    def __init__(self, workdir: str, lease_seconds: float = LEASE_SECONDS):
        self.path = paths.path(workdir) / LOCK_FILE
        self.lease_seconds = lease_seconds
        self._file = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._owner = _owner()

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if paths.is_remote(self.path):
            self._take_lease()
        else:
            self._flock()
        return self

    def release(self) -> None:
        if self._renewer is not None:
            self._stop.set()
            self._renewer.join()
            self._renewer = None
            if self._read() == self._lease():  # still ours: hand it back
                self.path.unlink(missing_ok=True)
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # --- Local disks ----------------------------------------------------------------------------
    def _flock(self) -> None:
        import fcntl

        f = open(self.path, "a+")  # noqa: SIM115 - held open for the run's whole life
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = _describe(json.loads(f.read() or "{}"))
            except json.JSONDecodeError:
                holder = "another process"
            f.close()
            raise WorkdirLockedError(
                f"{self.path.parent} is in use by another run ({holder}): stop it, or give "
                "another --workdir"
            ) from None
        except OSError as e:  # a filesystem without file locks (some NFS, Lustre mounts)
            from absl import logging

            logging.warning(
                "%s: the filesystem takes no file locks (%s): running without the workdir lock",
                self.path.parent,
                e.strerror or e,
            )
        f.seek(0)
        f.truncate()
        f.write(json.dumps(self._owner))
        f.flush()
        self._file = f

    # --- Object stores --------------------------------------------------------------------------
    def _lease(self) -> dict:
        return {**self._owner, "expires": self._expires}

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _take_lease(self) -> None:
        held = self._read()
        if held is not None and held.get("expires", 0) > time.time():
            until = time.strftime("%H:%M:%S", time.localtime(held["expires"]))
            raise WorkdirLockedError(
                f"{self.path.parent} is in use by another run ({_describe(held)}; its lease in "
                f"{self.path} runs until {until}): stop it, or give another --workdir"
            )
        if held is not None:
            from absl import logging

            logging.warning(
                "%s: taking over the expired lease of %s", self.path.parent, _describe(held)
            )
        self._expires = time.time() + self.lease_seconds
        paths.write_text(self.path, json.dumps(self._lease()))
        if self._read() != self._lease():  # another run wrote at the same moment
            raise WorkdirLockedError(f"{self.path.parent} was taken by another run just now")
        self._renewer = threading.Thread(target=self._renew, daemon=True, name="workdir lease")
        self._renewer.start()

    def _renew(self) -> None:
        from absl import logging

        while not self._stop.wait(self.lease_seconds / 3):
            try:
                held = self._read()
                if held is not None and held != self._lease():
                    logging.error(
                        "%s: the workdir's lease was taken by %s while this run held it",
                        self.path.parent,
                        _describe(held),
                    )
                    return
                self._expires = time.time() + self.lease_seconds
                paths.write_text(self.path, json.dumps(self._lease()))
            except Exception as e:  # noqa: BLE001 - a passing store error: retry at the next turn
                logging.warning("%s: could not renew the workdir's lease: %s", self.path, e)


def lock_workdir(workdir: str) -> RunLock | None:
    """Process 0 takes the workdir's lock; every process stops if it could not."""
    import jax
    import numpy as np

    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = RunLock(workdir).acquire()
        except WorkdirLockedError as e:
            error = e
        except OSError as e:  # a file of that name, no permission, a read-only filesystem
            where = paths.path(workdir)
            error = UsageError(
                f"--workdir={workdir} is a file, not a directory"
                if where.exists() and not where.is_dir()
                else f"cannot write the workdir {workdir}: {e.strerror or e}"
            )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if failed and error is None:
            error = UsageError(f"process 0 could not take the workdir {workdir} (its log says why)")
    if error is not None:
        raise error
    return lock
