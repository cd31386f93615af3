"""The tf.data source: readers' raw records -> decoded, augmented, tokenized host-local batches,
with skipped-record counting and exact resume (the interface is in `sources`).

Per reader, the stream is a pure function of the seed and a position (epoch, offset):

    epoch e0 from offset o0, then epochs e0+1, e0+2, ... (each in its own seeded order)
      -> number every raw record (epoch, offset) before decoding
      -> parse in a deterministic parallel map; drop records that raise (malformed)
      -> decode + crop (uint8) groups of `DECODE_GROUP` records per Python call, in a
         deterministic parallel map, each image seeded by its record's position
      -> drop records whose image did not decode (bad bytes, a header declaring more than
         `max_image_pixels`: never decoded) or that are unusable (no or empty caption)
    then mix the readers' streams (a seeded draw per example), batch, tokenize each batch's
    captions in one call, prefetch (the pixels stay uint8: the device normalises them).

Every example carries its position and `raw`, the number of raw records its reader consumed in
this run before it, so that `raw + 1 - examples emitted` counts the records skipped up to it:
nothing is dropped without being counted. The state after a batch is, for each reader, the
position just after its last example in the batch; resuming rebuilds the stream from there and
skips raw records without decoding them.

A marker closes every epoch; a reader whose stream has two markers in a row without a usable
example between them (a whole epoch of bad records, or no records) ends the stream, and
`batches` raises a clear error instead of hanging.
"""

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from clip_jax.data import image_ops
from clip_jax.data.sources import Batch, batch_rows, closed_at_exit
from clip_jax.infra.errors import UsageError

EPOCHS = 2**40  # "forever", as a range that tf.data can hold
PREFETCH_BATCHES = 2
DECODE_GROUP = 16  # examples cropped per Python call


def _key(*parts: int) -> int:
    """A 62-bit key mixed from integers (seed, reader, process)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 2)


def _zeros(spec) -> tf.Tensor:
    """A filler element of `spec` (unknown dimensions become 0)."""
    return tf.zeros([d or 0 for d in spec.shape], spec.dtype)


def _clean_caption(caption: tf.Tensor) -> tf.Tensor:
    """Invalid UTF-8 is repaired (U+FFFD), surrounding whitespace stripped."""
    caption = tf.strings.unicode_transcode(caption, "UTF-8", "UTF-8", errors="replace")
    return tf.strings.strip(caption)


def _positioned(reader, epoch: int, offset: int) -> tf.data.Dataset:
    """Raw records from (epoch, offset) on, each with its position, and a marker per epoch."""

    def one_epoch(e: tf.Tensor) -> tf.data.Dataset:
        records = reader.epoch(e)
        spec = records.element_spec
        numbered = records.enumerate().map(
            lambda i, r: {"raw": r, "epoch": e, "offset": i, "marker": tf.constant(False)}
        )
        marker = {
            "raw": tf.nest.map_structure(_zeros, spec),
            "epoch": e,
            "offset": tf.constant(-1, tf.int64),
            "marker": tf.constant(True),
        }
        return numbered.concatenate(tf.data.Dataset.from_tensors(marker))

    first = one_epoch(tf.constant(epoch, tf.int64)).skip(offset)
    rest = tf.data.Dataset.range(epoch + 1, EPOCHS).flat_map(one_epoch)
    return first.concatenate(rest)


def _watch(markers_since_usable: tf.Tensor, usable: tf.Tensor, marker: tf.Tensor):
    """The reader's liveness through one group: (markers since the last usable example after
    the group, which of its examples come before the reader died).

    The reader dies at the second epoch marker without a usable example between: at an element
    where `markers_since_usable` (carried across groups) reaches 2."""
    markers = tf.cumsum(tf.cast(marker, tf.int64))  # markers up to each element
    usable_so_far = tf.cumsum(tf.cast(usable, tf.int64))
    last_usable = tf.gather(  # the index of the last usable element up to each (0 if none)
        tf.concat([tf.constant([0], tf.int64), tf.where(usable)[:, 0]], 0), usable_so_far
    )
    since = tf.where(
        usable_so_far > 0,
        markers - tf.gather(markers, last_usable),  # a usable element is never a marker
        markers_since_usable + markers,
    )
    alive = tf.equal(tf.cumsum(tf.cast(since >= 2, tf.int64)), 0)
    return tf.concat([[markers_since_usable], since], 0)[-1], alive


def _decoded(reader, group_fn: Callable, key: int, epoch: int, source: int, ds: tf.data.Dataset):
    """Parses, then decodes in groups of `DECODE_GROUP`, in parallel and in order; drops bad
    records; ends on a dead reader. `epoch`: the first epoch of `ds` (`_positioned`'s).

    `group_fn(image bytes [k], draws [k, 4], usable [k]) -> (images [k, S, S, 3], decoded [k])`
    crops a group of examples in one Python call, and the bookkeeping after it runs on whole
    groups: done per element, `tf.numpy_function`'s calls and tf.data's own work cost a quarter
    of a 500x375 photo's crop, grouped an eighth (docs/performance.md, "The host pipeline")."""

    def parse(n: tf.Tensor, x: dict) -> dict:
        seed = tf.stack([tf.constant(key, tf.int64), x["epoch"] * 2**32 + x["offset"]])
        caption_seed, image_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        image_bytes, caption = reader.parse(x["raw"], caption_seed)
        caption = _clean_caption(caption)
        usable = tf.logical_and(tf.logical_not(x["marker"]), tf.strings.length(caption) > 0)
        return {
            "image_bytes": image_bytes,
            "draws": image_ops.draws(image_seed),
            "caption": caption,
            "epoch": x["epoch"],
            "offset": x["offset"],
            # Markers of epochs epoch..e-1 precede a record of epoch e: they are not raw records.
            "raw": n - (x["epoch"] - epoch),
            "marker": x["marker"],
            "usable": usable,
        }

    def decode(group: dict) -> dict:
        group = dict(group)
        images, decoded = group_fn(group.pop("image_bytes"), group.pop("draws"), group["usable"])
        # An image that did not decode leaves its record unusable: skipped, counted through `raw`.
        return {**group, "image": images, "usable": tf.logical_and(group["usable"], decoded)}

    def watch(state: tuple, group: dict):
        markers_since_usable, died = state
        markers_since_usable, alive = _watch(markers_since_usable, group["usable"], group["marker"])
        keep = tf.logical_and(group["usable"], alive)
        fields = {k: group[k] for k in ("image", "caption", "epoch", "offset", "raw")}
        fields["source"] = tf.fill(tf.shape(keep), tf.constant(source, tf.int64))
        fields = tf.cond(
            tf.reduce_all(keep),
            lambda: fields,  # the usual group: nothing to drop, no copy
            lambda: {k: tf.boolean_mask(v, keep) for k, v in fields.items()},
        )
        return (markers_since_usable, tf.logical_not(tf.reduce_all(alive))), (fields, died)

    start = (tf.constant(0, tf.int64), tf.constant(False))
    return (
        ds.enumerate()
        .map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .ignore_errors()  # malformed records: counted through `raw`
        .batch(DECODE_GROUP)
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .scan(start, watch)
        .take_while(lambda fields, died: tf.logical_not(died))
        .map(lambda fields, died: fields)
        .unbatch()
    )


class TFDataSource:
    """Batches from one or more readers mixed with `weights`; see the module docstring.

    Training images are cropped by `augmentation`, one of `image_ops.AUGMENTATIONS`
    ("random_resized_crop" covering `crop_scale` of the area, or "random_square_crop").

    State: `{"sources": [{"epoch", "offset", "skipped"} per reader], "examples": n}`, where
    `examples` counts the examples this process has drawn (it seeds the mixture's draws).
    """

    def __init__(
        self,
        readers: Sequence,
        *,
        tokenizer: Any,
        seed: int,
        image_size: int,
        context_length: int,
        augmentation: str,
        weights: Sequence[float],
        crop_scale: tuple[float, float],
        process_index: int,
        max_image_pixels: int,
    ):
        weights = list(weights)
        if len(weights) != len(readers) or min(weights) <= 0:
            raise ValueError(f"mixture weights {weights} must be positive, one per source")
        lo, hi = crop_scale
        if not 0 < lo <= hi <= 1:
            raise UsageError(f"train_data.crop_scale {crop_scale} must satisfy 0 < lo <= hi <= 1")
        if augmentation not in image_ops.AUGMENTATIONS:
            raise UsageError(
                f"train_data.augmentation {augmentation!r}: use one of {image_ops.AUGMENTATIONS}"
            )
        self.readers, self.weights = list(readers), [w / sum(weights) for w in weights]
        self.tokenizer, self.seed = tokenizer, seed  # a `tokenizers.Tokenizer`
        self.image_size, self.context_length = image_size, context_length
        self.crop_scale, self.process_index = (float(lo), float(hi)), process_index
        self.augmentation = augmentation
        if max_image_pixels < 1:
            raise UsageError(f"max_image_pixels={max_image_pixels} must be at least 1")
        self.max_image_pixels = int(max_image_pixels)
        self.skipped_examples = 0

    def _group_fn(self, data: tf.Tensor, u: tf.Tensor, usable: tf.Tensor):
        return image_ops.augment_group(
            data,
            u,
            usable,
            self.image_size,
            augmentation=self.augmentation,
            crop_scale=self.crop_scale,
            max_pixels=self.max_image_pixels,
        )

    def _tokenize(self, captions: np.ndarray) -> np.ndarray:
        tokens = self.tokenizer.tokenize([c.decode("utf-8") for c in captions])  # [n, L]
        return np.asarray(tokens, np.int32)

    def dataset(self, per_process: int, state: dict) -> tf.data.Dataset:
        """The tf.data pipeline of batches of `per_process` examples from `state` on."""
        streams = []
        for j, (reader, pos) in enumerate(zip(self.readers, state["sources"], strict=True)):
            raw = _positioned(reader, int(pos["epoch"]), int(pos["offset"]))
            key = _key(self.seed, j, self.process_index)
            streams.append(_decoded(reader, self._group_fn, key, int(pos["epoch"]), j, raw))
        if len(streams) == 1:
            ds = streams[0]
        else:
            logits = tf.math.log(tf.constant([self.weights], tf.float32))  # [1, K]
            mix_key = _key(self.seed, len(streams), self.process_index, 1)
            choices = tf.data.Dataset.range(int(state["examples"]), EPOCHS).map(
                lambda i: tf.random.stateless_categorical(
                    logits, 1, seed=tf.stack([tf.constant(mix_key, tf.int64), i])
                )[0, 0]
            )
            ds = tf.data.Dataset.choose_from_datasets(streams, choices, stop_on_empty_dataset=True)

        def finish(batch: dict) -> dict:
            """Tokenizes the batch's captions in one call (the pixels stay uint8: the train step
            normalises them on the device)."""
            tokens = tf.numpy_function(
                self._tokenize, [batch.pop("caption")], tf.int32, stateful=False
            )
            tokens.set_shape([per_process, self.context_length])
            return {**batch, "text": tokens}

        ds = ds.batch(per_process, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.map(finish, num_parallel_calls=2, deterministic=True)  # bounds batches in flight
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options).prefetch(PREFETCH_BATCHES)

    def initial_state(self) -> dict:
        start = {"epoch": 0, "offset": 0, "skipped": 0}
        return {"sources": [dict(start) for _ in self.readers], "examples": 0}

    def batches(
        self, global_batch: int, rows: np.ndarray | slice, state: dict | None = None
    ) -> Iterator[tuple[Batch, dict]]:
        """This process's `rows` of each global batch, from `state` (or the start) on."""
        return closed_at_exit(self._batches(global_batch, rows, state))

    def _batches(
        self, global_batch: int, rows: np.ndarray | slice, state: dict | None
    ) -> Iterator[tuple[Batch, dict]]:
        n = len(batch_rows(rows, global_batch))
        if not 0 < n <= global_batch:
            raise ValueError(f"rows {rows} do not fit a global batch of {global_batch}")
        state = state or self.initial_state()
        if len(state.get("sources", ())) != len(self.readers):
            raise UsageError(f"data state {state} does not match {len(self.readers)} source(s)")
        positions = [dict(p) for p in state["sources"]]
        examples = int(state["examples"])
        emitted = [0] * len(self.readers)  # examples per reader in this run
        base = [int(p["skipped"]) for p in positions]
        self.skipped_examples = sum(base)
        for batch in self.dataset(n, state).as_numpy_iterator():
            source = batch.pop("source")
            for j in np.unique(source):
                rows_j = np.flatnonzero(source == j)
                last = rows_j[-1]
                emitted[j] += len(rows_j)
                positions[j] = {
                    "epoch": int(batch["epoch"][last]),
                    "offset": int(batch["offset"][last]) + 1,
                    "skipped": base[j] + int(batch["raw"][last]) + 1 - emitted[j],
                }
            examples += n
            self.skipped_examples = sum(p["skipped"] for p in positions)
            out = {"image": batch["image"], "text": batch["text"]}
            state = {"sources": [dict(p) for p in positions], "examples": examples}
            yield out, {**state, "skipped_examples": self.skipped_examples}
        names = ", ".join(r.name for r in self.readers)
        raise UsageError(
            f"{names}: a whole epoch without one usable example ({self.skipped_examples} bad "
            "records skipped); check the data and train_data.image_key / text_key"
        )
