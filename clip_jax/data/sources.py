"""Training data sources.

Every source has the same small interface:
- `batches(global_batch, rows, state=None)` yields `(batch, state)` pairs: `batch` holds this
  process's `rows` of each global batch (ascending indices into the batch, as
  `sharding.local_rows` gives them, or a slice) as numpy arrays `{"image": [n, H, W, 3] uint8,
  "text": [n, L] int32}`; `state` is a small JSON-able dict, the position just after that batch,
  from which `batches(..., state=state)` resumes exactly; its `skipped_examples` counts the bad
  records skipped up to that batch (the loop reads it there: sources read ahead).
- `skipped_examples`: how many bad records this process has skipped so far.

`SyntheticSource` lives here; the sources over real data (TFRecord shards, tfds, mixtures) are
`tfdata.TFDataSource` over `readers`; `pipeline.make_source` picks one from the config.
"""

import atexit
import contextlib
import weakref
from collections.abc import Iterator

import numpy as np

from clip_jax.infra.errors import UsageError

Batch = dict[str, np.ndarray]
PIXELS_PER_UNIT = 40.0  # synthetic patterns and noise (unit variance) as pixel levels
# The sources an evaluation reads (`clip_jax.evals.data.open_source`); said here, where no
# TensorFlow is imported, so that config checks can name them.
EVAL_SOURCE_HELP = (
    "use tfds:NAME[/CONFIG]:SPLIT, imagefolder:DIR, tfrecord:GLOB or wds:DIR (CLIP_benchmark's "
    "webdataset layout)"
)


_OPEN: "weakref.WeakSet[Iterator]" = weakref.WeakSet()


def closed_at_exit(stream: Iterator) -> Iterator:
    """`stream`, a generator reading a tf.data pipeline that calls Python (PIL's decoding through
    `tf.numpy_function`), registered to be closed when the interpreter exits.

    Deleting such a pipeline's iterator waits for its Python calls in flight; once Python is
    finalizing, the threads making them can no longer take the interpreter's lock, so a stream
    still open then (a source held by a traceback, a global) would hang the exit. `atexit`
    handlers run before that: closing the stream there ends its frame and frees the iterator.
    """
    _OPEN.add(stream)
    return stream


@atexit.register
def _close_open_streams() -> None:
    for stream in list(_OPEN):
        with contextlib.suppress(ValueError):  # ValueError: running, it is the one exiting
            stream.close()


def batch_rows(rows: np.ndarray | slice, global_batch: int) -> np.ndarray:
    """A process's rows of a global batch as ascending indices, given as `sharding.local_rows`
    gives them or as a slice (one process, tests)."""
    return np.arange(global_batch)[rows]


class SyntheticSource:
    """Learnable synthetic pairs whose every example is a pure function of (seed, global index).

    Example i belongs to one of `num_classes` classes; its image is the class's low-resolution
    pattern, upsampled, plus noise, as uint8 pixels like every source's, and its caption names the
    class with three tokens between the start and end tokens. A run is therefore identical
    whatever the mesh or the process count, and its loss can fall. Its captions are token ids
    made up here, no tokenizer's (`tokenizer` is None): a smoke run of any config, whatever its
    tokenizer and pooling, runs on them.
    """

    tokenizer = None

    def __init__(
        self,
        seed: int,
        image_size: int,
        context_length: int,
        vocab_size: int,
        num_classes: int = 16,
        noise: float = 0.5,
    ):
        if context_length < 5:
            raise UsageError("synthetic captions need a context of at least 5 tokens")
        self.seed, self.image_size, self.context_length = seed, image_size, context_length
        self.vocab_size, self.num_classes, self.noise = vocab_size, num_classes, noise
        self.skipped_examples = 0
        cells = max(1, image_size // 8)
        protos = np.random.default_rng([seed, 2**31 - 1]).standard_normal((num_classes, 8, 8, 3))
        self._protos = np.repeat(np.repeat(protos, cells, 1), cells, 2)[:, :image_size, :image_size]
        if self._protos.shape[1] < image_size:  # sizes that 8 does not divide: pad the edge
            pad = image_size - self._protos.shape[1]
            self._protos = np.pad(self._protos, ((0, 0), (0, pad), (0, pad), (0, 0)), mode="edge")

    def examples(self, indices: np.ndarray) -> Batch:
        """The examples of the given global indices."""
        n, size, length = len(indices), self.image_size, self.context_length
        images = np.empty((n, size, size, 3), np.uint8)
        texts = np.zeros((n, length), np.int32)
        sot, eot = self.vocab_size - 2, self.vocab_size - 1
        for row, i in enumerate(indices):
            rng = np.random.default_rng([self.seed, int(i)])
            c = int(rng.integers(self.num_classes))
            value = self._protos[c] + self.noise * rng.standard_normal((size, size, 3))
            images[row] = np.clip(np.round(127.5 + PIXELS_PER_UNIT * value), 0, 255)
            words = 1 + (3 * c + np.arange(3)) % (self.vocab_size - 3)
            texts[row, :5] = [sot, *words, eot]
        return {"image": images, "text": texts}

    def batches(
        self, global_batch: int, rows: np.ndarray | slice, state: dict | None = None
    ) -> Iterator[tuple[Batch, dict]]:
        """The `rows` of each global batch, from `state` (or the start) on."""
        rows = batch_rows(rows, global_batch)
        step = int(state["step"]) if state else 0
        while True:
            base = step * global_batch
            step += 1
            batch = self.examples(base + rows)
            yield batch, {"step": step, "skipped_examples": 0}
