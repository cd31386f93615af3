"""Benchmarks; each prints one JSON object as its last line.

    python -m clip_jax.benchmark --what=input --config=configs/b32.py \
        [--config.train_data.source=tfrecord:GLOB] [--batch_size=256] [--steps=20]
    python -m clip_jax.benchmark --what=train_step --config=configs/b32.py --batch_size=16
    python -m clip_jax.benchmark --what=loss_memory --config=configs/b16.py --batch_size=8192
    python -m clip_jax.benchmark --what=zeroshot --config=configs/b32.py --batch_size=64
    python -m clip_jax.benchmark --what=checkpoint --config=configs/b16.py:smoke --steps=3
    python -m clip_jax.benchmark --what=patch_dropout --config=configs/b16.py --batch_size=8 \
        --config.model.dtype=float32 --steps=5

Modes (`MODES`, one function each, `fn(config, *, batch_size, steps) -> dict`):
- train_step: pairs per second of the full step on all devices, FLOPs and MFU (where the chip's
  peak is known or given by --peak_tflops), on random data already on the devices.
- loss_memory: temporary bytes per device of the loss and its gradient, gathered vs chunked.
- zeroshot: zero-shot evaluation's per-batch step against the image tower's forward alone on the
  same batch (their ratio), and the whole zero-shot evaluation end to end over JPEG shards.
- input: decoded, augmented, tokenized examples per second of the training input pipeline at the
  config's resolution, on this host's CPU cores. With `train_data.source` synthetic or empty
  it first writes temporary JPEG shards (random smooth images stored at 8/7 of the resolution,
  256 px for 224, as img2dataset stores them; captions of 5 to 20 random words) and reads those.
- checkpoint: how long a save blocks the training loop (the device-to-host copy), how long its
  background write takes alone, and a train step alone vs beside a write.
- patch_dropout: FLIP's speed-up, the image tower's forward and backward and the whole train
  step without and with `model.patch_dropout` (0.5 when the config has 0), timed alternately.
- vs_openclip: the train step against open_clip's (PyTorch, `--openclip_model`) on the same
  model, batch and CPU, and against this machine's best float32 matmul rate, timed alternately
  in one process; their ratio and the fraction of the matmul rate the step reaches, in one line.

    python -m clip_jax.benchmark --what=vs_openclip --config=configs/b32.py \
        --config.model.dtype=float32 --batch_size=16 --openclip_model=ViT-B-32 --steps=5

MFU counts the architecture's FLOPs (`models.flops`: forward x 3, 2 per multiply-add); XLA's
cost analysis is shown beside it (it misses GPU library calls, and counts what a backend adds).
"""

import io
import json
import os
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from PIL import Image

from clip_jax import chips, cli, openclip_peer
from clip_jax.errors import UsageError

_CONFIG = cli.define_config_flag("Config file, e.g. configs/b32.py.")
_WHAT = flags.DEFINE_string("what", "input", "What to measure: one of MODES.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Examples per batch (0: the mode's default).")
_STEPS = flags.DEFINE_integer("steps", 20, "Batches timed, after a warm-up.")
_OPENCLIP_MODEL = flags.DEFINE_string(
    "openclip_model", "", "--what=vs_openclip: open_clip's name of the config's model (ViT-B-32)."
)
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak FLOP/s per device for MFU (0: known chips).")
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
        if data.source in ("", "synthetic"):  # no files given: made-up JPEGs to decode
            data.source = write_jpeg_shards(tmp, size, config.seed)
        source = pipeline.make_source(
            data,
            seed=config.seed,
            image_size=size,
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


def _peak_flops() -> float | None:
    """Peak FLOP/s per device for MFU: `--peak_tflops`, else the chip's (`clip_jax.chips`)."""
    if _PEAK.value > 0:
        return _PEAK.value * 1e12
    peak = chips.peak_tflops(jax.devices()[0].device_kind)
    return None if peak is None else peak * 1e12


def _random_batch(config, batch_size: int, mesh) -> dict:
    from clip_jax import sharding

    rng = np.random.default_rng(0)
    size, length = config.model.vision.image_size, config.model.text.context_length
    tokens = rng.integers(1, config.model.text.vocab_size - 1, (batch_size, length))
    tokens[:, -1] = config.model.text.vocab_size - 1  # an end token for argmax pooling
    return jax.device_put(
        {
            "image": rng.standard_normal((batch_size, size, size, 3), np.float32),
            "text": tokens.astype(np.int32),
        },
        {"image": sharding.batch_sharding(mesh, 4), "text": sharding.batch_sharding(mesh, 2)},
    )


def bench_train_step(config: ml_collections.ConfigDict, *, batch_size: int, steps: int) -> dict:
    """Pairs per second of the whole jitted train step (both towers, loss, backward, AdamW) on
    all devices, its FLOPs from XLA's cost analysis, and MFU where the chip's peak is known."""
    import flax.linen as nn

    from clip_jax import sharding
    from clip_jax import state as state_lib
    from clip_jax.models.flops import train_step_flops

    batch_size = batch_size or config.batch_size
    mesh = sharding.config_mesh(config.mesh)
    spec = state_lib.build(config, mesh)
    state = state_lib.init(spec, 0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(spec.rules):
        batch = _random_batch(config, batch_size, mesh)
        t0 = time.perf_counter()
        compiled, xla_flops = state_lib.compile_train_step(spec, batch_size)  # training's step
        compile_s = time.perf_counter() - t0
        for _ in range(WARMUP_BATCHES):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    peak = _peak_flops()
    model_flops = train_step_flops(spec.model_config, batch_size)
    flops = model_flops or xla_flops or 0.0
    return {
        "what": "train_step",
        "pairs_per_sec": round(batch_size / step_s, 2),
        "step_s": round(step_s, 4),
        "batch_size": batch_size,
        "devices": mesh.size,
        "device_kind": jax.devices()[0].device_kind,
        "dtype": config.model.dtype,
        "compile_s": round(compile_s, 1),
        "flops_per_step": flops,  # the architecture's (XLA's for a ResNet)
        "model_flops_per_step": model_flops,
        "xla_flops_per_step": xla_flops,
        "mfu": round(flops / step_s / (peak * mesh.size), 4) if peak and flops else None,
        "xla_mfu": round(xla_flops / step_s / (peak * mesh.size), 4)
        if peak and xla_flops
        else None,
        "loss": float(metrics["loss"]),
    }


def bench_loss_memory(config: ml_collections.ConfigDict, *, batch_size: int, steps: int) -> dict:
    """Temporary bytes per device of loss + gradient, gathered vs chunked, at the global batch."""
    import jax.numpy as jnp

    from clip_jax import losses, sharding

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
    from clip_jax import sharding
    from clip_jax import state as state_lib
    from clip_jax.evals import extract, zeroshot

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
    from clip_jax import sharding
    from clip_jax.data.prepare import ShardWriter, make_example
    from clip_jax.evals import data, extract, zeroshot

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

        def make_batches(start):
            return data.batches(
                source, image_size=size, global_batch=batch_size, rows=rows, start=start
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

    from clip_jax import checkpoint, sharding
    from clip_jax import state as state_lib

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
        batch = _random_batch(config, batch_size, mesh)
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


PATCH_DROPOUT = 0.5  # what --what=patch_dropout measures when the config has none (FLIP's)


def bench_patch_dropout(config: ml_collections.ConfigDict, *, batch_size: int, steps: int) -> dict:
    """What FLIP's patch dropout buys: the image tower's training forward and backward (the
    gradient of its embeddings' sum w.r.t. its parameters, train=True), and the whole train step
    (`state.build` + `state.compile_train_step`, the step training runs), each without patch
    dropout and with the config's `model.patch_dropout` (`PATCH_DROPOUT` if it has 0), timed
    alternately in one run so that drift hits both; medians and the ratios without / with."""
    import flax.linen as nn
    import jax.numpy as jnp

    from clip_jax import sharding
    from clip_jax import state as state_lib
    from clip_jax.models.vit import patches_kept

    batch_size = batch_size or config.batch_size
    p = config.model.patch_dropout or PATCH_DROPOUT
    mesh = sharding.config_mesh(config.mesh)
    specs, states, steps_fns, towers = {}, {}, {}, {}
    for label, value in (("without", 0.0), ("with", p)):
        variant = ml_collections.ConfigDict(config.to_dict())
        variant.model.patch_dropout = value
        specs[label] = state_lib.build(variant, mesh)
        states[label] = state_lib.init(specs[label], 0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(specs["without"].rules):
        batch = _random_batch(config, batch_size, mesh)
        key = jax.random.key(0)
        for label, spec in specs.items():
            steps_fns[label], _ = state_lib.compile_train_step(spec, batch_size)

            def embed_sum(visual, params, images, key, model=spec.model):
                emb = model.apply(
                    {"params": {**params, "visual": visual}},
                    images,
                    train=True,
                    method="encode_image",
                    rngs={"dropout": key},
                )
                return jnp.sum(emb)

            towers[label] = jax.jit(jax.value_and_grad(embed_sum))

        def run_tower(label):
            params = states[label].params
            return towers[label](params["visual"], params, batch["image"], key)

        def run_step(label):
            states[label], metrics = steps_fns[label](states[label], batch)
            return metrics

        runs = {
            f"{what}_{label}": (fn, label)
            for what, fn in (("tower", run_tower), ("step", run_step))
            for label in specs
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for fn, label in runs.values():
            for _ in range(WARMUP_BATCHES):
                jax.block_until_ready(fn(label))
        for _ in range(steps):
            for name, (fn, label) in runs.items():  # alternately, so that drift hits all four
                t = time.perf_counter()
                jax.block_until_ready(fn(label))
                times[name].append(time.perf_counter() - t)
    median = {name: float(np.median(t)) for name, t in times.items()}
    patches = (config.model.vision.image_size // config.model.vision.patch_size) ** 2
    return {
        "what": "patch_dropout",
        "patch_dropout": p,
        "tokens_without": 1 + patches,
        "tokens_with": 1 + patches_kept(patches, p),
        "batch_size": batch_size,
        "devices": mesh.size,
        "dtype": config.model.dtype,
        "steps": steps,
        **{f"{name}_s": round(s, 4) for name, s in median.items()},
        "tower_speedup": round(median["tower_without"] / median["tower_with"], 3),
        "step_speedup": round(median["step_without"] / median["step_with"], 3),
        "step_pairs_per_sec_without": round(batch_size / median["step_without"], 2),
        "step_pairs_per_sec_with": round(batch_size / median["step_with"], 2),
    }


MATMUL_SIZES = (1024, 2048, 3072)


def _matmul_rates() -> dict[int, Any]:
    """XLA's float32 square matmuls of `MATMUL_SIZES`, jitted: {n: (timed call, flops)}, each
    call returning its seconds."""
    import jax.numpy as jnp

    out = {}
    for n in MATMUL_SIZES:
        a = jnp.asarray(np.random.default_rng(n).standard_normal((n, n), np.float32))
        f = jax.jit(lambda x: x @ x)
        out[n] = (lambda f=f, a=a: _seconds(lambda: f(a)), 2.0 * n**3)
    return out


def _seconds(fn) -> float:
    """How long `fn()` takes, its results computed."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def bench_vs_openclip(config: ml_collections.ConfigDict, *, batch_size: int, steps: int) -> dict:
    """clip_jax's train step against open_clip's on the same model, batch and CPU, and against
    the best matmul rate of this machine, timed alternately (rounds of one step of each and one
    of each matmul, so that drift and load hit all alike; medians). The peer runs in a process
    of its own (`openclip_peer.Peer`), never at the same time as this one.

    Model FLOPs are the architecture's (`models.flops`, forward x 3), XLA's count beside them;
    `mfu_of_matmul` is the step's model FLOP/s over the fastest matmul's FLOP/s.
    """
    import flax.linen as nn

    from clip_jax import sharding
    from clip_jax import state as state_lib
    from clip_jax.models.flops import train_step_flops

    if not _OPENCLIP_MODEL.value:
        raise UsageError("--what=vs_openclip needs --openclip_model, e.g. ViT-B-32")
    batch_size = batch_size or config.batch_size
    mesh = sharding.config_mesh(config.mesh)
    spec = state_lib.build(config, mesh)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(spec.abstract.params))
    size, length = config.model.vision.image_size, config.model.text.context_length
    peer = openclip_peer.Peer(_OPENCLIP_MODEL.value, batch_size, size, length, cpu_cores())
    try:
        if abs(params - peer.parameters) > 1e-3 * peer.parameters:
            raise UsageError(
                f"the config's model has {params:,} parameters, open_clip's "
                f"{_OPENCLIP_MODEL.value} {peer.parameters:,}: compare the same model"
            )
        state = state_lib.init(spec, 0)
        with jax.set_mesh(mesh), nn.logical_axis_rules(spec.rules):
            batch = _random_batch(config, batch_size, mesh)
            compiled, xla_flops = state_lib.compile_train_step(spec, batch_size)

            def step():
                nonlocal state
                state, metrics = compiled(state, batch)
                return metrics

            def ours() -> float:
                return _seconds(step)

            matmuls = _matmul_rates()
            runs = {"clip_jax": ours, "open_clip": peer.step}
            runs.update({f"matmul_{n}": call for n, (call, _) in matmuls.items()})
            times: dict[str, list[float]] = {k: [] for k in runs}
            for fn in runs.values():  # warm-up: compile, allocate
                for _ in range(WARMUP_BATCHES - 1):
                    fn()
            for _ in range(steps):
                for name, fn in runs.items():
                    times[name].append(fn())
    finally:
        peer.close()
    median = {k: float(np.median(v)) for k, v in times.items()}
    model_flops = train_step_flops(spec.model_config, batch_size)
    flops = model_flops or xla_flops or 0.0
    matmul = {n: f / median[f"matmul_{n}"] for n, (_, f) in matmuls.items()}
    best = max(matmul.values())
    ours_rate, peer_rate = batch_size / median["clip_jax"], batch_size / median["open_clip"]
    return {
        "what": "vs_openclip",
        "model": _OPENCLIP_MODEL.value,
        "batch_size": batch_size,
        "dtype": config.model.dtype,
        "devices": mesh.size,
        "cores": cpu_cores(),
        "rounds": steps,
        "clip_jax_pairs_per_sec": round(ours_rate, 3),
        "open_clip_pairs_per_sec": round(peer_rate, 3),
        "ratio": round(ours_rate / peer_rate, 3),
        "clip_jax_step_s": round(median["clip_jax"], 4),
        "open_clip_step_s": round(median["open_clip"], 4),
        "model_flops_per_step": model_flops,
        "xla_flops_per_step": xla_flops,
        "model_tflops_per_sec": round(flops / median["clip_jax"] / 1e12, 4),
        "matmul_tflops_per_sec": {str(n): round(r / 1e12, 4) for n, r in matmul.items()},
        "mfu_of_matmul": round(flops / median["clip_jax"] / best, 4),
        "parameters": params,
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


def main(argv: list[str]) -> None:
    with cli.user_errors():
        cli.no_arguments(argv)
        if _WHAT.value not in MODES:
            raise UsageError(f"--what={_WHAT.value}: choose one of {sorted(MODES)}")
        result = MODES[_WHAT.value](_CONFIG.value, batch_size=_BATCH.value, steps=_STEPS.value)
    logging.info("%s", result)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    cli.run(main)
