"""webdataset shards: tar files whose members are grouped into samples by key, without TensorFlow.

The layout img2dataset, DataComp and CLIP_benchmark write: a sample is the run of consecutive
members sharing a key, the member's path up to the first dot of its file name
(`000/12.jpg`, `000/12.txt` and `000/12.json` are the sample `000/12` with the fields `jpg`,
`txt` and `json`). Field names are lower-cased; later members of a sample with the same field
are ignored, as webdataset does.

Training reads an image (`IMAGE_FIELDS`, the first present) and a caption: the `txt` field, else
the `caption` of the `json` field. Evaluation sets in CLIP_benchmark's layout add `cls` (the
label, a decimal integer) and `txt` with one caption per line (retrieval).

A shard may be local or on an object store (through `clip_jax.infra.paths`). A shard that ends
early (a partial upload) gives the samples before the cut and then one empty sample, so that the
loss is counted with the other bad records; members larger than `MAX_MEMBER_BYTES` are not read
(their field is left out, so the sample is skipped and counted downstream).
"""

import json
import re
import tarfile
from collections.abc import Iterator

from absl import logging

from clip_jax.infra import paths

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
MAX_MEMBER_BYTES = 256 << 20  # larger members are not read: no sane image or caption is this big
READ_BUFFER = 4 << 20  # bytes read at a time from a shard (large reads suit object stores)
BLOCK = 512  # tar's block
ZERO_BLOCK = bytes(BLOCK)
_NUMBER = re.compile(r"(\d+)")


def natural_key(name: str) -> list:
    """A sort key that orders `9.tar` before `10.tar` (CLIP_benchmark numbers its shards)."""
    return [int(part) if part.isdigit() else part for part in _NUMBER.split(name)]


def split_name(name: str) -> tuple[str, str]:
    """A member's path -> (key, field): everything up to the first dot of the file name, and the
    rest, lower-cased ("a/b.seg.PNG" -> ("a/b", "seg.png")); ("", "") for a name without a dot."""
    directory, _, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    if not dot or not stem:
        return "", ""
    return (f"{directory}/{stem}" if directory else stem), field.lower()


def _octal(field: bytes) -> int:
    """A tar header's numeric field: octal digits, or GNU's base-256 for large values."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("LEN path=NAME\n" records), if any."""
    while data:
        length, _, rest = data.partition(b" ")
        n = int(length)
        key, _, value = rest[: n - len(length) - 2].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        data = data[n:]
    return None


def members(f, read: bool = True) -> Iterator[tuple[str, int, bytes | None]]:
    """The regular files of a tar stream `f`, in order: (name, size, data); data is None for a
    member larger than `MAX_MEMBER_BYTES`, or for all of them when not `read` (skipped: a seek
    where the file can). ustar, GNU long names and pax paths; raises `tarfile.ReadError` on a
    damaged header, EOFError on a stream cut short.

    Written for speed: tarfile's generic reader costs about 0.4 ms a sample, as much as
    decoding a small JPEG, and holds Python's lock while it does."""
    long_name = None
    while True:
        header = f.read(BLOCK)
        if len(header) < BLOCK:
            if header:
                raise EOFError("a tar header cut short")
            return
        if header == ZERO_BLOCK:  # the end-of-archive marker
            return
        stored = _octal(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise tarfile.ReadError("bad tar header checksum")
        size, kind = _octal(header[124:136]), header[156:157]
        padded = -(-size // BLOCK) * BLOCK
        if kind in (b"L", b"x"):  # GNU long name, pax header: the next member's name
            data = f.read(padded)
            if len(data) < padded:
                raise EOFError("a tar member cut short")
            name = (
                data[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if kind == b"L"
                else _pax_path(data[:size])
            )
            long_name = name or long_name
            continue
        name = long_name
        long_name = None
        if name is None:
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        if kind not in (b"0", b"\0", b"7") or size > MAX_MEMBER_BYTES or not read:
            _skip(f, padded)
            if kind in (b"0", b"\0", b"7"):
                yield name, size, None
            continue
        data = f.read(padded)
        if len(data) < padded:
            raise EOFError("a tar member cut short")
        yield name, size, data[:size]


def _skip(f, n: int) -> None:
    """Moves `n` bytes on: a seek where the file can, reads otherwise."""
    try:
        f.seek(n, 1)
    except (OSError, AttributeError, ValueError):
        while n > 0:
            chunk = f.read(min(n, READ_BUFFER))
            if not chunk:
                raise EOFError("a tar member cut short") from None
            n -= len(chunk)


def _open(path: str):
    """A local shard through Python's own buffered file; an object store's through the path
    layer."""
    if paths.is_remote(path):
        return paths.path(path).open("rb")
    return open(path, "rb", buffering=READ_BUFFER)  # noqa: SIM115 (closed by the caller)


def samples(path: str, read: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of the shard at `path`, in order: (key, {field: bytes}); with `read=False`,
    the keys alone, fields empty (`members` skips the data).

    A shard that cannot be opened or ends early is logged; its samples before the fault are
    given, then one empty sample stands for what was lost.
    """
    key, fields = None, {}
    try:
        with _open(path) as f:
            for name, _, data in members(f, read):
                k, field = split_name(name)
                if not k or k.rpartition("/")[2].startswith("__"):  # no key, or metadata
                    continue
                if k != key:
                    if key is not None:
                        yield key, fields
                    key, fields = k, {}
                if field not in fields and data is not None:
                    fields[field] = data
    except (OSError, tarfile.TarError, EOFError, ValueError) as e:
        logging.warning("%s: unreadable from sample %s on (%s); skipping the rest", path, key, e)
        if key is not None:
            yield key, fields
        yield "", {}  # what was lost counts as one bad record
        return
    if key is not None:
        yield key, fields


def image_of(fields: dict[str, bytes]) -> bytes:
    """The encoded image of a sample (b"" when it has none)."""
    for name in IMAGE_FIELDS:
        if name in fields:
            return fields[name]
    return b""


def caption_of(fields: dict[str, bytes]) -> bytes:
    """A sample's caption: its `txt` field, else the `caption` of its `json` (b"" when neither)."""
    if "txt" in fields:
        return fields["txt"]
    try:
        caption = json.loads(fields.get("json", b"")).get("caption")
    except (ValueError, AttributeError):  # not JSON, or not an object
        return b""
    return caption.encode("utf-8") if isinstance(caption, str) else b""


def label_of(fields: dict[str, bytes]) -> int:
    """A sample's class (`cls`, a decimal integer); -1 when it has none or it is not a number."""
    try:
        return int(fields.get("cls", b"").decode("ascii").strip())
    except (ValueError, UnicodeDecodeError):
        return -1


def count(path: str) -> int:
    """The number of samples `samples` gives for a shard, from its headers alone (a local
    shard's data is skipped by seeking)."""
    return sum(1 for _ in samples(path, read=False))
