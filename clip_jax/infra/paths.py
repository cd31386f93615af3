"""One path layer for everything a run reads and writes: etils.epath, which orbax uses too.

The workdir and everything in it (config.json, metrics.jsonl, TensorBoard events, checkpoints,
eval results, feature caches, curves.png) and exported weights may live on a local disk or an
object store (`gs://bucket/run`, `s3://...`); code that touches them goes through `path()` and
never through `open` / `os.path`. Object stores have no append and no rename of a file that is
being written, so the writers here rewrite a whole object when they flush.
"""

import os
import re
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


class RewritingFile:
    """A binary file on an object store that is only ever appended to: the bytes are kept and
    the whole object is rewritten at each `flush` (what TensorBoard event files need there).
    It has no `fileno`, so that writers do not try to fsync it."""

    def __init__(self, p: str):
        self._path = path(p)
        self._buffer = bytearray()
        self._dirty = False
        self.closed = False

    def write(self, data) -> int:
        self._buffer += bytes(data)
        self._dirty = True
        return len(data)

    def flush(self) -> None:
        if self._dirty:
            self._path.write_bytes(bytes(self._buffer))
            self._dirty = False

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


class _TensorBoardFactory:
    """tensorboardX's writer factory for object-store schemes, through this layer."""

    def open(self, p: str) -> RewritingFile:
        return RewritingFile(p)

    def directory_check(self, p: str) -> None:
        path(p).mkdir(parents=True, exist_ok=True)


def register_tensorboard_schemes() -> None:
    """Makes tensorboardX write `gs://`, `s3://`, ... event files through this layer (its own
    gs:// writer needs google-cloud-storage and credentials of its own)."""
    from tensorboardX import record_writer

    for scheme in ("gs", "s3", "az", "hf"):
        record_writer.register_writer_factory(scheme, _TensorBoardFactory())
