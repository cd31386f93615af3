"""Pod fit without a pod: the real train step compiled ahead of time for a TPU slice, on this
machine, with no TPU (libtpu compiles for devices it only describes).

    python -m clip_jax.aot --config=configs/b16.py --topology=v5e:16x16 [--config.KEY=VALUE ...]
        [--search_batch=4] [--mfu=0.4] [--hlo_out=FILE]

The run is built as training builds it (`state.build` on `config.mesh` laid over the slice's
chips) and its train step is compiled for the global batch `config.batch_size`. Printed: memory
per chip against the chip's HBM and a fits / does-not-fit verdict; the largest global batch that
fits (at most `--search_batch` more compiles); XLA's FLOPs per step and the step time at `--mfu`
of the chips' peak; the collectives of the compiled program with their dtypes and bytes; and the
parameters left replicated although the mesh shards parameters. The last line is one JSON object.

Topologies are libtpu's names, chips per axis: `v5e:16x16` (v5e-256), `v6e:16x16`, `v4:8x8x8`
(v4-1024: 512 chips), `v5p:8x8x8`. Needs libtpu: `pip install "clip-jax-train[aot]"`.
"""

import dataclasses
import importlib.util
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import flags, logging

from clip_jax import chips, cli, paths, sharding, validate
from clip_jax import state as state_lib
from clip_jax.chips import Chip, GiB
from clip_jax.errors import UsageError
from clip_jax.models.flops import train_step_flops

_CONFIG = cli.define_config_flag("Config file, e.g. configs/b16.py.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice as GEN:CHIPS, e.g. v5e:16x16, v4:8x8x8, v5p:8x8x8, v6e:16x16."
)
_SEARCH = flags.DEFINE_integer(
    "search_batch",
    4,
    "At most this many more compiles to find the largest batch that fits (0: no search).",
)
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation the step-time estimate assumes.")
_HLO_OUT = flags.DEFINE_string(
    "hlo_out", "", "Also write the compiled program's text (HLO) of the config's batch here."
)
flags.mark_flags_as_required(["config", "topology"])

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
      largest_collectives (`collectives`); replicated_count and replicated_bytes (every
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
    hlo = first.compiled.as_text() if first.compiled else ""
    if hlo_out:
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
        "replicated_count": len(replicated),
        "replicated_bytes": sum(p["bytes"] for p in replicated),
        "replicated_params": [p for p in replicated if len(p["shape"]) >= 2],
    }


# --- Collectives of the compiled program ------------------------------------------------------

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(ROOT\s+)?%([\w.\-]+)\s*=\s*")
_CALLS = re.compile(
    r"\b(calls|body|condition|to_apply|branch_computations|true_computation|false_computation)"
    r"=(\{[^}]*\}|%[\w.\-]+)"
)
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
_CHAIN = re.compile(r'\bchain_id="(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')  # the JAX operation it came from
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_ARRAY = re.compile(r"\b(pred|bf16|f8e\w+|[fsuc]\d+)\[([\d,]*)\]")
_PARENS = re.compile(r"[()]")
_DTYPE_BYTES = {"pred": 1, "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}


def _closing(text: str, start: int) -> int:
    """The index just past the parenthesis that closes the one at `start`."""
    depth = 0
    for paren in _PARENS.finditer(text, start):
        depth += 1 if paren[0] == "(" else -1
        if depth == 0:
            return paren.end()
    return len(text)


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """The (dtype, dims) of every array in an HLO shape, a tuple's in order."""
    return [(d, tuple(int(n) for n in dims.split(",") if n)) for d, dims in _ARRAY.findall(shape)]


def _nbytes(arrays: list[tuple[str, tuple[int, ...]]]) -> int:
    def itemsize(dtype: str) -> float:
        bits = re.search(r"\d+", dtype)
        return _DTYPE_BYTES.get(dtype, int(bits[0]) / 8 if bits and dtype[0] in "su" else 1)

    return int(sum(itemsize(d) * int(np.prod(dims)) for d, dims in arrays))


class _Instruction(NamedTuple):
    computation: str
    name: str
    shape: str  # its result's
    opcode: str
    args: str  # the text between the opcode's parentheses: operands, or a constant's value
    attributes: str
    root: bool

    @property
    def operands(self) -> list[str]:
        return re.findall(r"%([\w.\-]+)", self.args)


def _instructions(hlo: str) -> Iterator[_Instruction]:
    """Every instruction of an HLO module's text, with the computation it belongs to."""
    computation = ""
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header[1]
            continue
        found = _INSTRUCTION.match(line)
        if not found:
            continue
        rest = line[found.end() :]
        end = _closing(rest, 0) if rest.startswith("(") else rest.find(" ")
        shape, rest = rest[:end], rest[end:].lstrip()
        opcode = re.match(r"[\w\-]+", rest)
        if not opcode or rest[opcode.end() : opcode.end() + 1] != "(":
            continue
        close = _closing(rest, opcode.end())
        args, attributes = rest[opcode.end() + 1 : close - 1], rest[close:]
        yield _Instruction(
            computation, found[2], shape, opcode[0], args, attributes, found[1] != ""
        )


def _executions(calls: dict[str, list[tuple[str, int]]], entry: str) -> dict[str, int]:
    """How often each computation runs per call of `entry`: a while loop's body its trip count
    times (scanned layers), everything else once per call of its caller."""
    callers: dict[str, list[tuple[str, int]]] = {}
    for caller, callees in calls.items():
        for callee, times in callees:
            callers.setdefault(callee, []).append((caller, times))
    memo: dict[str, int] = {entry: 1}

    def runs(name: str) -> int:
        if name not in memo:
            memo[name] = 0  # a cycle, which HLO has not, would count once
            memo[name] = sum(runs(c) * t for c, t in callers.get(name, []))
        return memo[name]

    return {name: runs(name) for name in set(calls) | set(callers)}


def collectives(hlo: str, largest: int = 5) -> dict[str, Any]:
    """The cross-device collectives of a compiled module's text, per step: for each kind (async
    `-start` forms counted once, as the op they start) its count, bytes and dtypes, and the
    `largest` single ones with the JAX operation each came from (`transpose(...)`: the backward
    pass). Bytes are one device's whole buffer: an all-gather's result, the
    operands of the others (a reduce-scatter's input before scattering); a collective inside a
    loop counts once per iteration (XLA's known trip count, else the bound its condition compares
    the counter with, as JAX's scans and fori_loops count from 0)."""
    shapes, calls, found, loops, constants, bounds = {}, {}, [], [], {}, {}
    for ins in _instructions(hlo):
        shapes[ins.name] = ins.shape
        if ins.opcode == "constant" and re.match(r"[su]\d+\[\]", ins.shape):
            constants[ins.name] = int(ins.args) if re.fullmatch(r"-?\d+", ins.args) else None
        if ins.root and ins.opcode == "compare" and "direction=LT" in ins.attributes:
            bounds[ins.computation] = ins.operands  # a loop condition: counter < bound
        roles = _CALLS.findall(ins.attributes)
        if ins.opcode == "while":
            known = _TRIP_COUNT.search(ins.attributes)
            loops.append((ins.computation, dict(roles), int(known[1]) if known else None))
            roles = []
        for _, targets in roles:
            for target in re.findall(r"%([\w.\-]+)", targets):
                calls.setdefault(ins.computation, []).append((target, 1))
        if ins.opcode.removesuffix("-start") in KINDS:
            op_name = _OP_NAME.search(ins.attributes)
            found.append((ins, op_name[1] if op_name else ""))
    for caller, called, known in loops:
        condition, body = called["condition"].lstrip("%"), called["body"].lstrip("%")
        bound = [constants[o] for o in bounds.get(condition, []) if constants.get(o)]
        trips = known or (bound[0] if bound else 1)  # JAX's loops count from 0
        calls.setdefault(caller, []).extend([(body, trips), (condition, trips)])
    entry = re.search(r"^ENTRY\s+%([\w.\-]+)", hlo, re.MULTILINE)
    runs = _executions(calls, entry[1]) if entry else {}
    kinds: dict[str, dict[str, Any]] = {}
    single = []
    # A TPU program may spread one collective over several fusions (async collective fusion:
    # a start and its continuations), each holding a copy that shares its channel and chain ids.
    pieces: dict[tuple, list] = {}
    for ins, op_name in found:
        chain = _CHAIN.search(ins.attributes)
        channel = _CHANNEL.search(ins.attributes)
        key = (ins.opcode, channel[1], chain[1]) if chain and channel else (ins.name,)
        pieces.setdefault(key, []).append((ins, op_name))
    for group in pieces.values():
        ins, op_name = group[0]
        kind = ins.opcode.removesuffix("-start")
        given = [a for op in ins.operands for a in _arrays(shapes.get(op, ""))]
        if kind == "all-gather":  # an async start's result holds its operands, then the results
            buffers = _arrays(ins.shape)[len(given) if ins.opcode.endswith("-start") else 0 :]
        else:
            buffers = given[:1] if kind == "collective-permute" else given
        times = max(runs.get(piece.computation, 1) for piece, _ in group)
        size = _nbytes(buffers)
        entry_of = kinds.setdefault(kind, {"count": 0, "bytes": 0, "dtypes": []})
        entry_of["count"] += times
        entry_of["bytes"] += size * times
        entry_of["dtypes"] = sorted(set(entry_of["dtypes"]) | {d for d, _ in buffers})
        biggest = sorted(buffers, key=lambda a: -_nbytes([a]))[:3]
        text = ", ".join(f"{d}[{','.join(map(str, dims))}]" for d, dims in biggest)
        text += f", ... ({len(buffers)} arrays in all)" if len(buffers) > 3 else ""
        single.append({"kind": kind, "shape": text, "bytes": size, "times": times, "op": op_name})
    single.sort(key=lambda c: -c["bytes"])
    return {"collectives": kinds, "largest_collectives": single[:largest]}


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
    if not r["collectives"]:
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


def main(argv: list[str]) -> None:
    cli.quiet_libraries()
    jax.config.update("jax_platforms", "cpu")  # compiles for the topology; holds no local chip
    # A compile-only executable cannot be read back from XLA's cache: writing it only costs.
    jax.config.update("jax_enable_compilation_cache", False)
    with cli.user_errors():
        cli.no_arguments(argv)
        result = fit_report(
            _CONFIG.value,
            _TOPOLOGY.value,
            search_compiles=_SEARCH.value,
            mfu=_MFU.value,
            hlo_out=_HLO_OUT.value,
        )
    print(describe(result), flush=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    cli.run(main)
