"""The train-step benchmarks of `clip_jax.benchmark` (train_step, patch_dropout, vs_openclip),
and what its other modes share with them: random batches laid on the mesh, warm-up, timing.
Defines the flags only these modes read, `--openclip_model` and `--peak_tflops`.
"""

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging

from clip_jax.infra.errors import UsageError
from clip_jax.tools import chips, openclip_peer

_OPENCLIP_MODEL = flags.DEFINE_string(
    "openclip_model", "", "--what=vs_openclip: open_clip's name of the config's model (ViT-B-32)."
)
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak FLOP/s per device for MFU (0: known chips).")

WARMUP_BATCHES = 3  # calls before timing: compile, allocate


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


FAULTS_HINT = 25_000  # minor page faults per step (100 MB of 4 KiB pages) worth a hint


def minor_faults() -> int:
    """This process's minor page faults so far (all threads); 0 where not reported."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def fault_report(faults_per_step: float) -> dict:
    """The page faults of a CPU step, and a hint (logged) when glibc's defaults cause many: XLA
    allocates the step's temporaries afresh every call, and glibc maps large blocks from worker
    threads with mmap and unmaps them on free, so every page is faulted in again each step.
    The hint is for one CPU device (a real CPU run): with many forced devices, one arena shared
    by all their threads costs more than the faults."""
    from clip_jax.infra import allocator

    tunables = os.environ.get("GLIBC_TUNABLES", "")
    one_cpu = jax.default_backend() == "cpu" and jax.local_device_count() == 1
    tuned = allocator.status.startswith("one arena") or "glibc.malloc" in tunables
    if faults_per_step > FAULTS_HINT and one_cpu and not tuned:
        logging.warning(
            "%d page faults a step (XLA's temporaries mapped afresh each call): the allocator "
            'kept %s; see docs/performance.md, "Page faults"',
            faults_per_step,
            allocator.status,
        )
    return {
        "minor_faults_per_step": int(round(faults_per_step)),
        "allocator": allocator.status,
        "glibc_tunables": tunables,
    }


def _peak_flops() -> float | None:
    """Peak FLOP/s per device for MFU: `--peak_tflops`, else the chip's (`clip_jax.tools.chips`)."""
    if _PEAK.value > 0:
        return _PEAK.value * 1e12
    peak = chips.peak_tflops(jax.devices()[0].device_kind)
    return None if peak is None else peak * 1e12


def random_batch(config, batch_size: int, mesh) -> dict:
    from clip_jax.parallel import sharding

    rng = np.random.default_rng(0)
    size, length = config.model.vision.image_size, config.model.text.context_length
    tokens = rng.integers(1, config.model.text.vocab_size - 1, (batch_size, length))
    tokens[:, -1] = config.model.text.vocab_size - 1  # an end token for argmax pooling
    return jax.device_put(
        {
            "image": rng.integers(0, 256, (batch_size, size, size, 3), np.uint8),
            "text": tokens.astype(np.int32),
        },
        {"image": sharding.batch_sharding(mesh, 4), "text": sharding.batch_sharding(mesh, 2)},
    )


def bench_train_step(config: ml_collections.ConfigDict, *, batch_size: int, steps: int) -> dict:
    """Pairs per second of the whole jitted train step (both towers, loss, backward, AdamW) on
    all devices, its FLOPs from XLA's cost analysis, and MFU where the chip's peak is known."""
    import flax.linen as nn

    from clip_jax.models.flops import train_step_flops
    from clip_jax.parallel import sharding
    from clip_jax.training import state as state_lib

    batch_size = batch_size or config.batch_size
    mesh = sharding.config_mesh(config.mesh)
    spec = state_lib.build(config, mesh)
    state = state_lib.init(spec, 0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(spec.rules):
        batch = random_batch(config, batch_size, mesh)
        t0 = time.perf_counter()
        compiled, xla_flops = state_lib.compile_train_step(spec, batch_size)  # training's step
        compile_s = time.perf_counter() - t0
        for _ in range(WARMUP_BATCHES):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times, faults = [], []
        for _ in range(steps):
            t, before = time.perf_counter(), minor_faults()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
            faults.append(minor_faults() - before)
        # A step's faults as its time: the median, which a one-time growth of the heap after
        # the warm-up (it comes later when the cores are busy) leaves out, as vs_openclip's does.
        faults = float(np.median(faults))
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
        **fault_report(faults),
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

    from clip_jax.models.vit import patches_kept
    from clip_jax.parallel import sharding
    from clip_jax.training import state as state_lib

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
        batch = random_batch(config, batch_size, mesh)
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
        out[n] = (lambda f=f, a=a: seconds(lambda: f(a)), 2.0 * n**3)
    return out


def seconds(fn) -> float:
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

    from clip_jax.models.flops import train_step_flops
    from clip_jax.parallel import sharding
    from clip_jax.training import state as state_lib

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
            batch = random_batch(config, batch_size, mesh)
            compiled, xla_flops = state_lib.compile_train_step(spec, batch_size)

            def step():
                nonlocal state
                state, metrics = compiled(state, batch)
                return metrics

            faults: list[int] = []

            def ours() -> float:
                before = minor_faults()
                t = seconds(step)
                faults.append(minor_faults() - before)
                return t

            matmuls = _matmul_rates()
            runs = {"clip_jax": ours, "open_clip": peer.step}
            runs.update({f"matmul_{n}": call for n, (call, _) in matmuls.items()})
            times: dict[str, list[float]] = {k: [] for k in runs}
            for fn in runs.values():  # warm-up: compile, allocate
                for _ in range(WARMUP_BATCHES - 1):
                    fn()
            del faults[:]  # the warm-up's first touches
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
        **fault_report(float(np.median(faults))),
    }
