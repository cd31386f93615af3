"""Benchmarks; each prints one JSON object as its last line.

    python -m clip_jax.benchmark --what=input --config=configs/b32.py \
        [--config.train_data.source=tfrecord:GLOB] [--batch_size=256] [--steps=20]

Modes (`MODES`, one function each, `fn(config, *, batch_size, steps) -> dict`):
- input: decoded, augmented, tokenized examples per second of the training input pipeline at the
  config's resolution, on this host's CPU cores. With `train_data.source=synthetic` (the default)
  it first writes temporary JPEG shards (random smooth images stored at 8/7 of the resolution,
  256 px for 224, as img2dataset stores them; captions of 5 to 20 random words) and reads those.
"""

import io
import json
import os
import tempfile
import time

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/b32.py.")
_WHAT = flags.DEFINE_string("what", "input", "What to measure: one of MODES.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Examples per batch (0: the mode's default).")
_STEPS = flags.DEFINE_integer("steps", 20, "Batches timed, after a warm-up.")
flags.mark_flags_as_required(["config"])

INPUT_BATCH = 256  # per process; the config's global batch may be 32k
WARMUP_BATCHES = 3
SHARD_IMAGES, SHARD_FILES, DISTINCT_IMAGES = 1024, 8, 64


def smooth_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A random smooth colour field with mild noise, as JPEG bytes [size, size, 3]; it encodes
    to about the size of a photo, unlike white noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((size, size), Image.BICUBIC), np.int16)
    noisy = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(noisy).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_jpeg_shards(directory: str, image_size: int, seed: int = 0) -> str:
    """Temporary img2dataset-style shards of `smooth_jpeg`s; returns their source string."""
    from clip_jax.data.prepare import ShardWriter, make_example

    rng = np.random.default_rng(seed)
    jpegs = [smooth_jpeg(rng, round(image_size * 8 / 7)) for _ in range(DISTINCT_IMAGES)]
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(2000)]
    with ShardWriter(directory, "bench", SHARD_IMAGES // SHARD_FILES) as writer:
        for i in range(SHARD_IMAGES):
            caption = " ".join(rng.choice(words, rng.integers(5, 21)))
            writer.write(make_example(jpegs[i % DISTINCT_IMAGES], caption, f"{i:09d}"))
    return "tfrecord:" + os.path.join(directory, "bench-*.tfrecord")


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def bench_input(config: ml_collections.ConfigDict, *, batch_size: int, steps: int) -> dict:
    """Examples per second out of `pipeline.make_source`, after `WARMUP_BATCHES` batches."""
    from clip_jax.data import pipeline

    batch_size = batch_size or min(INPUT_BATCH, config.batch_size)
    size = config.model.vision.image_size
    data = ml_collections.ConfigDict(config.train_data.to_dict())
    with tempfile.TemporaryDirectory() as tmp:
        if data.source == "synthetic":
            data.source = write_jpeg_shards(tmp, size, config.seed)
        source = pipeline.make_source(
            data,
            seed=config.seed,
            image_size=size,
            context_length=config.model.text.context_length,
            vocab_size=config.model.text.vocab_size,
        )
        batches = source.batches(batch_size, slice(0, batch_size))
        for _ in range(WARMUP_BATCHES):
            next(batches)
        start = time.perf_counter()
        for _ in range(steps):
            batch, _ = next(batches)
        elapsed = time.perf_counter() - start
    per_sec = steps * batch_size / elapsed
    cores = cpu_cores()
    return {
        "what": "input",
        "examples_per_sec": round(per_sec, 1),
        "per_core": round(per_sec / cores, 1),
        "cores": cores,
        "image_size": size,
        "batch_size": batch_size,
        "steps": steps,
        "source": data.source,
        "skipped_examples": int(source.skipped_examples),
        "image_shape": list(batch["image"].shape),
    }


MODES = {"input": bench_input}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _WHAT.value not in MODES:
        raise app.UsageError(f"--what={_WHAT.value}: choose one of {sorted(MODES)}")
    result = MODES[_WHAT.value](_CONFIG.value, batch_size=_BATCH.value, steps=_STEPS.value)
    logging.info("%s", result)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
