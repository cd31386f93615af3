"""Pod fit without a pod: a run's train step compiled ahead of time for a TPU slice described by
libtpu, on a machine without TPUs, and what the compiled program says: memory per chip against
the chip's HBM, the largest batch that fits, FLOPs and an estimated step time, collectives, and
parameters left replicated. `python -m clip_jax.aot` is its command line.
"""

import dataclasses
import importlib.util
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from clip_jax.infra import paths
from clip_jax.infra.errors import UsageError
from clip_jax.models.flops import train_step_flops
from clip_jax.parallel import sharding
from clip_jax.tools import chips
from clip_jax.tools.chips import Chip, GiB
from clip_jax.tools.hlo import collectives, program_text
from clip_jax.training import state as state_lib
from clip_jax.training import validate

CHIPS = chips.TPUS  # libtpu's generation name -> chips.Chip
HOST_CHIPS = (2, 2, 1)  # chips per host of every generation above (libtpu's chips_per_host_bounds)
TOPOLOGY = re.compile(r"^(v\w+):(\d+(?:x\d+)+)$")


def topology_devices(topology: str) -> tuple[Chip, list[jax.Device]]:
    """The chip and compile-only devices of a TPU slice named like `v5e:16x16` (one device per
    chip); a UsageError for an unknown name, a shape libtpu refuses, or no libtpu."""
    match = TOPOLOGY.match(topology)
    if not match or match.group(1) not in CHIPS:
        raise UsageError(
            f"--topology={topology}: use GEN:CHIPS with GEN one of {', '.join(CHIPS)}, e.g. "
            "v5e:16x16 (2-D for v5e/v6e, 3-D for v4/v5p)"
        )
    if importlib.util.find_spec("libtpu") is None:
        raise UsageError(
            "compiling for a TPU topology needs libtpu: pip install 'clip-jax-train[aot]'"
        )
    from jax.experimental import topologies

    chip = CHIPS[match.group(1)]
    # A deviceless compile holds no TPU, so it may run beside a job (or another compile) that
    # has libtpu loaded.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        described = topologies.get_topology_desc(
            topology,
            "tpu",
            chip_config_name=chip.chip_config,
            chips_per_host_bounds=HOST_CHIPS,
        )
    except jax.errors.JaxRuntimeError as e:
        raise UsageError(f"--topology={topology}: {str(e).splitlines()[0]}") from None
    return chip, list(described.devices)


def memory_per_chip(compiled: Any) -> dict[str, int]:
    """Bytes one chip holds while the step runs, from XLA's memory analysis: the donated state's
    outputs reuse its arguments' buffers (`alias_bytes`), so they count once; the program itself
    lives in HBM too."""
    m = compiled.memory_analysis()
    out = {
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "code_bytes": m.generated_code_size_in_bytes,
    }
    out["per_chip_bytes"] = (
        out["argument_bytes"]
        + out["output_bytes"]
        - out["alias_bytes"]
        + out["temp_bytes"]
        + out["code_bytes"]
    )
    return {k: int(v) for k, v in out.items()}


# The TPU compiler refuses a program whose buffers exceed HBM, naming both sizes.
_OOM = re.compile(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass
class Trial:
    """One compile of the train step at one global batch."""

    batch_size: int
    fits: bool
    memory: dict[str, int]  # memory_per_chip, or what an out-of-memory error said
    seconds: float  # lowering and compiling
    compiled: Any = None  # None when the compiler ran out of memory
    error: str = ""


def compile_at(spec: state_lib.StateSpec, batch_size: int, hbm_bytes: int) -> Trial:
    """The train step lowered and compiled for `batch_size`; running out of HBM is a verdict
    (the compiler's message and the sizes it names), not an error."""
    logging.info("compiling the train step for a global batch of %d", batch_size)
    start = time.perf_counter()
    try:
        compiled = state_lib.lower_train_step(spec, batch_size).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        message = " ".join(str(e).split("\n")[0].split())
        found = _OOM.search(message)
        memory = {}
        if found:
            memory["per_chip_bytes"] = int(float(found[1]) * _UNITS[found[2]])
            memory["compiler_hbm_bytes"] = int(float(found[3]) * _UNITS[found[4]])
        logging.info("batch %d: out of HBM (%s)", batch_size, message)
        return Trial(batch_size, False, memory, time.perf_counter() - start, error=message)
    memory = memory_per_chip(compiled)
    seconds = time.perf_counter() - start
    fits = memory["per_chip_bytes"] <= hbm_bytes
    logging.info(
        "batch %d: %.2f GiB per chip, %s (%.0f s)",
        batch_size,
        memory["per_chip_bytes"] / GiB,
        "fits" if fits else "does not fit",
        seconds,
    )
    return Trial(batch_size, fits, memory, seconds, compiled)


def search_batch(
    fits_at: Callable[[int], Trial], first: Trial, unit: int, compiles: int
) -> list[Trial]:
    """The largest global batch that fits, searched from `first`: doubling (or halving, when
    `first` does not fit) until the verdict changes, then bisection; every size a multiple of
    `unit` (the batch shards times the micro-batches); at most `compiles` calls of `fits_at`."""
    trials = [first]
    lo = first.batch_size if first.fits else 0  # largest known to fit
    hi = None if first.fits else first.batch_size  # smallest known not to fit
    while len(trials) <= compiles:
        if hi is None:
            size = 2 * lo
        elif lo == 0:
            size = max(unit, hi // 2 // unit * unit)
        else:
            size = (lo + hi) // 2 // unit * unit
        if size in (lo, hi) or size >= (hi or np.inf) or size < unit:
            break
        trial = fits_at(size)
        trials.append(trial)
        lo, hi = (size, hi) if trial.fits else (lo, size)
    return trials


def replicated_params(spec: state_lib.StateSpec) -> list[dict[str, Any]]:
    """Parameters that every chip holds whole (their sharding names no mesh axis of more than one
    device), largest first, when the mesh has more than one device on the axes that shard
    parameters ('fsdp', 'tensor'); [] otherwise (data parallelism replicates by design)."""
    if spec.mesh.shape["fsdp"] * spec.mesh.shape["tensor"] == 1:
        return []
    flat = jax.tree_util.tree_flatten_with_path(spec.shardings.params)[0]
    shapes = jax.tree.leaves(spec.abstract.params)
    out = []
    for (path, shard), shape in zip(flat, shapes, strict=True):
        if shard.is_fully_replicated:
            name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            size = int(np.prod(shape.shape)) * shape.dtype.itemsize
            out.append({"path": name, "shape": list(shape.shape), "bytes": size})
    return sorted(out, key=lambda p: -p["bytes"])


def fit_report(
    config: Any, topology: str, *, search_compiles: int, mfu: float, hlo_out: str
) -> dict[str, Any]:
    """Everything `python -m clip_jax.aot` prints, as one JSON-able dict.

    Args:
      config: a training config (`configs/*.py` with overrides); its mesh is laid over the slice.
      topology: the slice, e.g. "v5e:16x16" (`topology_devices`).
      search_compiles: at most this many more compiles to find the largest batch that fits.
      mfu: the utilisation the step-time estimate assumes.
      hlo_out: where to write the compiled program's text ("": nowhere).
    Returns:
      topology, device_kind, chips, mesh, batch_size, batch_per_chip; the memory per chip of
      the config's batch (`memory_per_chip`'s keys; after an out-of-HBM compile only
      per_chip_bytes, the compiler's lower bound, and compiler_hbm_bytes), hbm_bytes, fits,
      compile_error, compile_s; flops_per_step (XLA's count over all chips, which counts a loop
      body once), model_flops_per_step (the architecture's, `models.flops`: what MFU is measured
      against; None for ResNets, whose step time then comes from XLA's count), mfu,
      peak_flops_per_chip, est_step_s (the model FLOPs at `mfu` of the chips' peak);
      max_batch_size and min_batch_not_fitting (None when the search found none) and search
      (each compile's batch_size, fits, per_chip_bytes, compile_s); collectives and
      largest_collectives (`collectives`), collectives_error (why they are missing, "" when
      they are not: `hlo.program_text`); replicated_count and replicated_bytes (every
      parameter each chip holds whole, `replicated_params`) and replicated_params (those of 2+
      dimensions, where the memory goes: vectors such as norms and biases are left out).
    """
    if not 0 < mfu <= 1:
        raise UsageError(f"--mfu={mfu}: use a fraction in (0, 1]")
    if search_compiles < 0:
        raise UsageError(f"--search_batch={search_compiles}: use 0 (no search) or more compiles")
    validate.validate(config)
    chip, devices = topology_devices(topology)
    mesh = sharding.config_mesh(config.mesh, devices=devices)
    sharding.data_shard(mesh, config.batch_size)  # the batch divides over the batch shards
    unit = mesh.shape["data"] * mesh.shape["fsdp"] * config.optim.accum_steps
    if config.batch_size % unit:
        raise UsageError(
            f"batch_size {config.batch_size} does not split into optim.accum_steps="
            f"{config.optim.accum_steps} micro-batches over the mesh's batch shards: use a "
            f"multiple of {unit}"
        )
    spec = state_lib.build(config, mesh)
    first = compile_at(spec, config.batch_size, chip.hbm_bytes)
    hlo, hlo_error = program_text(first.compiled)
    if hlo_out and hlo:
        paths.write_text(hlo_out, hlo)
    trials = search_batch(
        lambda b: compile_at(spec, b, chip.hbm_bytes), first, unit, search_compiles
    )
    fitting = [t.batch_size for t in trials if t.fits]
    failing = [t.batch_size for t in trials if not t.fits]
    flops = state_lib.compiled_flops(first.compiled, mesh.size) if first.compiled else None
    model_flops = train_step_flops(spec.model_config, config.batch_size)
    step_flops = model_flops or flops
    peak = chip.peak_tflops * 1e12 * mesh.size
    replicated = replicated_params(spec)
    return {
        "topology": topology,
        "device_kind": chip.kind,
        "chips": mesh.size,
        "mesh": dict(mesh.shape),
        "batch_size": config.batch_size,
        "batch_per_chip": config.batch_size / mesh.size,
        **first.memory,
        "hbm_bytes": chip.hbm_bytes,
        "fits": first.fits,
        "compile_error": first.error,
        "compile_s": round(first.seconds, 1),
        "flops_per_step": flops,
        "model_flops_per_step": model_flops,
        "mfu": mfu,
        "peak_flops_per_chip": chip.peak_tflops * 1e12,
        "est_step_s": step_flops / (peak * mfu) if step_flops else None,
        "max_batch_size": max(fitting) if len(trials) > 1 and fitting else None,
        "min_batch_not_fitting": min(failing) if failing else None,
        "search": [
            {
                "batch_size": t.batch_size,
                "fits": t.fits,
                "per_chip_bytes": t.memory.get("per_chip_bytes"),
                "compile_s": round(t.seconds, 1),
            }
            for t in trials
        ],
        **collectives(hlo),
        "collectives_error": hlo_error,
        "replicated_count": len(replicated),
        "replicated_bytes": sum(p["bytes"] for p in replicated),
        "replicated_params": [p for p in replicated if len(p["shape"]) >= 2],
    }


# --- Output -----------------------------------------------------------------------------------


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / GiB:.2f}"


def describe(r: dict[str, Any]) -> str:
    """The human-readable report of a `fit_report` result (printed above its JSON line)."""
    mesh = " x ".join(f"{a}={n}" for a, n in r["mesh"].items())
    lines = [
        f"{r['topology']}: {r['chips']} x {r['device_kind']}, mesh {mesh}, global batch "
        f"{r['batch_size']} ({r['batch_per_chip']:g} per chip), compiled in {r['compile_s']} s",
        "",
        "memory per chip (GiB)",
    ]
    if r["compile_error"]:
        lines.append(f"  the compiler ran out of HBM: {r['compile_error']}")
    else:
        rows = [
            ("arguments (state, batch)", r["argument_bytes"]),
            ("outputs", r["output_bytes"]),
            ("aliased (donated state)", -r["alias_bytes"]),
            ("temporaries", r["temp_bytes"]),
            ("program", r["code_bytes"]),
        ]
        lines += [f"  {name:<26}{_gib(n):>8}" for name, n in rows]
    share = f" ({r['per_chip_bytes'] / r['hbm_bytes']:.0%})" if r.get("per_chip_bytes") else ""
    verdict = "fits" if r["fits"] else "does NOT fit"
    total = "at least (the compiler's)" if r["compile_error"] else "total live"
    lines.append(
        f"  {total:<26}{_gib(r.get('per_chip_bytes')):>8}  of {_gib(r['hbm_bytes'])} "
        f"HBM{share}: {verdict}"
    )
    if len(r["search"]) > 1:
        best, over = r["max_batch_size"], r["min_batch_not_fitting"]
        lines += [
            "",
            f"largest global batch that fits: {best or 'none found'}"
            + (
                f" ({over} does not)"
                if over
                else " (larger sizes untried: --search_batch allows more compiles)"
            ),
        ]
        lines += [
            f"  batch {t['batch_size']:>8}: {_gib(t['per_chip_bytes']):>6} GiB per chip, "
            f"{'fits' if t['fits'] else 'does not fit'} ({t['compile_s']} s)"
            for t in r["search"]
        ]
    if r["est_step_s"]:
        model = r["model_flops_per_step"]
        lines += [
            "",
            f"FLOPs per step, all chips: {model or 0:.3e} of the model, "
            f"{r['flops_per_step'] or 0:.3e} by XLA (a loop body counted once); at MFU "
            f"{r['mfu']:g} of {r['peak_flops_per_chip'] / 1e12:g} TFLOP/s per chip: "
            f"{r['est_step_s']:.3g} s per step",
        ]
    lines += ["", "collectives per step (kind, count, dtypes, GiB per chip)"]
    for kind, c in r["collectives"].items():
        lines.append(f"  {kind:<20}{c['count']:>6}  {','.join(c['dtypes']):<16} {_gib(c['bytes'])}")
    lines += [
        f"  largest: {c['kind']} {c['shape']} ({c['bytes'] / 2**20:.1f} MiB, x{c['times']}) "
        f"from {c['op'] or '?'}"
        for c in r["largest_collectives"]
    ]
    if r["collectives_error"]:
        lines.append(
            f"  unknown: the compiled program cannot be printed ({r['collectives_error']})"
        )
    elif not r["collectives"]:
        lines.append("  none")
    lines.append("")
    if r["mesh"]["fsdp"] * r["mesh"]["tensor"] == 1:
        lines.append("replicated parameters: all (no fsdp or tensor axis to shard them over)")
    else:
        lines.append(
            f"replicated parameters: {r['replicated_count']}, "
            f"{r['replicated_bytes'] / 2**20:.1f} MiB on every chip; of 2+ dimensions: "
            f"{len(r['replicated_params']) or 'none'}"
        )
        lines += [
            f"  {p['path']} {p['shape']} ({p['bytes'] / 2**20:.2f} MiB)"
            for p in r["replicated_params"][:10]
        ]
    return "\n".join(lines)
