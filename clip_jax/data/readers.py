"""Readers: where raw records come from, in a seeded order, one epoch at a time.

A reader gives this process's share of the data and knows nothing of decoding, batching or
resuming (`tfdata.TFDataSource` does those). Its interface:
- `name`: how messages name it (the source string).
- `epoch(e)`: a tf.data.Dataset of raw records, this process's share of epoch `e` (an int64
  scalar tensor) in an order that is a pure function of the seed and `e`; every element is a dict
  of tensors with the same structure.
- `parse(raw, seed)`: one raw record -> (encoded image bytes, caption), both tf.string scalars,
  inside the graph; `seed` (int64 [2]) feeds any random choice (a caption template). A missing
  field gives empty bytes; a malformed record may raise: both end as a skipped, counted record.

Per-host sharding: `TFRecordReader` gives each process its own files when there are at least as
many files as processes, else every process reads all files and keeps every `process_count`-th
record (so does `WebDatasetReader`); `TFDSReader` uses `tfds.even_splits`.
"""

import numpy as np
import tensorflow as tf

from clip_jax.data import captions
from clip_jax.infra.errors import UsageError

MAX_CYCLE = 16  # files read at once, interleaved record by record
READ_BUFFER = 4 << 20  # bytes buffered per open file; large reads suit gs:// as well as disks
PEEK_RECORDS = 8  # records read at start-up to check the feature keys
WDS_CHUNK = 32  # webdataset samples handed to tf.data at a time


def _shuffle_seed(key: int, epoch: tf.Tensor) -> tf.Tensor:
    """A per-epoch seed for `Dataset.shuffle` (which keeps 31 bits of it)."""
    return (tf.constant(key % (2**31 - 1), tf.int64) + epoch * 1_000_003) % (2**31 - 1)


def list_files(pattern: str, what: str = "train_data.source") -> list[str]:
    """The files matching `pattern` (local or gs://), sorted; a clear error naming `what` (the
    setting that gave the pattern) when there are none."""
    try:
        files = sorted(tf.io.gfile.glob(pattern))
    except tf.errors.OpError as e:
        raise UsageError(f"cannot list {pattern!r}: {e.message}") from None
    if not files:
        raise UsageError(f"no files match {pattern!r} ({what}); check the path")
    return files


def check_keys(path: str, image_key: str, text_key: str) -> None:
    """Fails early, naming the keys present, when the first records of `path` lack a key."""
    keys: set[str] = set()
    try:
        for raw in tf.data.TFRecordDataset(path).take(PEEK_RECORDS):
            keys |= set(tf.train.Example.FromString(raw.numpy()).features.feature)
    except (tf.errors.OpError, ValueError) as e:
        message = getattr(e, "message", str(e))
        raise UsageError(f"{path} is not a file of tf.train.Example records: {message}") from None
    for key, flag in ((image_key, "image_key"), (text_key, "text_key")):
        if keys and key not in keys:
            raise UsageError(
                f"{path}: records have no feature {key!r} (they have {sorted(keys)}); "
                f"set train_data.{flag}"
            )


def _file_share(
    files: list[str], process_index: int, process_count: int
) -> tuple[list[str], tuple[int, int] | None]:
    """This process's files and record sharding: its own files when there are at least as many
    files as processes, else all files and every `process_count`-th record."""
    if len(files) >= process_count:
        return files[process_index::process_count], None
    return files, (process_count, process_index)


def _sharded_epoch(
    files: list[str],
    open_file,
    *,
    key: int,
    e: tf.Tensor,
    record_shard: tuple[int, int] | None,
    shuffle_buffer: int,
) -> tf.data.Dataset:
    """Records of epoch `e`: `files` in a seeded order, `open_file(f)` of each interleaved record
    by record, this process's share kept (`record_shard`), then shuffled. The file order does not
    depend on the process, so sharding by record stays disjoint."""
    order = tf.random.experimental.stateless_shuffle(
        tf.constant(files), seed=tf.stack([tf.constant(key % 2**62, tf.int64), e])
    )
    ds = tf.data.Dataset.from_tensor_slices(order).interleave(
        open_file,
        cycle_length=min(MAX_CYCLE, len(files)),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if record_shard is not None:
        ds = ds.shard(*record_shard)
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=_shuffle_seed(key, e))
    return ds


class TFRecordReader:
    """tf.train.Example records with an encoded image and a caption as bytes features, as
    img2dataset writes them (`jpg`, `txt`); files sharded across processes when possible."""

    def __init__(
        self,
        pattern: str,
        *,
        image_key: str,
        text_key: str,
        seed: int,
        shuffle_buffer: int,
        process_index: int,
        process_count: int,
    ):
        files = list_files(pattern)
        check_keys(files[0], image_key, text_key)
        self.name = f"tfrecord:{pattern}"
        self.image_key, self.text_key = image_key, text_key
        self.key, self.shuffle_buffer = seed, shuffle_buffer
        self.files, self.record_shard = _file_share(files, process_index, process_count)

    def epoch(self, e: tf.Tensor) -> tf.data.Dataset:
        """Serialized records of epoch `e` (see `_sharded_epoch`)."""
        ds = _sharded_epoch(
            self.files,
            lambda f: tf.data.TFRecordDataset(f, buffer_size=READ_BUFFER),
            key=self.key,
            e=e,
            record_shard=self.record_shard,
            shuffle_buffer=self.shuffle_buffer,
        )
        return ds.map(lambda record: {"record": record})

    def parse(self, raw: dict, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        del seed  # nothing random: the caption is in the record
        spec = tf.io.FixedLenFeature([], tf.string, default_value="")
        features = tf.io.parse_single_example(
            raw["record"], {self.image_key: spec, self.text_key: spec}
        )
        return features[self.image_key], features[self.text_key]


class WebDatasetReader:
    """webdataset tar shards (`webdataset`): an image (`jpg`, `jpeg`, `png` or `webp`) and a
    caption (`txt`, else the `caption` of `json`) per sample; sharded across processes like
    `TFRecordReader`. A sample missing either half gives empty bytes, skipped and counted."""

    def __init__(
        self,
        pattern: str,
        *,
        seed: int,
        shuffle_buffer: int,
        process_index: int,
        process_count: int,
    ):
        from clip_jax.data import webdataset

        files = sorted(list_files(pattern), key=webdataset.natural_key)
        self.name = f"wds:{pattern}"
        self.key, self.shuffle_buffer = seed, shuffle_buffer
        self.files, self.record_shard = _file_share(files, process_index, process_count)

    @staticmethod
    def _chunks(path: tf.Tensor):
        """The shard's samples in chunks of `WDS_CHUNK`: one Python call per chunk, not per
        sample, so that the generator's overhead does not slow tf.data's threads."""
        from clip_jax.data import webdataset

        images, captions = [], []
        for _, fields in webdataset.samples(path.decode("utf-8")):
            images.append(webdataset.image_of(fields))
            captions.append(webdataset.caption_of(fields))
            if len(images) == WDS_CHUNK:
                yield {"image": np.array(images, object), "caption": np.array(captions, object)}
                images, captions = [], []
        if images:
            yield {"image": np.array(images, object), "caption": np.array(captions, object)}

    def _open(self, path: tf.Tensor) -> tf.data.Dataset:
        spec = tf.TensorSpec([None], tf.string)
        chunks = tf.data.Dataset.from_generator(
            self._chunks, args=(path,), output_signature={"image": spec, "caption": spec}
        )
        return chunks.unbatch()

    def epoch(self, e: tf.Tensor) -> tf.data.Dataset:
        """Samples of epoch `e` (see `_sharded_epoch`)."""
        return _sharded_epoch(
            self.files,
            self._open,
            key=self.key,
            e=e,
            record_shard=self.record_shard,
            shuffle_buffer=self.shuffle_buffer,
        )

    def parse(self, raw: dict, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        del seed  # nothing random: the caption is in the sample
        return raw["image"], raw["caption"]


def _find_feature(features, path: str):
    """The feature at `path` ("a/b" for nested dicts, through Sequences), or None."""
    import tensorflow_datasets as tfds

    node = features
    for part in path.split("/"):
        if isinstance(node, tfds.features.Sequence):
            node = node.feature
        if not isinstance(node, tfds.features.FeaturesDict) or part not in node:
            return None
        node = node[part]
    return node


def _only(features, kind, what: str, name: str) -> str:
    """The name of the one top-level feature of type `kind`; an error when there is not one."""
    found = [k for k, f in features.items() if isinstance(f, kind)]
    if len(found) != 1:
        raise UsageError(
            f"tfds:{name} has {len(found)} {what} features ({found}); name one with "
            f"train_data.{'image_key' if what == 'image' else 'text_key'}"
        )
    return found[0]


class TFDSReader:
    """A prepared TensorFlow Datasets split with an image and a caption: the Text feature named by
    `text_key` ("a/b" for nested ones; in a Sequence, one caption is drawn per example) or, for
    label-only datasets, a ClassLabel (`text_key`, else `label`, else the only one) whose class
    name fills a seeded draw from `templates`. The image is `image_key`, else the only Image."""

    def __init__(
        self,
        name: str,
        split: str,
        *,
        data_dir: str | None,
        image_key: str,
        text_key: str,
        templates: tuple[str, ...],
        seed: int,
        shuffle_buffer: int,
        process_index: int,
        process_count: int,
    ):
        import tensorflow_datasets as tfds

        self.name = f"tfds:{name}:{split}"
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise UsageError(f"{self.name}: tfds knows no dataset {name!r}") from None
        if not builder.is_prepared():
            raise UsageError(
                f"{self.name}: not prepared in {builder.data_dir}; run `tfds build {name} "
                "--data_dir=DIR` and set train_data.data_dir=DIR"
            )
        features = builder.info.features
        self._image = image_key
        if not isinstance(_find_feature(features, image_key), tfds.features.Image):
            self._image = _only(features, tfds.features.Image, "image", name)
        text = _find_feature(features, text_key)
        self._text, self._names = None, None
        if isinstance(text, tfds.features.Text):
            self._text = text_key
        else:  # labels only: a ClassLabel named by text_key, else "label", else the only one
            for key in (text_key, "label"):
                if isinstance(_find_feature(features, key), tfds.features.ClassLabel):
                    self._label = key
                    break
            else:
                self._label = _only(features, tfds.features.ClassLabel, "label", name)
            self._names = [n.replace("_", " ") for n in _find_feature(features, self._label).names]
            self._prefixes, self._suffixes = captions.split_templates(templates)
        try:
            self._base = builder.as_dataset(
                split=tfds.even_splits(split, n=process_count)[process_index],
                shuffle_files=False,
                decoders={self._image: tfds.decode.SkipDecoding()},
                read_config=tfds.ReadConfig(try_autocache=False),
            )
        except (ValueError, KeyError, AssertionError) as e:
            raise UsageError(f"{self.name}: {str(e).splitlines()[0]}") from None
        self.key, self.shuffle_buffer = seed, shuffle_buffer

    def _select(self, example: dict) -> dict:
        """Keeps the image bytes and the caption's source (text or label)."""

        def at(path: str) -> tf.Tensor:
            node = example
            for part in path.split("/"):
                node = node[part]
            return node

        if self._text is None:
            return {"image": example[self._image], "label": at(self._label)}
        return {"image": example[self._image], "text": at(self._text)}

    def epoch(self, e: tf.Tensor) -> tf.data.Dataset:
        ds = self._base.map(self._select)
        if self.shuffle_buffer > 1:
            ds = ds.shuffle(self.shuffle_buffer, seed=_shuffle_seed(self.key, e))
        return ds

    def parse(self, raw: dict, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if self._names is None:
            texts = tf.reshape(raw["text"], [-1])  # one caption or a Sequence of them
            pick = tf.random.stateless_uniform(
                [], seed, maxval=tf.size(texts), dtype=tf.int32
            )  # raises on an empty Sequence: the record is skipped and counted
            return raw["image"], texts[pick]
        t = tf.random.stateless_uniform([], seed, maxval=len(self._prefixes), dtype=tf.int32)
        name = tf.gather(tf.constant(self._names), raw["label"])
        caption = tf.strings.join(
            [tf.gather(self._prefixes, t), name, tf.gather(self._suffixes, t)]
        )
        return raw["image"], caption
