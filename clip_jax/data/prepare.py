"""Images with captions -> sharded TFRecords in img2dataset's layout (what `tfrecord:GLOB` reads).

    python -m clip_jax.data.prepare --input DIR_OR_CSV --output OUTDIR [--shard_size N]
        [--image_size S] [--workers W] [--allow_outside_paths]

The input is a folder of images, each with a sidecar caption file of the same stem (`a/b.jpg` and
`a/b.txt`), searched recursively; or a CSV / TSV (by extension: .tsv and .tab are tab-separated)
of `path,caption` rows, paths relative to the file, with an optional header naming the columns.
A table's paths must lie inside its folder once resolved (`..` and symbolic links followed): a
table from elsewhere cannot make this read any file it names. Rows outside are skipped and
counted, unless `--allow_outside_paths`.
Each record is a tf.train.Example with bytes features `jpg` (JPEG bytes: JPEG files are kept
as they are, other formats re-encoded; with --image_size the shorter side is resized to S and
the image re-encoded), `txt` (the caption, UTF-8) and `key`. Records keep the input's order in
shards `OUTDIR/part-00000.tfrecord`, ...; counts go to stdout and `OUTDIR/stats.json`.

An unreadable image, one of more pixels than PIL's `Image.MAX_IMAGE_PIXELS` (89.5 M, as
training's default limit; not decoded), a missing file, a path outside the table's folder, a
missing or empty caption: the item is skipped and counted with its reason. Captions that are not
valid UTF-8 are repaired (invalid bytes become U+FFFD) and counted. Bad arguments end with one
error line and exit status 2.
"""

import collections
import concurrent.futures
import csv
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator

from absl import flags
from PIL import Image

from clip_jax.infra import cli
from clip_jax.infra.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PATH_COLUMNS = ("path", "image", "image_path", "filepath", "file", "filename", "jpg")
CAPTION_COLUMNS = ("caption", "text", "txt", "title", "label")
JPEG_QUALITY = 95
CHUNK = 256  # items in flight at once
# The features of the records written here, as img2dataset names them.
IMAGE_KEY, TEXT_KEY, ID_KEY, LABEL_KEY = "jpg", "txt", "key", "label"
OUTSIDE = "outside the table's folder"


def make_example(image: bytes, caption: str, key: str, label: int | None = None) -> bytes:
    """One serialized tf.train.Example: `jpg`, `txt`, `key` bytes (and `label` int64)."""
    import tensorflow as tf

    def as_bytes(v: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    features = {
        IMAGE_KEY: as_bytes(image),
        TEXT_KEY: as_bytes(caption.encode()),
        ID_KEY: as_bytes(key.encode()),
    }
    if label is not None:
        features[LABEL_KEY] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


class ShardWriter:
    """Writes serialized records to `DIR/PREFIX-00000.tfrecord`, ... of `shard_size` each."""

    def __init__(self, directory: str, prefix: str = "part", shard_size: int = 10_000):
        import tensorflow as tf

        self._tf, self.directory, self.prefix = tf, directory, prefix
        self.shard_size, self.count, self.paths = shard_size, 0, []
        self._file = None

    def write(self, record: bytes) -> None:
        if self.count % self.shard_size == 0:
            self.close()
            path = os.path.join(self.directory, f"{self.prefix}-{len(self.paths):05d}.tfrecord")
            self._file = self._tf.io.TFRecordWriter(path)
            self.paths.append(path)
        self._file.write(record)
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _AboveLimit(ValueError):
    """An image declaring more than PIL's MAX_IMAGE_PIXELS pixels (its own skip reason)."""


def to_jpeg(data: bytes, image_size: int = 0) -> bytes:
    """Encoded image bytes -> JPEG bytes: a JPEG kept as is unless resized (shorter side to
    `image_size`, if > 0); raises ValueError when the bytes are not a readable image or declare
    more than PIL's `Image.MAX_IMAGE_PIXELS` (checked on the header, before decoding)."""
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            limit = Image.MAX_IMAGE_PIXELS  # None: no limit
            if limit is not None and im.width * im.height > limit:
                raise _AboveLimit("image above the pixel limit")
            im.load()  # decodes everything: catches truncated files
            if im.format == "JPEG" and im.mode in ("RGB", "L") and not image_size:
                return data
            if im.mode in ("RGBA", "LA", "P", "PA"):  # transparent pixels onto white
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            im = im.convert("RGB")
    except (_AboveLimit, Image.DecompressionBombError):  # ours, or PIL's own at twice the limit
        raise _AboveLimit("image above the pixel limit") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"unreadable image ({type(e).__name__})") from None
    if image_size:
        w, h = im.size
        scale = image_size / min(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def decode_caption(raw: bytes) -> tuple[str, bool]:
    """Caption bytes -> (stripped text, whether invalid UTF-8 had to be replaced)."""
    try:
        return raw.decode("utf-8").strip(), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace").strip(), True


# An item: (image path, caption bytes or None, caption file path or None).
Item = tuple[str, bytes | None, str | None]


def folder_items(root: str) -> list[Item]:
    """Images under `root` (recursively, sorted) with the paths of their sidecar captions."""
    items = []
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS:
                items.append(
                    (os.path.join(directory, name), None, os.path.join(directory, stem + ".txt"))
                )
    if not items:
        raise UsageError(f"--input {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return items


def table_items(path: str) -> list[Item]:
    """Rows of a CSV / TSV of path,caption (paths relative to the file)."""
    delimiter = "\t" if path.lower().endswith((".tsv", ".tab")) else ","
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter) if r]
    if not rows:
        raise UsageError(f"--input {path}: the table is empty")
    header = [c.strip().lower() for c in rows[0]]
    path_col, caption_col = 0, 1
    if any(c in PATH_COLUMNS for c in header) and any(c in CAPTION_COLUMNS for c in header):
        path_col = next(i for i, c in enumerate(header) if c in PATH_COLUMNS)
        caption_col = next(i for i, c in enumerate(header) if c in CAPTION_COLUMNS)
        rows = rows[1:]
    elif len(header) < 2:
        raise UsageError(f"--input {path}: expected rows of path{delimiter}caption")
    items = []
    for row in rows:
        image = row[path_col] if len(row) > path_col else ""
        caption = row[caption_col] if len(row) > caption_col else ""
        raw = caption.encode("utf-8", errors="surrogateescape")
        items.append((os.path.join(base, image.strip()) if image.strip() else "", raw, None))
    return items


def inside(path: str, root: str) -> bool:
    """Whether `path` lies in the folder `root` once both are resolved (`..`, symbolic links)."""
    root = os.path.realpath(root)
    return os.path.commonpath([os.path.realpath(path), root]) == root


def convert_item(
    item: Item, image_size: int, root: str | None = None
) -> tuple[bytes | None, bool, str]:
    """One item -> (JPEG bytes or None, caption repaired?, caption text or the skip reason);
    with `root`, an image path outside that folder is skipped without being opened."""
    image_path, raw_caption, caption_path = item
    if root is not None and image_path and not inside(image_path, root):
        return None, False, OUTSIDE
    if raw_caption is None:
        if not os.path.isfile(caption_path):
            return None, False, "no caption file"
        with open(caption_path, "rb") as f:
            raw_caption = f.read()
    caption, repaired = decode_caption(raw_caption)
    if not caption:
        return None, False, "empty caption"
    if not image_path or not os.path.isfile(image_path):
        return None, False, "missing image file"
    with open(image_path, "rb") as f:
        data = f.read()
    try:
        return to_jpeg(data, image_size), repaired, caption
    except ValueError as e:
        return None, False, str(e)


def _progress(total: int) -> Callable[[int, bool], None]:
    """A single-line progress report on stderr, refreshed at most 5 times a second."""
    start, last = time.perf_counter(), [0.0]

    def show(done: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - last[0] < 0.2:
            return
        last[0] = now
        rate = done / max(now - start, 1e-9)
        pct = 100.0 * done / max(total, 1)
        end = "\n" if final else ""
        print(
            f"\rprepare: {done}/{total} items ({pct:5.1f}%), {rate:.0f}/s", end=end, file=sys.stderr
        )

    return show


def _converted(items: list[Item], image_size: int, workers: int, root: str | None) -> Iterator:
    """`convert_item` over `items` in threads (PIL releases the GIL), in input order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for i in range(0, len(items), CHUNK):
            chunk = items[i : i + CHUNK]
            yield from pool.map(lambda it: convert_item(it, image_size, root), chunk)


def prepare(
    items: Iterable[Item],
    output: str,
    *,
    shard_size: int = 10_000,
    image_size: int = 0,
    workers: int = 8,
    root: str | None = None,
) -> dict:
    """Writes `items` as shards in `output`; returns the counts (also in `output/stats.json`).

    With `root`, items whose image lies outside that folder are skipped and counted.
    """
    import tensorflow as tf

    items = list(items)
    tf.io.gfile.makedirs(output)
    if tf.io.gfile.glob(os.path.join(output, "*.tfrecord")):
        raise UsageError(
            f"--output {output} already holds .tfrecord shards; use an empty directory"
        )
    skipped: collections.Counter = collections.Counter()
    repaired = 0
    show = _progress(len(items))
    with ShardWriter(output, "part", shard_size) as writer:
        converted = _converted(items, image_size, workers, root)
        for done, (jpeg, fixed, text) in enumerate(converted, 1):
            if jpeg is None:
                skipped[text] += 1
            else:
                writer.write(make_example(jpeg, text, f"{writer.count:09d}"))
                repaired += fixed
            show(done)
        show(len(items), final=True)
    stats = {
        "written": writer.count,
        "skipped": sum(skipped.values()),
        "skipped_reasons": dict(sorted(skipped.items())),
        "repaired_captions": repaired,
        "shards": len(writer.paths),
    }
    with tf.io.gfile.GFile(os.path.join(output, "stats.json"), "w") as f:
        f.write(json.dumps(stats, indent=1) + "\n")
    return stats


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "input", None, "A folder of images with caption files, or a CSV/TSV.", flag_values=fv
    )
    flags.DEFINE_string("output", None, "The folder to write the shards to.", flag_values=fv)
    flags.DEFINE_integer("shard_size", 10_000, "Records per shard.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer(
        "image_size", 0, "Resize the shorter side to this (0: keep).", lower_bound=0, flag_values=fv
    )
    flags.DEFINE_integer(
        "workers", min(32, os.cpu_count() or 1), "Images converted at once.", 1, flag_values=fv
    )
    flags.DEFINE_bool(
        "allow_outside_paths",
        False,
        "Let a CSV/TSV name images outside its own folder (absolute paths, ../, symbolic links): "
        "only for a table you trust.",
        flag_values=fv,
    )
    flags.mark_flag_as_required("input", flag_values=fv)
    flags.mark_flag_as_required("output", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
    if args:
        raise UsageError(f"unexpected arguments: {' '.join(args)} (flags start with --)")
    source, root = fv.input, None
    if os.path.isdir(source):
        items = folder_items(source)
    elif os.path.isfile(source):
        items = table_items(source)
        root = None if fv.allow_outside_paths else os.path.dirname(os.path.abspath(source))
    else:
        raise UsageError(f"--input {source} does not exist")
    stats = prepare(
        items,
        fv.output,
        shard_size=fv.shard_size,
        image_size=fv.image_size,
        workers=fv.workers,
        root=root,
    )
    reasons = ", ".join(f"{k}: {v}" for k, v in stats["skipped_reasons"].items()) or "none"
    print(f"wrote {stats['written']} examples in {stats['shards']} shards to {fv.output}")
    print(
        f"skipped {stats['skipped']} ({reasons}); repaired captions: {stats['repaired_captions']}"
    )
    if stats["skipped_reasons"].get(OUTSIDE):
        print(
            f"{stats['skipped_reasons'][OUTSIDE]} paths outside {root} were not read; "
            "--allow_outside_paths reads them (only for a table you trust)"
        )
    if not stats["written"]:
        raise UsageError("no usable image-caption pair in the input")
    return 0


def main(argv: list[str]) -> int:
    """`python -m clip_jax.data.prepare --input DIR_OR_CSV --output OUTDIR ...` -> exit status."""
    return cli.run_tool(argv, define_flags, run, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
