"""Reading a compiled XLA program's text (HLO): its cross-device collectives per step.

`program_text(compiled)` is a compiled program's text (or why there is none); `collectives(hlo)`
is what `clip_jax.aot` reports for a TPU program and what the docs' tables of collectives were
counted with: each kind's count, bytes and dtypes, a collective inside a loop counted once per
iteration, an async collective spread over several fusions counted once. `instructions` and
`arrays` read any HLO text.
"""

import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

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
# libtpu's reduce-scatter written as an all-reduce and a slice inside a fusion that runs as one
# reduce-scatter (`"emitter":"SingleInputAllReduceScatterFusion"` or `"AllReduceScatterFusion"`).
_REDUCE_SCATTER_FUSION = re.compile(r'"emitter":"\w*AllReduceScatterFusion"')
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


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """The (dtype, dims) of every array in an HLO shape, a tuple's in order."""
    return [(d, tuple(int(n) for n in dims.split(",") if n)) for d, dims in _ARRAY.findall(shape)]


def _nbytes(buffers: list[tuple[str, tuple[int, ...]]]) -> int:
    def itemsize(dtype: str) -> float:
        bits = re.search(r"\d+", dtype)
        return _DTYPE_BYTES.get(dtype, int(bits[0]) / 8 if bits and dtype[0] in "su" else 1)

    return int(sum(itemsize(d) * int(np.prod(dims)) for d, dims in buffers))


class Instruction(NamedTuple):
    """One HLO instruction as its text gives it."""

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


def instructions(hlo: str) -> Iterator[Instruction]:
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
        yield Instruction(computation, found[2], shape, opcode[0], args, attributes, found[1] != "")


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
    pass). An all-reduce that libtpu fused with a slice into one reduce-scatter is counted as
    the reduce-scatter it runs as. Bytes are one device's whole buffer: an all-gather's result, the
    operands of the others (a reduce-scatter's input before scattering); a collective inside a
    loop counts once per iteration (XLA's known trip count, else the bound its condition compares
    the counter with, as JAX's scans and fori_loops count from 0)."""
    shapes, calls, found, loops, constants, bounds = {}, {}, [], [], {}, {}
    scatters: set[str] = set()  # computations that run as a reduce-scatter
    for ins in instructions(hlo):
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
        if ins.opcode == "fusion" and _REDUCE_SCATTER_FUSION.search(ins.attributes):
            scatters.update(re.findall(r"calls=%([\w.\-]+)", ins.attributes))
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
        if kind == "all-reduce" and ins.computation in scatters:
            kind = "reduce-scatter"
        given = [a for op in ins.operands for a in arrays(shapes.get(op, ""))]
        if kind == "all-gather":  # an async start's result holds its operands, then the results
            buffers = arrays(ins.shape)[len(given) if ins.opcode.endswith("-start") else 0 :]
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


def program_text(compiled: Any) -> tuple[str, str]:
    """The compiled program's text (HLO), and why it is missing: libtpu 0.0.52 cannot print
    some programs it compiles (v5p's L/14 at data=2 x fsdp=256 fails a RET_CHECK on an async
    instruction), which costs the report its collectives, not its memory and verdict."""
    if compiled is None:
        return "", ""
    try:
        return compiled.as_text(), ""
    except jax.errors.JaxRuntimeError as e:
        reason = " ".join(str(e).split())[:300]
        logging.warning("the compiled program cannot be printed, so no collectives: %s", reason)
        return "", reason
