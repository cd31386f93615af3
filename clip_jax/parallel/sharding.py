"""The device mesh, the logical-axis rules, and the shardings of parameters, state and batches.

One mesh with axes ('data', 'fsdp', 'tensor'). Layers name their axes (`embed`, `mlp`, `heads`,
...); a table of rules (`config.mesh.rules`, `DEFAULT_RULES` unless a config says otherwise, as
MaxText's `logical_axis_rules`) maps those names onto mesh axes: by default FSDP shards the model
width, tensor parallelism the heads and the MLP hidden units, and the batch is split over
('data', 'fsdp'). Switching between data parallel, FSDP and tensor parallel is a change of
`config.mesh` alone. Every function that needs the mesh or the rules takes them as arguments.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from clip_jax.infra.errors import UsageError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = tuple[tuple[str, Any], ...]

# Logical axis -> mesh axis (None: replicated). Parameter axes first, then activations.
DEFAULT_RULES: Rules = (
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("act_batch", BATCH_AXES),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    # Replicated: positions, head dims, projections' outputs, norms, conv inputs.
    *((name, None) for name in ("kv", "pos", "joint", "norm", "conv_in")),
    *((name, None) for name in ("act_seq", "act_embed", "act_kv")),
)
LOGICAL_AXES = frozenset(name for name, _ in DEFAULT_RULES)  # the names the layers use


def check_rules(rules: Any) -> Rules:
    """A rule table as a config gives it (tuples, or lists once read back from JSON) -> tuples;
    a UsageError names an entry that is not `(logical name, mesh axes)` and a logical axis of the
    models that no rule maps. Mesh axes: None, one of AXES, or a sequence of them."""
    out = []
    for entry in rules:
        name, axes = entry if isinstance(entry, (tuple, list)) and len(entry) == 2 else (0, 0)
        axes = tuple(axes) if isinstance(axes, (tuple, list)) else axes
        if not isinstance(name, str) or not all(a in AXES for a in as_axes(axes)):
            raise UsageError(
                f"mesh.rules: {entry!r} is not (logical axis, mesh axes) with mesh axes None, "
                f"one of {AXES} or a tuple of them"
            )
        out.append((name, axes))
    batch = [axes for name, axes in out if name == "act_batch"]
    if batch and tuple(as_axes(batch[0])) != BATCH_AXES:
        raise UsageError(
            f"mesh.rules: act_batch must map to {BATCH_AXES}, where the input pipeline and the "
            f"loss place the batch, not {batch[0]!r}"
        )
    missing = sorted(LOGICAL_AXES - {name for name, _ in out})
    if missing:
        raise UsageError(
            f"mesh.rules maps no mesh axes to {', '.join(missing)}: give each a rule "
            "(None for replicated)"
        )
    return tuple(out)


def make_mesh(
    shape: Mapping[str, int],
    devices: Sequence[jax.Device] | None = None,
    *,
    allow_split_physical_axes: bool = False,
) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one size may be -1, meaning the remaining devices.

    `devices` defaults to all of them; give a TPU topology's devices to build a mesh for a
    machine this process does not run on (`clip_jax.aot`). On TPUs the devices are ordered so
    that each mesh axis follows the chips' interconnect; a mesh axis that would take part of a
    physical axis is refused unless `allow_split_physical_axes` (`mesh.allow_split_physical_axes`).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(shape[a]) for a in AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise UsageError(
            f"mesh sizes {dict(zip(AXES, sizes, strict=True))}: use positive "
            "sizes and at most one -1"
        )
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise UsageError(f"mesh {_describe(sizes)} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise UsageError(
            f"mesh {_describe(sizes)} = {int(np.prod(sizes))} devices, but there are "
            f"{len(devices)}; set one of mesh.data/fsdp/tensor to -1 to take the rest"
        )
    try:
        ordered = mesh_utils.create_device_mesh(
            sizes, devices, allow_split_physical_axes=allow_split_physical_axes
        )
    except (ValueError, NotImplementedError) as e:
        if allow_split_physical_axes:
            raise
        raise UsageError(
            f"mesh {_describe(sizes)} does not map onto the {devices[0].device_kind} slice's "
            f"physical axes ({e}); set mesh.allow_split_physical_axes=True to split them"
        ) from None
    return Mesh(ordered, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def config_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh `config.mesh` describes, over `devices` (default: all of them)."""
    return make_mesh(
        mesh_config,
        devices,
        allow_split_physical_axes=mesh_config["allow_split_physical_axes"],
    )


def _describe(sizes: Sequence[int]) -> str:
    return " x ".join(f"{a}={s}" for a, s in zip(AXES, sizes, strict=True))


def logical_to_sharding(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of `nn.Partitioned` leaves (e.g. from `jax.eval_shape(init)`),
    their logical axes mapped to `mesh`'s axes by `rules`.

    A dimension that its mesh axes do not divide is replicated instead, so that odd sizes
    (a 3-wide conv input, a 1000-word vocabulary on 8 devices) never stop a run; a warning names
    every such parameter, its dimension and the mesh axes it is not split over.
    """
    specs = nn.get_partition_spec(boxed_tree)
    # The boxes' values, without `nn.unbox`, which would apply sharding constraints here.
    shapes = jax.tree.map(
        lambda x: x.value if isinstance(x, nn.Partitioned) else x,
        boxed_tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )

    replicated: list[str] = []
    sizes = dict(mesh.shape)

    def fit(path: tuple, spec: PartitionSpec, shape: jax.ShapeDtypeStruct) -> NamedSharding:
        axes = param_axes(spec, shape.shape, sizes, rules)
        wanted = tuple(nn.logical_to_mesh_axes(spec, rules)) + (None,) * len(shape.shape)
        for dim, got, want in zip(shape.shape, axes, wanted, strict=False):
            if got != want:
                size = int(np.prod([sizes[a] for a in as_axes(want)]))
                replicated.append(f"{_path_str(path)} (size {dim}, not over {want}={size})")
        return NamedSharding(mesh, PartitionSpec(*axes))

    out = jax.tree_util.tree_map_with_path(
        fit, specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    if replicated:
        logging.warning(
            "%d parameter dimension(s) replicated instead of split, as their mesh axes do not "
            "divide them: %s",
            len(replicated),
            "; ".join(replicated),
        )
    return out


def param_axes(
    names: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int], rules: Rules
) -> tuple[Any, ...]:
    """The mesh axes of each dimension of a parameter whose logical axes are `names`: `rules`'
    mapping, with a dimension that its mesh axes do not divide replicated instead (None)."""
    mapped = tuple(nn.logical_to_mesh_axes(tuple(names), rules)) + (None,) * len(shape)
    axes = []
    for dim, axis in zip(shape, mapped, strict=False):
        size = int(np.prod([mesh_shape[a] for a in as_axes(axis)]))
        axes.append(axis if dim % size == 0 else None)
    return tuple(axes)


def gathered_axes(axes: Sequence[Any]) -> tuple[Any, ...]:
    """A parameter's mesh axes without 'fsdp': how it is laid out while it is used. FSDP stores
    each parameter split over 'fsdp' and all-gathers it there just before use; its other axes
    (tensor parallelism) stay split."""
    out = []
    for axis in axes:
        kept = tuple(a for a in as_axes(axis) if a != "fsdp")
        out.append(kept[0] if len(kept) == 1 else (kept or None))
    return tuple(out)


def as_axes(axis: Any) -> tuple[str, ...]:
    """A rule's or a spec entry's mesh axes as a tuple: None -> (), 'fsdp' -> ('fsdp',)."""
    if axis is None:
        return ()
    return tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)


def like_params(tree: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree that mirrors the parameters somewhere inside (optimizer moments): a
    leaf whose key path ends with a parameter's path and has its shape gets that parameter's
    sharding; everything else (step counts, scalars) is replicated."""
    by_path = {
        _path_str(path): s for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path: tuple, leaf: Any) -> NamedSharding:
        parts = _path_str(path).split("/")
        for i in range(len(parts)):
            s = by_path.get("/".join(parts[i:]))
            if s is not None and len(s.spec) <= len(getattr(leaf, "shape", ())):
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Rows split over ('data', 'fsdp'), replicated over 'tensor'."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


@dataclasses.dataclass(frozen=True)
class DataShard:
    """What one process reads of each global batch.

    rows: the global batch's rows that this process's devices hold, ascending (int64 [n]); on a
      multi-host pod they may form several separate ranges, whatever order the mesh gives the
      devices in.
    index, count: this process's share of the data among `count` distinct shares: processes
      whose devices hold the same rows (replicas over 'tensor' across hosts) read the same share.
    """

    rows: np.ndarray
    index: int
    count: int


def data_shard(mesh: Mesh, global_batch: int) -> DataShard:
    """This process's rows of a global batch and its share of the data (see `DataShard`)."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % shards:
        raise UsageError(
            f"batch_size {global_batch} does not divide over the {shards} batch shards of the "
            f"mesh (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); use a multiple of "
            f"{shards}"
        )
    sharding = batch_sharding(mesh)
    held: dict[int, np.ndarray] = {}  # process -> rows it holds, from the mesh alone
    for device, index in sharding.devices_indices_map((global_batch,)).items():
        rows = held.setdefault(device.process_index, np.zeros(global_batch, bool))
        rows[index[0]] = True
    shares = sorted({tuple(np.flatnonzero(r)) for r in held.values()})
    if sum(len(share) for share in shares) != len(set().union(*shares)):
        raise UsageError(
            f"mesh {dict(mesh.shape)}: its device order gives processes rows of the batch that "
            "overlap without being equal; order the devices so that each process's hold either "
            "the same rows as another's or none of them"
        )
    mine = tuple(np.flatnonzero(held[jax.process_index()]))
    return DataShard(np.asarray(mine, np.int64), shares.index(mine), len(shares))


def local_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
    """The rows of a global batch that this process's devices hold, ascending (int64 [n])."""
    return data_shard(mesh, global_batch).rows


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, global_size: int) -> dict:
    """This process's rows (those `local_rows` names, in its order) -> global arrays sharded over
    the batch axes, without gathering anything through one host: each device gets its rows, where
    ever they sit among the process's."""
    return {
        k: jax.make_array_from_process_local_data(
            batch_sharding(mesh, v.ndim), v, (global_size, *v.shape[1:])
        )
        for k, v in local.items()
    }
