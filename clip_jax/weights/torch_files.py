"""PyTorch files (`.pt`, `.pth`, `.bin`) -> numpy state dicts, without running code they carry.

- Plain state dicts and OpenCLIP training checkpoints: `torch.load(weights_only=True)`, whose
  unpickler builds only tensors and plain containers.
- TorchScript archives, as OpenAI released CLIP: a zip of `data.pkl` (the module tree, pickled),
  `data/N` (the tensors' storages) and `code/` (the TorchScript program). `torch.jit.load` compiles
  and runs that program (a class's `__setstate__` runs while loading), so a crafted file runs what
  it likes. Here `data.pkl` goes through a restricted unpickler instead, which rebuilds tensors
  from the `data/` records and turns each `__torch__.*` object into a `ScriptObject` of its
  attributes; every other global is refused. Which attributes are parameters and buffers (so
  which tensors `torch.jit.load(f).state_dict()` would list) each class declares in `code/`,
  read as text and never run. A class with its own `__setstate__` is refused: its state means
  something only once that code has run. This path needs no torch at all.

`allow_torchscript_code=True` loads TorchScript archives with `torch.jit.load` instead. It is
unsafe: use it only for a file you trust as you would a program.
"""

import io
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from clip_jax.infra.errors import UsageError

StateDict = dict[str, np.ndarray]

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_TRUST_HINT = (
    "if you trust the file as you would a program, allow_torchscript_code=True loads it with "
    "torch.jit.load, which runs its code"
)


def read(path: str, *, allow_torchscript_code: bool = False) -> StateDict:
    """A PyTorch checkpoint file -> its state dict as numpy arrays (floats as float32).

    Args:
      path: a `torch.save` file (a state dict, or a dict with one under "state_dict") or a
        TorchScript archive (`torch.jit.save`, OpenAI's released models).
      allow_torchscript_code: read TorchScript archives with `torch.jit.load`, which runs the
        archive's code: unsafe, for trusted files only. By default they are read as data.

    Returns:
      Tensor name -> array, the names `state_dict()` gives.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                prefix = _torchscript_prefix(archive)
                if prefix is not None and not allow_torchscript_code:
                    return _floats(_read_torchscript(archive, prefix, path))
        except zipfile.BadZipFile as e:
            raise UsageError(
                f"{path}: not a readable PyTorch file ({e}); it may be truncated: download or "
                "save it again"
            ) from None
        if prefix is not None:
            return _floats(_torch_jit_state_dict(path))
    elif not head.startswith(b"\x80"):  # every pickle of protocol 2 or more, torch's legacy files
        raise UsageError(f"{path}: not a PyTorch file (neither a zip archive nor a pickle)")
    return _floats(_torch_load(path))


def _floats(sd: Mapping[str, np.ndarray]) -> StateDict:
    """Floating tensors as float32, as `tensor.float()` gives them; the others as they are."""
    return {
        k: v.astype(np.float32) if v.dtype.kind == "f" or v.dtype == ml_dtypes.bfloat16 else v
        for k, v in sd.items()
    }


# ---------------------------------------------------------------------------------------------
# torch.load (weights only) and torch.jit.load (opt-in)


def _import_torch(path: str) -> Any:
    try:
        import torch
    except ImportError as e:
        raise UsageError(
            f"reading {path} needs PyTorch (pip install torch); or convert it to .safetensors"
        ) from e
    return torch


def _torch_load(path: str) -> StateDict:
    torch = _import_torch(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UsageError(
            f"{path}: refused to unpickle it: {_refusal(str(e))}, which loading weights only "
            "does not allow (such a file can run code when loaded); re-save a checkpoint you "
            "trust as a plain state dict or convert it to .safetensors"
        ) from None
    except RuntimeError as e:  # torch's zip reader: truncated or damaged archives
        reason = str(e).split(". ")[0]
        raise UsageError(
            f"{path}: not a readable PyTorch file ({reason}); it may be truncated: download or "
            "save it again"
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj:  # OpenCLIP training checkpoints
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{path}: not a state dict (a mapping of names to tensors)")
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()}


def _refusal(message: str) -> str:
    """What torch's weights-only unpickler refused, out of its many-paragraph message."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    if match:
        return f"it needs {match.group(1)}"
    match = re.search(r"Unsupported operand \d+", message)
    return f"it holds pickle code ({match.group(0).lower()})" if match else "it holds objects"


def _torch_jit_state_dict(path: str) -> StateDict:
    torch = _import_torch(path)
    sd = torch.jit.load(path, map_location="cpu").state_dict()
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------
# TorchScript archives as data


class ScriptObject:
    """A `__torch__.*` object of a TorchScript archive: its class's name and its attributes."""

    qualified_name = ""

    def __setstate__(self, state: Any) -> None:  # pickle's BUILD
        self.state = state


class _StorageType:
    """`torch.FloatStorage` and friends, as a pickle names them: just their dtype."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: Any):
        self.dtype = np.dtype(dtype)


class _ClassInfo:
    """What `code/` declares of one TorchScript class."""

    def __init__(self, is_module: bool):
        self.is_module, self.has_setstate = is_module, False
        self.parameters: list[str] = []
        self.buffers: list[str] = []


def _torchscript_prefix(archive: zipfile.ZipFile) -> str | None:
    """The records' folder (`NAME/`) of a TorchScript archive, or None for other zips; torch's own
    test: a TorchScript archive has constants.pkl."""
    names = archive.namelist()
    prefix = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""
    return prefix if f"{prefix}constants.pkl" in names else None


def _read_torchscript(archive: zipfile.ZipFile, prefix: str, path: str) -> StateDict:
    if f"{prefix}data.pkl" not in archive.namelist():
        raise UsageError(f"{path}: a TorchScript archive without data.pkl")
    classes = _declared_classes(archive, prefix, path)
    unpickler = _ArchiveUnpickler(archive, prefix, path)
    try:  # the errors are what the pickle machine raises on malformed bytes
        root = unpickler.load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        MemoryError,
    ) as e:
        raise UsageError(f"{path}: refused to read its data.pkl: {e}; {_TRUST_HINT}") from None
    if not isinstance(root, ScriptObject):
        raise UsageError(f"{path}: its data.pkl holds no TorchScript module")
    return _state_dict(root, classes, path)


_CLASS_LINE = re.compile(r"^class (\w+)(?:\((\w*)\))?:")
_DECL_LINE = re.compile(r"^\s+(__parameters__|__buffers__) = (.*)$")
_NAME_LIST = re.compile(r'\[\s*(?:"[\w.]*"\s*,\s*)*\]\s*')  # ["weight", "bias", ]


def _declared_classes(archive: zipfile.ZipFile, prefix: str, path: str) -> dict[str, _ClassInfo]:
    """Qualified class name -> its declarations, from the `.py` records under code/ (as text)."""
    classes: dict[str, _ClassInfo] = {}
    code = f"{prefix}code/"
    for name in archive.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code) : -len(".py")].replace("/", ".")
        current = None
        for line in archive.read(name).decode("utf-8", errors="replace").splitlines():
            if match := _CLASS_LINE.match(line):
                current = classes[f"{module}.{match.group(1)}"] = _ClassInfo(
                    match.group(2) == "Module"
                )
            elif line and not line[0].isspace():
                current = None
            elif current is not None:
                if match := _DECL_LINE.match(line):
                    if not _NAME_LIST.fullmatch(match.group(2)):
                        raise UsageError(f"{path}: malformed {match.group(1)} in {name}")
                    names = re.findall(r'"([\w.]*)"', match.group(2))
                    setattr(current, match.group(1).strip("_"), names)
                elif line.lstrip().startswith("def __setstate__("):
                    current.has_setstate = True
    return classes


class _ArchiveUnpickler(pickle.Unpickler):
    """Rebuilds tensors (numpy) and `ScriptObject`s from data.pkl; refuses every other global."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(io.BytesIO(archive.read(f"{prefix}data.pkl")))
        self.archive, self.prefix, self.path = archive, prefix, path
        byteorder = f"{prefix}byteorder"
        big = byteorder in archive.namelist() and archive.read(byteorder).strip() == b"big"
        self.order = ">" if big else "<"
        self.storages: dict[str, np.ndarray] = {}
        self.script_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, backward_hooks: data
        if module == "collections" and name == "OrderedDict":
            return dict
        if module == "torch.jit._pickle" and re.fullmatch(
            r"build_(int|double|bool|tensor)list", name
        ):
            return list
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return lambda value, type_str: value
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.script_classes:
                self.script_classes[qualified] = type(
                    name, (ScriptObject,), {"qualified_name": qualified}
                )
            return self.script_classes[qualified]
        raise pickle.UnpicklingError(f"it needs {module}.{name}, which is not tensor data")

    def persistent_load(self, pid: Any) -> np.ndarray:
        """('storage', storage type, key, location, numel) -> the storage as a 1-D array."""
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
        ):
            raise pickle.UnpicklingError(f"an unknown persistent id {str(pid)[:80]}")
        _, storage_type, key, _, numel = pid
        if key not in self.storages:
            record = f"{self.prefix}data/{key}"
            if record not in self.archive.namelist():
                raise pickle.UnpicklingError(f"its storage record {record} is missing")
            dtype = storage_type.dtype.newbyteorder(self.order)
            with self.archive.open(record) as f:
                data = f.read(numel * dtype.itemsize)  # never more than the tensor needs
            if len(data) < numel * dtype.itemsize:
                raise pickle.UnpicklingError(f"its storage record {record} is truncated")
            self.storages[key] = np.frombuffer(data, dtype, numel).astype(dtype.newbyteorder("="))
        return self.storages[key]


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2's arguments -> a numpy copy of the strided view."""
    size, stride = tuple(size), tuple(stride)
    if (
        not isinstance(storage, np.ndarray)
        or len(size) != len(stride)
        or not all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))
    ):
        raise pickle.UnpicklingError("a tensor with a malformed storage, size or stride")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    if int(np.prod(size, dtype=object)) > storage.size:  # only expanded views (stride 0) are
        raise pickle.UnpicklingError("a tensor larger than its storage")  # larger: never weights
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size:
        raise pickle.UnpicklingError("a tensor reaching past the end of its storage")
    strides = [s * storage.itemsize for s in stride]
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, strides, writeable=False)
    return np.array(view)


def _state_dict(root: ScriptObject, classes: dict[str, _ClassInfo], path: str) -> StateDict:
    """Parameters, buffers, then submodules, recursively: `Module.state_dict()`'s names."""
    sd: StateDict = {}
    seen: set[int] = set()
    stack = [(root, "")]
    while stack:
        obj, prefix = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        info = classes.get(obj.qualified_name)
        if info is not None and info.has_setstate:
            raise UsageError(
                f"{path}: refused: its class {obj.qualified_name} runs its own __setstate__ code "
                f"when loaded; {_TRUST_HINT}"
            )
        attributes = getattr(obj, "state", {})
        if not isinstance(attributes, dict):
            raise UsageError(f"{path}: {obj.qualified_name} has no attributes to read")
        if info is None:  # no declarations found: every tensor attribute counts
            names = [k for k, v in attributes.items() if isinstance(v, np.ndarray)]
        else:
            names = [*info.parameters, *info.buffers]
        for name in names:
            if isinstance(attributes.get(name), np.ndarray):
                sd[prefix + str(name)] = attributes[name]
        children = []
        for name, value in attributes.items():
            child = classes.get(getattr(value, "qualified_name", ""))
            if isinstance(value, ScriptObject) and (child is None or child.is_module):
                children.append((value, f"{prefix}{name}."))
        stack.extend(reversed(children))  # depth first, in attribute order
    return sd
