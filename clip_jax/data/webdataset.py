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


def samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of the shard at `path`, in order: (key, {field: bytes}).

    A shard that cannot be opened or ends early is logged; its samples before the fault are
    given, then one empty sample stands for what was lost.
    """
    key, fields = None, {}
    try:
        with (
            paths.path(path).open("rb") as f,
            tarfile.open(fileobj=f, mode="r|", bufsize=READ_BUFFER) as tar,
        ):
            for member in tar:
                if not member.isfile():
                    continue
                k, field = split_name(member.name)
                if not k or k.rpartition("/")[2].startswith("__"):  # no key, or metadata
                    continue
                if k != key:
                    if key is not None:
                        yield key, fields
                    key, fields = k, {}
                if field in fields or member.size > MAX_MEMBER_BYTES:
                    continue
                data = tar.extractfile(member)
                fields[field] = data.read() if data is not None else b""
    except (OSError, tarfile.TarError, EOFError) as e:
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
    """The number of samples in a shard (headers only where the shard is local and seekable)."""
    n, key = 0, None
    try:
        with paths.path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                k, _ = split_name(member.name) if member.isfile() else ("", "")
                if k and not k.rpartition("/")[2].startswith("__") and k != key:
                    n, key = n + 1, k
    except (OSError, tarfile.TarError, EOFError) as e:
        logging.warning("%s: unreadable after %d samples (%s)", path, n, e)
        n += 1  # the empty sample `samples` gives for the loss
    return n
