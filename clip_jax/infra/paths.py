"""One path layer for everything a run reads and writes: etils.epath, which orbax uses too.

The workdir and everything in it (config.json, metrics.jsonl, TensorBoard events, checkpoints,
eval results, feature caches, curves.png) and exported weights may live on a local disk or an
object store (`gs://bucket/run`, `s3://...`); code that touches them goes through `path()` and
never through `open` / `os.path`. Object stores have no append and no rename of a file that is
being written: `write_text` writes a file whole, and an `Appender` rewrites a whole object when
it flushes.
"""

import math
import os
import re
import time
import uuid

from etils import epath

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def path(p: "str | os.PathLike") -> epath.Path:
    """`p` as an epath.Path (local paths made absolute, so orbax and the logs agree)."""
    p = str(os.fspath(p))
    return epath.Path(p if is_remote(p) else os.path.abspath(p))


def is_remote(p: "str | os.PathLike") -> bool:
    """Whether `p` names an object store (`scheme://...`) rather than a local file."""
    return bool(_URI.match(str(os.fspath(p))))


def write_text(p: "str | os.PathLike", text: str) -> None:
    """Writes `text` to `p` whole or not at all: a local file through a temporary file and a
    rename; an object store's upload is atomic already."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(target):
        target.write_text(text)
        return
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(text)
    tmp.replace(target)


class Appender:
    """A file that is only ever appended to, on a local disk or an object store: metrics.jsonl,
    the process logs and TensorBoard's event files all write through one.

    Locally each `write` reaches the file at once (appended, flushed). An object store cannot
    append: the appender keeps what the object held when the first write came and everything
    written since, and rewrites the whole object at `flush` and `close` and, with `rewrite_secs`,
    at a `write` that many seconds after the last rewrite (the first write shows at once). It has
    no `fileno`, so that writers do not try to fsync it.

    Args:
      p: the file.
      binary: bytes (TensorBoard's events) instead of text.
      rewrite_secs: on an object store, also rewrite at a write this long after the last
        rewrite; None: only at `flush` and `close`.
      remote: whether `p` is on an object store (None: from its scheme).
    """

    def __init__(
        self,
        p: "str | os.PathLike",
        *,
        binary: bool = False,
        rewrite_secs: float | None = None,
        remote: bool | None = None,
    ):
        self.path = path(p)
        self.remote = is_remote(self.path) if remote is None else remote
        self._binary, self._rewrite_secs = binary, rewrite_secs
        self._stream = None  # a local file, appended to
        self._parts: list | None = None  # an object's whole content, once the first write came
        self._dirty = False
        self._rewritten_at = -math.inf
        self.closed = False

    def write(self, data: "str | bytes") -> int:
        if not self.remote:
            if self._stream is None:
                self._stream = self.path.open("ab" if self._binary else "a")
            self._stream.write(data)
            self._stream.flush()
            return len(data)
        if self._parts is None:  # what the object already holds (a resumed run's log)
            held = self.path.exists()
            if self._binary:
                self._parts = [self.path.read_bytes()] if held else []
            else:
                self._parts = [self.path.read_text()] if held else []
        self._parts.append(bytes(data) if self._binary else data)
        self._dirty = True
        due = self._rewrite_secs is not None
        if due and time.monotonic() - self._rewritten_at >= self._rewrite_secs:
            self.flush()
        return len(data)

    def flush(self) -> None:
        """Makes everything written so far visible in the file."""
        if self._dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._binary:
                self.path.write_bytes(b"".join(self._parts))
            else:
                self.path.write_text("".join(self._parts))
            self._dirty = False
            self._rewritten_at = time.monotonic()

    def close(self) -> None:
        if self.closed:
            return
        self.flush()
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self.closed = True


class _TensorBoardFactory:
    """tensorboardX's writer factory for object-store schemes, through this layer."""

    def open(self, p: str) -> Appender:
        return Appender(p, binary=True)

    def directory_check(self, p: str) -> None:
        path(p).mkdir(parents=True, exist_ok=True)


def register_tensorboard_schemes() -> None:
    """Makes tensorboardX write `gs://`, `s3://`, ... event files through this layer (its own
    gs:// writer needs google-cloud-storage and credentials of its own)."""
    from tensorboardX import record_writer

    for scheme in ("gs", "s3", "az", "hf"):
        record_writer.register_writer_factory(scheme, _TensorBoardFactory())
