"""The benchmark's modes (`MODES`, one function each, `fn(config, *, batch_size, steps) -> dict`):
the input pipeline, the loss's memory, zero-shot evaluation and checkpoint saves here, the step's
modes in `benchmark_step`. `python -m clip_jax.benchmark` is their command line; its help says
what each measures.
"""

import io
import os
import tarfile
import tempfile
import time

import jax
import ml_collections
import numpy as np
from PIL import Image

from clip_jax.tools.benchmark_step import (
    WARMUP_BATCHES,
    bench_patch_dropout,
    bench_train_step,
    bench_vs_openclip,
    cpu_cores,
    random_batch,
)

INPUT_BATCH = 256  # per process; the config's global batch may be 32k
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


def write_jpeg_shards(directory: str, image_size: int, seed: int = 0) -> dict[str, str]:
    """Temporary shards of the same `smooth_jpeg`s and captions in both layouts, img2dataset's
    TFRecords and webdataset tars; returns their source strings by kind."""
    from clip_jax.data.prepare import ShardWriter, make_example

    rng = np.random.default_rng(seed)
    jpegs = [smooth_jpeg(rng, round(image_size * 8 / 7)) for _ in range(DISTINCT_IMAGES)]
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(2000)]
    captions = [" ".join(rng.choice(words, rng.integers(5, 21))) for _ in range(SHARD_IMAGES)]
    with ShardWriter(directory, "bench", SHARD_IMAGES // SHARD_FILES) as writer:
        for i, caption in enumerate(captions):
            writer.write(make_example(jpegs[i % DISTINCT_IMAGES], caption, f"{i:09d}"))
    per_file = SHARD_IMAGES // SHARD_FILES
    for f in range(SHARD_FILES):
        with tarfile.open(os.path.join(directory, f"bench-{f:05d}.tar"), "w") as tar:
            for i in range(f * per_file, (f + 1) * per_file):
                for field, data in (
                    ("jpg", jpegs[i % DISTINCT_IMAGES]),
                    ("txt", captions[i].encode()),
                ):
                    info = tarfile.TarInfo(f"{i:09d}.{field}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {
        "tfrecord": "tfrecord:" + os.path.join(directory, "bench-*.tfrecord"),
        "wds": "wds:" + os.path.join(directory, "bench-*.tar"),
    }


def bench_input(config: ml_collections.ConfigDict, *, batch_size: int, steps: int) -> dict:
    """Examples per second out of `pipeline.make_source`, after `WARMUP_BATCHES` batches.

    With a source in the config, that source's. Without one, made-up JPEGs at the model's
    resolution, the same images in TFRecord and webdataset shards, read alternately twice each:
    both rates (the best of each) and wds's over tfrecord's."""
    batch_size = batch_size or min(INPUT_BATCH, config.batch_size)
    data = ml_collections.ConfigDict(config.train_data.to_dict())
    size = config.model.vision.image_size
    out = {"what": "input", "image_size": size, "batch_size": batch_size, "steps": steps}
    cores = cpu_cores()
    if data.source not in ("", "synthetic"):
        rate, skipped, shape = _input_rate(config, data, batch_size, steps)
        out.update(source=data.source, skipped_examples=skipped, image_shape=shape)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            sources = write_jpeg_shards(tmp, size, config.seed)
            rates: dict[str, list[float]] = {kind: [] for kind in sources}
            for _ in range(2):  # alternately, so that drift hits both
                for kind, source in sources.items():
                    data.source = source
                    rates[kind].append(_input_rate(config, data, batch_size, steps)[0])
        best = {kind: max(r) for kind, r in rates.items()}
        rate = best["tfrecord"]
        out.update(
            source="made-up JPEGs (tfrecord and wds)",
            tfrecord_examples_per_sec=round(best["tfrecord"], 1),
            wds_examples_per_sec=round(best["wds"], 1),
            wds_over_tfrecord=round(best["wds"] / best["tfrecord"], 3),
        )
    return {
        **out,
        "examples_per_sec": round(rate, 1),
        "per_core": round(rate / cores, 1),
        "cores": cores,
    }


def _input_rate(config, data, batch_size: int, steps: int) -> tuple[float, int, list[int]]:
    """(examples/s, skipped examples, image shape) of `steps` batches from `data`'s source."""
    from clip_jax.data import pipeline

    source = pipeline.make_source(
        data,
        seed=config.seed,
        image_size=config.model.vision.image_size,
        context_length=config.model.text.context_length,
        vocab_size=config.model.text.vocab_size,
        process_index=0,  # this host's input pipeline alone
        process_count=1,
    )
    batches = source.batches(batch_size, slice(0, batch_size))
    for _ in range(WARMUP_BATCHES):
        next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        batch, _ = next(batches)
    elapsed = time.perf_counter() - start
    return steps * batch_size / elapsed, int(source.skipped_examples), list(batch["image"].shape)


def bench_loss_memory(config: ml_collections.ConfigDict, *, batch_size: int, steps: int) -> dict:
    """Temporary bytes per device of loss + gradient, gathered vs chunked, at the global batch."""
    import jax.numpy as jnp

    from clip_jax.parallel import sharding
    from clip_jax.training import losses

    del steps
    batch_size = batch_size or config.batch_size
    mesh = sharding.config_mesh(config.mesh)
    dim = config.model.embed_dim
    rows = sharding.batch_sharding(mesh, 2)
    emb = jax.ShapeDtypeStruct((batch_size, dim), jnp.float32, sharding=rows)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    out = {"what": "loss_memory", "batch_size": batch_size, "devices": jax.device_count()}
    chunk = config.loss.chunk_size or 1024
    for label, c in (("gathered", 0), ("chunked", chunk)):
        fn = losses.make_loss_fn(config.loss.name, mesh, sharding.BATCH_AXES, chunk_size=c)
        grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        memory = grad.lower(emb, emb, scalar, scalar).compile().memory_analysis()
        out[f"{label}_temp_bytes"] = int(memory.temp_size_in_bytes) if memory else None
    out["chunk_size"] = chunk
    return out


def bench_zeroshot(config: ml_collections.ConfigDict, *, batch_size: int, steps: int) -> dict:
    """Zero-shot evaluation's per-batch step (uint8 images normalised on the device, the image
    tower, logits against a 1000-class classifier, top-5) against the image tower's forward alone
    on the same batch, timed alternately; and, end to end, examples per second of the whole
    zero-shot evaluation over JPEG shards (decoding on this host's cores included)."""
    from clip_jax.evals import extract, zeroshot
    from clip_jax.parallel import sharding
    from clip_jax.training import state as state_lib

    batch_size = batch_size or 256
    mesh = sharding.config_mesh(config.mesh)
    spec = state_lib.build(config, mesh)
    model, variables = spec.model, state_lib.variables_of(state_lib.init(spec, 0))
    size = config.model.vision.image_size
    rng = np.random.default_rng(0)
    classifier = rng.standard_normal((config.model.embed_dim, ZEROSHOT_CLASSES), np.float32)
    classifier = extract.replicate(classifier / np.linalg.norm(classifier, axis=0), mesh)
    pixels = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    batch = {
        "image": pixels,
        "mask": np.ones(batch_size, bool),
        "index": np.arange(batch_size, dtype=np.int32),
        "label": np.zeros(batch_size, np.int32),
    }
    batch = {k: extract.shard_rows(v, mesh) for k, v in batch.items()}
    images = extract.shard_rows(np.asarray(extract.normalize(pixels)), mesh)
    predict_fn = zeroshot.make_predict_fn(model, ZEROSHOT_CLASSES)
    zs_step = extract.make_step(predict_fn, mesh, spec.rules)
    tower = jax.jit(lambda v, x: model.apply(v, x, method="encode_image"))
    with jax.set_mesh(mesh):
        runs = {
            "tower": lambda: tower(variables, images),
            "zeroshot": lambda: zs_step(variables, batch, classifier),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        for fn in runs.values():
            for _ in range(WARMUP_BATCHES):
                jax.block_until_ready(fn())
        for _ in range(steps):
            for name, fn in runs.items():  # alternately, so that drift hits both
                t = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - t)
    tower_rate = batch_size / float(np.median(times["tower"]))
    zs_rate = batch_size / float(np.median(times["zeroshot"]))
    return {
        "what": "zeroshot",
        "batch_size": batch_size,
        "devices": jax.device_count(),
        "image_size": size,
        "classes": ZEROSHOT_CLASSES,
        "tower_examples_per_sec": round(tower_rate, 2),
        "zeroshot_examples_per_sec": round(zs_rate, 2),
        "zeroshot_over_tower": round(zs_rate / tower_rate, 4),
        **_zeroshot_end_to_end(config, spec, variables, classifier, batch_size, steps),
    }


def _zeroshot_end_to_end(config, spec, variables, classifier, batch_size, steps) -> dict:
    """Examples per second of `extract.run` with zero-shot over JPEG shards of labelled images."""
    from clip_jax.data.prepare import ShardWriter, make_example
    from clip_jax.data.preprocess import Preprocess
    from clip_jax.evals import data, extract, zeroshot
    from clip_jax.parallel import sharding

    model, mesh = spec.model, spec.mesh
    size = config.model.vision.image_size
    rng = np.random.default_rng(1)
    n = batch_size * steps
    with tempfile.TemporaryDirectory() as tmp:
        jpegs = [smooth_jpeg(rng, round(size * 8 / 7)) for _ in range(DISTINCT_IMAGES)]
        with ShardWriter(tmp, "eval", SHARD_IMAGES // SHARD_FILES) as writer:
            for i in range(n):
                label = int(rng.integers(ZEROSHOT_CLASSES))
                writer.write(make_example(jpegs[i % DISTINCT_IMAGES], "x", f"{i}", label=label))
        source = data.open_source(f"tfrecord:{tmp}/eval-*.tfrecord")
        rows = sharding.local_rows(mesh, batch_size)
        predict_fn = zeroshot.make_predict_fn(model, ZEROSHOT_CLASSES)
        step = extract.make_step(predict_fn, mesh, spec.rules)

        protocol = Preprocess(size)

        def make_batches(start):
            return data.batches(
                source, preprocess=protocol, global_batch=batch_size, rows=rows, start=start
            )

        t0 = time.perf_counter()
        out = extract.run(
            step,
            variables,
            make_batches,
            mesh=mesh,
            global_batch=batch_size,
            total_batches=steps,
            extra=classifier,
        )
        elapsed = time.perf_counter() - t0
    return {"end_to_end_examples_per_sec": round(len(out["top"]) / elapsed, 2)}


def bench_checkpoint(config: ml_collections.ConfigDict, *, batch_size: int, steps: int) -> dict:
    """What a checkpoint costs the training loop: how long `Checkpointer.save` blocks it (the
    device-to-host copy; training reports it as `checkpoint/blocking_seconds`), how long the
    background write takes alone, and a train step alone vs beside a write (the write shares the
    host's cores). `steps` saves, medians reported."""
    import flax.linen as nn

    from clip_jax.parallel import sharding
    from clip_jax.training import checkpoint
    from clip_jax.training import state as state_lib

    batch_size = batch_size or config.batch_size
    mesh = sharding.config_mesh(config.mesh)
    spec = state_lib.build(config, mesh)
    state = state_lib.init(spec, 0)
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    blocked, write, alone, beside = [], [], [], []
    with (
        jax.set_mesh(mesh),
        nn.logical_axis_rules(spec.rules),
        tempfile.TemporaryDirectory() as tmp,
    ):
        batch = random_batch(config, batch_size, mesh)
        compiled, _ = state_lib.compile_train_step(spec, batch_size)

        def step(state):
            t = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            return state, time.perf_counter() - t

        for _ in range(WARMUP_BATCHES):
            state, _ = step(state)
        ckpt = checkpoint.Checkpointer(tmp, keep=2, keep_period=None)
        for i in range(max(1, steps)):
            state, seconds = step(state)
            alone.append(seconds)
            blocked.append(ckpt.save(2 * i + 1, state, {"skipped_examples": 0}))
            t = time.perf_counter()
            ckpt.wait()
            write.append(time.perf_counter() - t)
            blocked.append(ckpt.save(2 * i + 2, state, {"skipped_examples": 0}))
            state, seconds = step(state)  # while that save is written
            beside.append(seconds)
            ckpt.wait()
        ckpt.close()
    return {
        "what": "checkpoint",
        "state_bytes": int(n_bytes),
        "save_blocking_s": round(float(np.median(blocked)), 3),
        "save_blocking_max_s": round(float(np.max(blocked)), 3),
        "background_write_s": round(float(np.median(write)), 2),
        "step_alone_s": round(float(np.median(alone)), 2),
        "step_beside_a_write_s": round(float(np.median(beside)), 2),
        "saves": len(blocked),
        "batch_size": batch_size,
        "devices": jax.device_count(),
    }


ZEROSHOT_CLASSES = 1000  # ImageNet's

MODES = {
    "input": bench_input,
    "train_step": bench_train_step,
    "loss_memory": bench_loss_memory,
    "zeroshot": bench_zeroshot,
    "checkpoint": bench_checkpoint,
    "vs_openclip": bench_vs_openclip,
    "patch_dropout": bench_patch_dropout,
}
