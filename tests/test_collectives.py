"""FSDP as it is compiled: the train step's collectives counted on 8 CPU devices.

Parameters split over 'fsdp' must be all-gathered (in the compute dtype) where they are used and
their gradients reduce-scattered back (in float32), never all-reduced at full size; the loss
gathers the embeddings forward and moves none of their gradients backward. Read from the
compiled HLO (what runs) and from the lowered StableHLO (the dtypes asked for: the CPU backend
computes bfloat16 collectives in float32, so its compiled dtypes say nothing about a TPU's).
"""

import math
import re

import jax
import numpy as np
import pytest

from clip_jax.parallel import sharding
from clip_jax.training import state as state_lib
from tests.conftest import tiny_config

# Sizes that no activation of a batch of 16 shares with a parameter: widths 48 and 32, joint
# space 40, 12 text positions, 17 image positions.
DISTINCT = {
    "batch_size": 16,
    "model.embed_dim": 40,
    "model.vision.width": 48,
    "model.text.context_length": 12,
    "model.dtype": "bfloat16",
}
OPS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(d, tuple(int(n) for n in s.split(",") if n)) for d, s in _ARRAY.findall(text)]


def _group_size(line: str) -> int:
    """Devices in each replica group of a collective's HLO line."""
    explicit = re.search(r"replica_groups=\{(\{[\d,]*\})", line)
    if explicit:
        return len(explicit.group(1).strip("{}").split(","))
    iota = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", iota.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", iota.group(2)))


def compiled_collectives(hlo: str) -> list[dict]:
    """Every collective of a compiled module that moves data: kind, result arrays, operands."""
    out = []
    for line in hlo.splitlines():
        m = re.search(r"=\s+(.*?)\s+(" + "|".join(OPS) + r")(?:-start)?\((.*)", line)
        if not m or "replica_groups" not in line or _group_size(line) < 2:
            continue
        out.append({"kind": m.group(2), "result": _arrays(m.group(1)), "line": line})
    return out


def lowered_collectives(text: str) -> list[dict]:
    """Collectives of a lowered StableHLO module: kind, operand and result arrays."""
    out = []
    for m in re.finditer(r'"stablehlo\.(all_gather|reduce_scatter|all_reduce)"', text):
        # The op's signature `: (tensor<...>) -> tensor<...>` closes its (possibly multi-line)
        # region, if any: the first `) -> ` after it.
        tail = text[m.end() :]
        sig = re.search(r":\s*\((tensor<[^)]*)\)\s*->\s*(\(?tensor<[^\n]*)", tail)
        operands = re.findall(r"tensor<([\dx]*)x?(\w+)>", sig.group(1))
        results = re.findall(r"tensor<([\dx]*)x?(\w+)>", sig.group(2))
        out.append(
            {
                "kind": m.group(1),
                "operands": [(d, _dims(s)) for s, d in operands],
                "results": [(d, _dims(s)) for s, d in results],
            }
        )
    return out


def _dims(s: str) -> tuple[int, ...]:
    return tuple(int(n) for n in s.split("x") if n)


def _split_params(spec) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(path, full shape, shard shape) of every parameter of 2+ dims split over 'fsdp'."""
    out = []
    fsdp = spec.mesh.shape["fsdp"]
    flat_shapes = jax.tree_util.tree_flatten_with_path(spec.abstract.params)[0]
    flat_specs = jax.tree.leaves(spec.shardings.params)
    for (path, leaf), s in zip(flat_shapes, flat_specs, strict=True):
        axes = tuple(s.spec) + (None,) * (leaf.ndim - len(s.spec))
        dims = [i for i, a in enumerate(axes) if "fsdp" in sharding.as_axes(a)]
        if leaf.ndim >= 2 and dims:
            shard = list(leaf.shape)
            shard[dims[0]] //= fsdp
            out.append((jax.tree_util.keystr(path), tuple(leaf.shape), tuple(shard)))
    return out


@pytest.fixture(scope="module", params=[(1, 8), (2, 4)], ids=["fsdp8", "data2-fsdp4"])
def step(request):
    data, fsdp = request.param
    config = tiny_config(**DISTINCT, **{"mesh.data": data, "mesh.fsdp": fsdp})
    spec = state_lib.build(config, sharding.config_mesh(config.mesh))
    lowered = state_lib.lower_train_step(spec, config.batch_size)
    return spec, config, lowered.as_text(), lowered.compile().as_text()


def test_fsdp_gathers_parameters_and_reduce_scatters_their_gradients(step):
    spec, _, _, hlo = step
    ops = compiled_collectives(hlo)
    gathered = {shape for op in ops if op["kind"] == "all-gather" for _, shape in op["result"]}
    scattered = {shape for op in ops if op["kind"] == "reduce-scatter" for _, shape in op["result"]}
    reduced = {shape for op in ops if op["kind"] == "all-reduce" for _, shape in op["result"]}
    params = _split_params(spec)
    assert len(params) >= 20, params  # every kernel and embedding of both towers
    for path, full, shard in params:
        assert full in gathered, f"{path} {full} is never all-gathered"
        assert shard in scattered, f"{path}'s gradient {shard} is never reduce-scattered"
        assert full not in reduced, f"{path}'s gradient is all-reduced at full size {full}"


def test_gradients_are_reduced_in_float32_and_parameters_gathered_in_bfloat16(step):
    spec, _, lowered, _ = step
    ops = lowered_collectives(lowered)
    full_shapes = {full for _, full, _ in _split_params(spec)}
    param_gathers = [
        op for op in ops if op["kind"] == "all_gather" and op["results"][0][1] in full_shapes
    ]
    assert len(param_gathers) >= len(full_shapes), "a split parameter is gathered implicitly"
    assert {op["results"][0][0] for op in param_gathers} == {"bf16"}
    reductions = [op for op in ops if op["kind"] in ("reduce_scatter", "all_reduce")]
    assert reductions
    for op in reductions:
        dtypes = {d for d, _ in op["operands"] if d.startswith(("f", "bf"))}
        assert dtypes <= {"f32"}, op


def test_the_loss_moves_embeddings_forward_only(step):
    # Forward: both embedding sets all-gathered, and each row's log-sum-exp (N floats for each
    # direction). Backward: each device's rows get their gradients from the blocks it holds, so
    # no collective carries an embedding-sized gradient (autodiff through the gathers would
    # reduce-scatter two, which libtpu writes as full all-reduces).
    spec, config, _, hlo = step
    n, e = config.batch_size, config.model.embed_dim
    local = n // (spec.mesh.shape["data"] * spec.mesh.shape["fsdp"])
    ops = compiled_collectives(hlo)
    gathered = [array for op in ops if op["kind"] == "all-gather" for array in op["result"]]
    assert gathered.count(("f32", (n, e))) == 2, gathered  # image, text
    assert gathered.count(("f32", (n,))) == 2, gathered  # their rows' log-sum-exps
    for op in ops:
        if op["kind"] in ("reduce-scatter", "all-reduce"):
            moved = {("f32", (local, e)), ("f32", (n, e))} & set(op["result"])
            assert not moved, op["line"][:200]


def test_fsdp_gives_the_data_parallel_gradients():
    """The same loss and gradients (float32) with the batch over 'data', over 'fsdp', and over
    data x fsdp x tensor."""
    import flax.linen as nn

    from clip_jax.training import losses
    from clip_jax.training.train_step import make_loss_and_grad

    out = []
    for mesh_cfg in (
        {"mesh.data": 8},
        {"mesh.data": 1, "mesh.fsdp": 8},
        {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
    ):
        config = tiny_config(**{**DISTINCT, "model.dtype": "float32"}, **mesh_cfg)
        spec = state_lib.build(config, sharding.config_mesh(config.mesh))
        train_state = state_lib.init(spec, 0)
        rng = np.random.default_rng(0)
        images = rng.standard_normal((16, 32, 32, 3), np.float32)
        tokens = rng.integers(1, 49407, (16, 12)).astype(np.int32)
        with jax.set_mesh(spec.mesh), nn.logical_axis_rules(spec.rules):
            batch = jax.device_put(
                {"image": images, "text": tokens}, state_lib.batch_shardings(spec.mesh)
            )
            loss_fn = losses.make_loss_fn("softmax", spec.mesh, sharding.BATCH_AXES)
            fn = make_loss_and_grad(spec.model, loss_fn, spec.mesh, accum_steps=1, frozen=())
            loss, grads, _ = jax.jit(fn)(train_state.params, {}, batch, jax.random.key(0))
        out.append((float(loss), jax.tree.map(np.asarray, grads)))
    (ref_loss, ref), others = out[0], out[1:]
    for loss, grads in others:
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
            scale = max(float(np.abs(b).max()), 1e-6)
            assert float(np.abs(a - b).max()) <= 2e-5 * scale
