"""State-dict files: reading `.safetensors`, `.npz`, `.pt` / `.bin` checkpoints into numpy arrays
(with the model config clip_jax stores beside the tensors), and writing `.safetensors` / `.npz`.

`.safetensors` and `.npz` need no torch; `.pt` / `.bin` files are read without running code they
carry (`clip_jax.weights.torch_files`): plain state dicts and OpenCLIP training checkpoints by
`torch.load(weights_only=True)`, OpenAI's TorchScript archives as data, with no torch at all.
What the tensors mean (their names and layouts) is `clip_jax.convert`'s.
"""

import json
import os
import shutil
import tempfile
import zipfile
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors can read it)
import numpy as np

from clip_jax.infra import paths
from clip_jax.infra.errors import UsageError
from clip_jax.weights import torch_files

CONFIG_KEY = "clip_jax_model"  # safetensors metadata / npz entry holding our model config as JSON

StateDict = dict[str, np.ndarray]


def read_state_dict(
    path: str, *, allow_torchscript_code: bool = False
) -> tuple[StateDict, dict[str, Any] | None]:
    """Reads a checkpoint file -> (state dict of numpy arrays, our stored model config or None).

    `allow_torchscript_code=True` reads TorchScript archives with `torch.jit.load`, which runs
    the code inside them: unsafe, for files you trust as programs. By default they are read as
    data (`clip_jax.weights.torch_files`), as OpenAI's released models need. A file on an
    object store (`gs://...`) is copied to a local temporary file first.
    """
    if paths.is_remote(path):
        if not paths.path(path).exists():
            raise UsageError(f"no checkpoint at {path}")
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, paths.path(path).name)
            with paths.path(path).open("rb") as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
            return read_state_dict(local, allow_torchscript_code=allow_torchscript_code)
    if not os.path.exists(path):
        raise UsageError(f"no checkpoint at {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        sd, meta = _read_safetensors(path)
        cfg = json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None
    elif ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                sd = {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise UsageError(
                f"{path}: not a readable .npz file ({type(e).__name__}: {e}); it may be "
                "truncated: write or download it again"
            ) from None
        cfg = json.loads(str(sd.pop(CONFIG_KEY))) if CONFIG_KEY in sd else None
    elif ext in (".pt", ".pth", ".bin"):
        sd, cfg = torch_files.read(path, allow_torchscript_code=allow_torchscript_code), None
    else:
        raise UsageError(
            f"unknown checkpoint format {ext!r} of {path}: use .safetensors, .npz, .pt or .bin"
        )
    return _strip_prefix(sd), cfg


def _read_safetensors(path: str) -> tuple[StateDict, dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except SafetensorError as e:
        raise UsageError(
            f"{path}: not a readable safetensors file ({e}); it may be truncated: download or "
            "export it again"
        ) from None
    return sd, meta


def _strip_prefix(sd: StateDict) -> StateDict:
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def write_state_dict(path: str, sd: StateDict, config_json: str) -> None:
    """Writes `sd` and a model config (JSON) to a local `.safetensors` or `.npz` file, through a
    temporary name, so that a half-written file never sits under the final one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(sd, tmp, metadata={CONFIG_KEY: config_json, "format": "pt"})
    elif path.endswith(".npz"):
        with open(tmp, "wb") as f:
            np.savez(f, **sd, **{CONFIG_KEY: np.asarray(config_json)})
    else:
        raise UsageError(f"export path must end in .safetensors or .npz, got {path}")
    os.replace(tmp, path)
