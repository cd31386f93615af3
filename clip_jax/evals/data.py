"""Evaluation data: labelled or captioned images in a fixed order, cut into global batches so that
every example is counted exactly once, whatever the number of devices and processes.

Sources (`source=` of an eval, `--dataset=` of the batch jobs):

    tfds:NAME[/CONFIG]:SPLIT   a prepared TensorFlow Datasets split (`data_dir`); labels from its
                               ClassLabel, or captions from a Text feature (coco_captions-style:
                               several captions per image)
    imagefolder:DIR            DIR/<class>/<image file>: one subfolder per class, labels in the
                               sorted order of the subfolder names
    tfrecord:GLOB              tf.train.Example shards: encoded image bytes (`image_key`) with an
                               int64 label (`label_key`), or a caption (`text_key`) and an image id
                               (`image_id_key`; records sharing an id are one image's captions)
    digits:SPLIT               the demo's handwritten digits, `train` (1,497) or `test` (300),
                               labelled, with class names; written to the cache on first use
    wds:DIR                    a dataset in CLIP_benchmark's webdataset layout (`DIR/test/0.tar
                               ...`, `classnames.txt`, `zeroshot_classification_templates.txt`,
                               `dataset_type.txt`): its test split, or the split DIR names
                               (`wds:DIR/train`); labels from `.cls`, or one image's captions
                               from the lines of its `.txt` (retrieval sets)

The global batch `k` holds examples `k*B .. (k+1)*B - 1`; each process decodes only its own rows of
each global batch (`sharding.local_rows`), the last batch is padded, and a mask marks the real
examples. An image that cannot be decoded becomes a masked row and is counted in `skipped`.
"""

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from clip_jax.data import prepare
from clip_jax.data.preprocess import Preprocess
from clip_jax.data.sources import EVAL_SOURCE_HELP, batch_rows, closed_at_exit
from clip_jax.evals import benchmark_data
from clip_jax.infra.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
CAPTION_SEPARATOR = "\x1f"  # joins an image's captions into one string inside tf.data


@dataclasses.dataclass
class EvalSource:
    """An evaluation dataset, read in one fixed order.

    `records()` gives tf.data elements `{"image": encoded bytes, "label": int64 (-1 when none),
    "captions": the image's captions joined by CAPTION_SEPARATOR ("" when none), "image_id":
    string}`; `classnames` are the label names when the data carries them (tfds ClassLabel,
    imagefolder subfolders).
    """

    name: str
    count: Callable[[], int]  # the number of examples (counted when first asked: shards are read)
    records: Callable[[], tf.data.Dataset]
    classnames: list[str] | None = None
    templates: list[str] | None = None  # prompt templates the data comes with ({c} or {})
    has_labels: bool = False
    has_captions: bool = False
    has_image_ids: bool = False  # records sharing an image id are captions of one image

    @functools.cached_property
    def num_examples(self) -> int:
        return int(self.count())


def open_source(
    spec: str,
    *,
    data_dir: str = "",
    image_key: str = "",
    label_key: str = "",
    text_key: str = "",
    image_id_key: str = "",
) -> EvalSource:
    """The source named by `spec`; empty keys mean each kind's defaults (tfds: the only Image and
    ClassLabel or Text feature; tfrecord: `jpg`, `label`, `txt`, `key`)."""
    kind, _, rest = spec.strip().partition(":")
    if kind == "imagefolder" and rest:
        return _imagefolder(rest)
    if kind == "tfrecord" and rest:
        return _tfrecord(
            rest,
            image_key or prepare.IMAGE_KEY,
            label_key or prepare.LABEL_KEY,
            text_key or prepare.TEXT_KEY,
            image_id_key or prepare.ID_KEY,
        )
    if kind == "wds" and rest:
        return EvalSource(**benchmark_data.open_benchmark_set(rest, CAPTION_SEPARATOR))
    if kind == "digits":
        from clip_jax.data import digits

        keys = (prepare.IMAGE_KEY, prepare.LABEL_KEY, prepare.TEXT_KEY, prepare.ID_KEY)
        source = _tfrecord(digits.cached_shards(rest), *keys)
        return dataclasses.replace(source, name=spec.strip(), classnames=list(digits.CLASS_NAMES))
    name, _, split = rest.partition(":")
    if kind == "tfds" and name and split:
        return _tfds(name, split, data_dir, image_key, label_key, text_key)
    raise UsageError(f"unknown evaluation source {spec!r}; {EVAL_SOURCE_HELP}")


def _record(image, label=None, captions=None, image_id=None) -> dict[str, tf.Tensor]:
    return {
        "image": image,
        "label": tf.constant(-1, tf.int64) if label is None else tf.cast(label, tf.int64),
        "captions": tf.constant("") if captions is None else captions,
        "image_id": tf.constant("") if image_id is None else image_id,
    }


def _imagefolder(directory: str) -> EvalSource:
    if not tf.io.gfile.isdir(directory):
        raise UsageError(f"imagefolder:{directory}: no such directory")
    classes = sorted(
        d.rstrip("/")
        for d in tf.io.gfile.listdir(directory)
        if tf.io.gfile.isdir(os.path.join(directory, d))
    )
    paths, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted(tf.io.gfile.listdir(os.path.join(directory, name))):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(directory, name, f))
                labels.append(label)
    if not paths:
        raise UsageError(
            f"imagefolder:{directory}: no images in class subfolders (DIR/<class>/<image>; "
            f"extensions {', '.join(IMAGE_EXTENSIONS)})"
        )

    def records() -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((paths, labels))
        return ds.map(lambda p, y: _record(tf.io.read_file(p), y, image_id=p))

    return EvalSource(
        f"imagefolder:{directory}",
        lambda: len(paths),
        records,
        classnames=[c.replace("_", " ") for c in classes],
        has_labels=True,
    )


def _tfrecord(
    pattern: str, image_key: str, label_key: str, text_key: str, image_id_key: str
) -> EvalSource:
    from clip_jax.data.readers import list_files

    files = list_files(pattern, what="the evaluation source")
    keys: set[str] = set()
    for raw in tf.data.TFRecordDataset(files[0]).take(8):
        keys |= set(tf.train.Example.FromString(raw.numpy()).features.feature)
    if image_key not in keys:
        raise UsageError(
            f"{files[0]}: records have no image feature {image_key!r} (they have "
            f"{sorted(keys)}); set image_key"
        )
    has_labels, has_captions = label_key in keys, text_key in keys
    has_ids = has_captions and image_id_key in keys  # without ids, each record is one image
    if not (has_labels or has_captions):
        raise UsageError(
            f"{files[0]}: records have neither a label {label_key!r} nor a caption {text_key!r} "
            f"(they have {sorted(keys)}); set label_key or text_key"
        )
    spec = {image_key: tf.io.FixedLenFeature([], tf.string, default_value="")}
    if has_labels:
        spec[label_key] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
    if has_captions:
        spec[text_key] = tf.io.FixedLenFeature([], tf.string, default_value="")
    if has_ids:
        spec[image_id_key] = tf.io.FixedLenFeature([], tf.string, default_value="")

    def parse(raw):
        x = tf.io.parse_single_example(raw, spec)
        return _record(
            x[image_key],
            x.get(label_key),
            x.get(text_key),
            x.get(image_id_key),
        )

    def records() -> tf.data.Dataset:
        return tf.data.TFRecordDataset(files).map(parse)

    def count() -> int:
        return int(tf.data.TFRecordDataset(files).reduce(np.int64(0), lambda n, _: n + 1))

    return EvalSource(
        f"tfrecord:{pattern}",
        count,
        records,
        has_labels=has_labels,
        has_captions=has_captions,
        has_image_ids=has_ids,
    )


def _tfds(name: str, split: str, data_dir: str, image_key: str, label_key: str, text_key: str):
    import tensorflow_datasets as tfds

    from clip_jax.data.readers import _find_feature

    label = f"tfds:{name}:{split}"
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        raise UsageError(f"{label}: tfds knows no dataset {name!r}") from None
    if not builder.is_prepared():
        raise UsageError(
            f"{label}: not prepared in {builder.data_dir}; run `tfds build {name} "
            "--data_dir=DIR` and pass data_dir=DIR"
        )
    features = builder.info.features

    def only(kind, what: str, key: str) -> str:
        found = [k for k, f in features.items() if isinstance(f, kind)]
        if len(found) != 1:
            raise UsageError(
                f"{label}: {len(found)} {what} features ({found}) and none named by {key}; "
                f"set {key} (features: {sorted(features)})"
            )
        return found[0]

    image_key = image_key or "image"
    if not isinstance(_find_feature(features, image_key), tfds.features.Image):
        image_key = only(tfds.features.Image, "image", "image_key")
    text_key = text_key or ("captions/text" if "captions" in features else "caption")
    label_key = label_key or "label"
    text = _find_feature(features, text_key)
    classnames, label_feature = None, None
    if not isinstance(text, tfds.features.Text):
        text_key = ""
        if isinstance(_find_feature(features, label_key), tfds.features.ClassLabel):
            label_feature = label_key
        else:
            label_feature = only(tfds.features.ClassLabel, "ClassLabel", "label_key or text_key")
        classnames = [n.replace("_", " ") for n in _find_feature(features, label_feature).names]
    try:
        num_examples = int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError) as e:
        raise UsageError(f"{label}: {str(e).splitlines()[0]}") from None

    def at(example: dict, path: str) -> tf.Tensor:
        for part in path.split("/"):
            example = example[part]
        return example

    def select(example: dict) -> dict:
        if label_feature is not None:
            return _record(example[image_key], at(example, label_feature))
        captions = tf.strings.reduce_join(
            tf.reshape(at(example, text_key), [-1]), separator=CAPTION_SEPARATOR
        )
        return _record(example[image_key], captions=captions)

    def records() -> tf.data.Dataset:
        ds = builder.as_dataset(
            split=split,
            shuffle_files=False,
            decoders={image_key: tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(try_autocache=False, interleave_cycle_length=1),
        )
        return ds.map(select)

    return EvalSource(
        label,
        lambda: num_examples,
        records,
        classnames=classnames,
        has_labels=label_feature is not None,
        has_captions=label_feature is None,
    )


def num_batches(num_examples: int, global_batch: int) -> int:
    return -(-num_examples // global_batch)


def batches(
    source: EvalSource,
    *,
    preprocess: Preprocess,
    global_batch: int,
    rows: np.ndarray | slice,
    tokenize_fn: Callable[[list[str]], np.ndarray] | None = None,
    max_captions: int = 0,
    start: int = 0,
    stats: dict[str, int] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's `rows` of global batches `start, start+1, ...`, every one of them.

    `rows` are this process's row indices within a global batch, ascending
    (`sharding.local_rows`), or a slice of them. Yields numpy dicts of `n = len(rows)` rows:
    `image` uint8 [n, S, S, 3] (`preprocess.decode`: open_clip's evaluation pixels),
    `mask` bool [n] (real, decodable examples),
    `index` int32 [n] (global position), `label` int32 [n] (-1 when none) and, with `tokenize_fn`,
    `tokens` int32 [n, max_captions, L] and `num_captions` int32 [n] (captions past
    `max_captions` are dropped and counted in `stats["dropped_captions"]`). Undecodable images
    are counted in `stats["skipped"]`.
    """
    stream = _batches(
        source,
        preprocess=preprocess,
        global_batch=global_batch,
        rows=rows,
        tokenize_fn=tokenize_fn,
        max_captions=max_captions,
        start=start,
        stats=stats,
    )
    return closed_at_exit(stream)


def _batches(
    source: EvalSource,
    *,
    preprocess: Preprocess,
    global_batch: int,
    rows: np.ndarray | slice,
    tokenize_fn: Callable[[list[str]], np.ndarray] | None,
    max_captions: int,
    start: int,
    stats: dict[str, int] | None,
) -> Iterator[dict[str, np.ndarray]]:
    rows = batch_rows(rows, global_batch)
    n, image_size = len(rows), preprocess.size
    total = num_batches(source.num_examples, global_batch)
    held = np.zeros(global_batch, bool)
    held[rows] = True
    held_table = tf.constant(held)
    stats = stats if stats is not None else {}
    stats.setdefault("skipped", 0)
    stats.setdefault("dropped_captions", 0)

    def mine(i, _):
        return tf.gather(held_table, i % global_batch)

    def decode(i, x):
        image = tf.numpy_function(preprocess.decode, [x["image"]], tf.uint8, stateful=False)
        image.set_shape([image_size, image_size, 3])
        out = {
            "index": i,
            "image": image,
            "label": x["label"],
            "captions": x["captions"],
        }
        if source.has_image_ids:  # a 62-bit hash of the id as two int32 halves (no x64 on device)
            h = tf.strings.to_hash_bucket_fast(x["image_id"], 2**62)
            out["image_key"] = tf.stack([h // 2**31, h % 2**31])
        return out

    ds = source.records().skip(start * global_batch)
    ds = tf.data.Dataset.zip(
        tf.data.Dataset.range(start * global_batch, source.num_examples), ds
    ).filter(mine)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()  # undecodable images; their rows stay masked and are counted
    options = tf.data.Options()
    options.deterministic = True
    stream = ds.batch(max(n, 1)).with_options(options).prefetch(2).as_numpy_iterator()
    pending: dict[str, np.ndarray] | None = None

    for k in range(start, total):
        index = k * global_batch + rows  # ascending, as the records arrive
        present = int((index < source.num_examples).sum())
        out = {
            "image": np.zeros((n, image_size, image_size, 3), np.uint8),
            "mask": np.zeros((n,), bool),
            "index": index.astype(np.int32),
            "label": np.full((n,), -1, np.int32),
        }
        if source.has_image_ids:
            out["image_key"] = np.zeros((n, 2), np.int32)
        captions = [""] * n
        while present:
            if pending is None or not len(pending["index"]):
                pending = next(stream, None)
                if pending is None:
                    break
            take = pending["index"] <= index[-1]
            if not take.any():
                break
            slots = np.searchsorted(index, pending["index"][take])
            out["image"][slots] = pending["image"][take]
            out["label"][slots] = pending["label"][take]
            out["mask"][slots] = True
            if source.has_image_ids:
                out["image_key"][slots] = pending["image_key"][take]
            for s, c in zip(slots, pending["captions"][take], strict=True):
                captions[s] = c.decode("utf-8")
            pending = {key: v[~take] for key, v in pending.items()}
        stats["skipped"] += present - int(out["mask"].sum())
        if tokenize_fn is not None:
            out["tokens"], out["num_captions"] = _tokenize(
                captions, out["mask"], tokenize_fn, max_captions, stats
            )
        yield out


def _tokenize(
    captions: list[str], mask: np.ndarray, tokenize_fn, max_captions: int, stats: dict
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's captions -> tokens [n, max_captions, L] and their count [n]."""
    split = [
        c.split(CAPTION_SEPARATOR) if c and m else [] for c, m in zip(captions, mask, strict=True)
    ]
    counts = np.array([min(len(s), max_captions) for s in split], np.int32)
    stats["dropped_captions"] += sum(max(0, len(s) - max_captions) for s in split)
    flat = [c for s in split for c in s[:max_captions]]
    length = int(np.asarray(tokenize_fn(["x"])).shape[-1])
    tokens = np.zeros((len(captions), max_captions, length), np.int32)
    if flat:
        encoded = np.asarray(tokenize_fn(flat), np.int32)
        rows = np.repeat(np.arange(len(captions)), counts)
        cols = np.concatenate([np.arange(c) for c in counts]) if len(counts) else counts
        tokens[rows, cols] = encoded
    return tokens, counts
