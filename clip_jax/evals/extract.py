"""Running a function of the model over an evaluation dataset on every device and host: batches in,
per-example outputs back in dataset order, padding removed, optionally cached on disk so that a
preempted job resumes at the batch where it stopped.

    step = extract.make_step(predict_fn, mesh, rules)   # compiled once, reused by every evaluation
    outputs = extract.run(step, variables, make_batches, mesh=mesh, global_batch=B, ...)

`predict_fn(variables, batch, extra) -> {name: [B, ...]}` is jitted with the batch sharded over the
mesh's batch axes and its outputs replicated, so every process sees the outputs of the whole
batch; the mask, labels and indices travel with them. `extra` is any other array input (a
zero-shot classifier), an argument rather than a constant so that a new one does not recompile.
"""

import io
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clip_jax.data import preprocess
from clip_jax.data.preprocess import CLIP_MEAN, CLIP_STD
from clip_jax.infra import paths
from clip_jax.parallel import sharding

PASSED_THROUGH = ("mask", "index", "label", "num_captions", "image_key")
PROGRESS_EVERY_S = 30.0


def normalize(
    images: jax.Array, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> jax.Array:
    """uint8 [..., 3] -> float32 normalised with `mean` and `std` (of pixels in [0, 1]; CLIP's by
    default), on the device (a quarter of the bytes to copy): `preprocess.normalize`."""
    return preprocess.normalize(images, mean, std)


def make_step(
    predict_fn: Callable[..., dict[str, jax.Array]], mesh: Mesh, rules: sharding.Rules
) -> Callable:
    """The jitted per-batch function `(variables, batch, extra)`: predictions and the
    pass-through fields, replicated; the model's activations laid out on `mesh` by `rules`."""

    def step(variables, batch, extra):
        with nn.logical_axis_rules(rules):
            out = dict(predict_fn(variables, batch, extra))
        for key in PASSED_THROUGH:
            if key in batch:
                out[key] = batch[key]
        return out

    return jax.jit(step, out_shardings=replicated(mesh))


class FeatureCache:
    """Outputs of finished batches on disk, one `.npz` per `every` batches, written by process 0.

    `meta` (the weights, dataset, its size, resolution, batch) is written first; a directory
    holding another `meta` is emptied before anything is written, so chunks of two different
    settings can never be read together.
    """

    def __init__(self, directory: str, meta: Mapping[str, Any], every: int):
        self.directory, self.meta, self.every = directory, dict(meta), max(1, every)
        self.enabled = jax.process_index() == 0

    def _meta_path(self):
        return paths.path(self.directory) / "meta.json"

    def _chunk_path(self, i: int):
        return paths.path(self.directory) / f"chunk-{i:06d}.npz"

    def load(self) -> list[dict[str, np.ndarray]]:
        """The cached chunks in order; a cache of other settings is removed (empty result)."""
        if not self.enabled:
            return []
        if self._meta_path().exists():
            same = json.loads(self._meta_path().read_text()) == self.meta
            if not same:
                logging.warning("%s was made for other settings: recomputing", self.directory)
        else:
            same = False
        if not same:
            if paths.path(self.directory).exists():
                paths.path(self.directory).rmtree()
            paths.write_text(self._meta_path(), json.dumps(self.meta))
            return []
        chunks = []
        while (path := self._chunk_path(len(chunks))).exists():
            with np.load(io.BytesIO(path.read_bytes())) as f:
                chunks.append({k: f[k] for k in f.files})
        return chunks

    def save(self, i: int, chunk: dict[str, np.ndarray]) -> None:
        if not self.enabled:
            return
        buffer = io.BytesIO()
        np.savez(buffer, **chunk)
        target = self._chunk_path(i)
        if paths.is_remote(target):  # an object's upload is atomic
            target.write_bytes(buffer.getvalue())
            return
        tmp = target.parent / (target.name + ".tmp")
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(target)  # a chunk exists whole or not at all


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array that every process holds whole -> rows sharded over the batch axes."""
    return jax.make_array_from_callback(
        x.shape, sharding.batch_sharding(mesh, x.ndim), lambda idx: x[idx]
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host or single-device arrays -> arrays replicated over every device of `mesh` (arrays
    already on the mesh, as training's, are left where they are)."""

    def place(x):
        current = getattr(x, "sharding", None)
        if isinstance(current, NamedSharding) and current.mesh == mesh:
            return x
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, replicated(mesh), lambda idx: x[idx])

    return jax.tree.map(place, tree)


def broadcast_json(value: Any) -> Any:
    """Process 0's JSON-able value on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0 else None
    size = _broadcast_int(raw.size if raw is not None else 0)
    buf = np.zeros(size, np.uint8)
    if raw is not None:
        buf[:] = raw
    return json.loads(bytes(multihost_utils.broadcast_one_to_all(buf)).decode())


def _broadcast_int(value: int) -> int:
    """Process 0's value on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not chunks:
        return {}
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def run(
    step: Callable,
    variables: Any,
    make_batches: Callable[[int], Iterator[dict[str, np.ndarray]]],
    *,
    mesh: Mesh,
    global_batch: int,
    total_batches: int,
    cache: FeatureCache | None = None,
    label: str = "eval",
    extra: Any = None,
) -> dict[str, np.ndarray]:
    """All outputs of `predict_fn` over the dataset, in dataset order, padding removed.

    Args:
      step: `make_step`'s function.
      variables: the model's variables, already placed on the mesh (or replicated).
      make_batches: `start -> iterator` of this process's rows of global batches from `start`
        (`evals.data.batches`).
      mesh: the device mesh; the batch is sharded over its batch axes.
      global_batch, total_batches: the global batch size and the number of batches.
      cache: where finished batches are kept (None: nowhere).
      label: names the work in progress lines.
      extra: `step`'s third argument.
    Returns:
      {name: [num_examples, ...]} of every real example, plus `index` (its position) and the
      pass-through fields; identical on every process (process 0 only, with a cache, since only
      it reads the cache back).
    """
    chunks = cache.load() if cache is not None else []
    every = cache.every if cache is not None else total_batches or 1
    start = _broadcast_int(min(len(chunks) * every, total_batches))
    if start:
        logging.info(
            "%s: resuming at batch %d of %d from %s", label, start, total_batches, cache.directory
        )
    pending: list[dict[str, np.ndarray]] = []
    t0 = last_log = time.perf_counter()
    with jax.set_mesh(mesh):
        for k, local in enumerate(make_batches(start), start):
            batch = sharding.global_batch(local, mesh, global_batch)
            out = jax.device_get(step(variables, batch, extra))
            keep = out["mask"]
            pending.append({name: v[keep] for name, v in out.items()})
            if cache is not None and ((k + 1) % every == 0 or k + 1 == total_batches):
                cache.save(len(chunks), _concat(pending))
                chunks.append(_concat(pending))
                pending = []
            now = time.perf_counter()
            if now - last_log > PROGRESS_EVERY_S or k + 1 == total_batches:
                done = k + 1 - start
                rate = done * global_batch / (now - t0)
                eta = (total_batches - k - 1) * (now - t0) / done
                logging.info(
                    "%s: batch %d/%d, %.1f examples/s, ETA %.0fs",
                    label,
                    k + 1,
                    total_batches,
                    rate,
                    eta,
                )
                last_log = now
    result = _concat(chunks + pending)
    result.pop("mask", None)
    return result
