"""Any trained weights -> (model, variables), and a training run -> a weight file.

    model, variables = load_pretrained("ViT-B-32", pretrained="openai")   # a published tag
    model, variables = load_pretrained("file.safetensors")                # OpenAI / OpenCLIP / ours
    model, variables = load_pretrained("runs/b16", step=None)             # a training run
    export_run("runs/b16", "b16.safetensors")                             # for open_clip too

The names, files and runs are resolved here; the tensors are converted by
`clip_jax.weights.state_dicts`, and a run's checkpoint is read by `clip_jax.training.runs`.
"""

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from clip_jax.data.preprocess import preprocess
from clip_jax.infra import paths
from clip_jax.infra.errors import UsageError
from clip_jax.models import sizes
from clip_jax.models.clip import CLIP, is_resnet, layers_layout
from clip_jax.training import runs, state
from clip_jax.weights import files as weight_files
from clip_jax.weights.pretrained import lookup, resolve
from clip_jax.weights.state_dicts import (
    Variables,
    from_state_dict,
    infer_config,
    merge_config,
    to_state_dict,
)


def load_pretrained(
    path: str,
    step: int | None = None,
    *,
    pretrained: str | None = None,
    cache_dir: str | None = None,
    verify: bool = True,
    allow_torchscript_code: bool = False,
    **overrides: Any,
) -> tuple[CLIP, Variables]:
    """An OpenAI, OpenCLIP or clip_jax checkpoint file, or a training run -> (model, variables).

    `path` may be a training run's directory (the `--workdir` of `clip_jax.main`): its checkpoint
    at `step`, the latest by default, on this process's first device.

    With `pretrained=TAG`, `path` is a model name and TAG its published weights, as in open_clip
    (`load_pretrained("ViT-B-32", pretrained="openai")`; `clip_jax.list_pretrained()` lists them):
    the file is downloaded into the cache (`cache_dir`, default `$CLIP_JAX_CACHE/weights` or
    `~/.cache/clip_jax/weights`) and checked against its sha256 on first use, and the QuickGELU
    setting comes with the weights; `verify=False` also accepts a file no checksum is known for
    (`clip_jax.weights.pretrained` has the details).

    The architecture is inferred from tensor shapes (or read from our own files' metadata).
    OpenAI-layout files without our metadata are assumed to use QuickGELU, as OpenAI's models do;
    pass `quick_gelu=False` for OpenCLIP models trained with GELU. Other overrides set model fields
    (`dtype="bfloat16"`, `remat_policy="full"`, `text=dict(heads=...)`).

    PyTorch files are read without running code they carry: OpenAI's TorchScript archives as
    data, other `.pt` / `.bin` files with `torch.load(weights_only=True)`.
    `allow_torchscript_code=True` loads TorchScript with `torch.jit.load` instead, which runs the
    archive's code: unsafe, only for a file you would run as a program.

    Returns:
      model: a `CLIP` module.
      variables: `{"params": ...}` (plus `"batch_stats"` for ResNets), for
        `model.apply(variables, images, method="encode_image")`.
    """
    path, needs = resolve(path, pretrained, cache_dir=cache_dir, verify=verify)
    overrides = {**needs, **overrides}
    if paths.path(path).is_dir():  # a training run's directory, local or gs://
        model, variables, _ = runs.load_run(path, step, **overrides)
        return model, layers_layout(variables, model.scan_layers)  # `scan_layers=` may flip it
    if step is not None:
        raise UsageError(f"step={step} applies to a training run's directory, not to {path}")
    sd, stored = weight_files.read_state_dict(path, allow_torchscript_code=allow_torchscript_code)
    cfg = stored if stored is not None else _assumed_activation(infer_config(sd))
    if is_resnet(cfg["vision"]):
        cfg["vision"] = {**cfg["vision"], "layers": tuple(cfg["vision"]["layers"])}
    cfg = merge_config(cfg, overrides)
    variables = jax.device_put(from_state_dict(sd, cfg))
    return CLIP(**cfg), variables


def _assumed_activation(cfg: dict[str, Any]) -> dict[str, Any]:
    """An inferred config with QuickGELU for OpenAI's layout (OpenAI's models use it; pass
    `quick_gelu=False` for OpenCLIP's GELU models); SigLIP's layout has its activations already."""
    return cfg if sizes.is_siglip(cfg) else {**cfg, "quick_gelu": True}


def save_pretrained(path: str, variables: Variables, cfg: Mapping[str, Any]) -> None:
    """Writes variables as an OpenCLIP-layout `.safetensors` (or `.npz`) file, our model config in
    its metadata; `load_pretrained` reads it back bit-exactly and open_clip loads its tensors."""
    sd = to_state_dict(variables, cfg)
    meta = json.dumps(_jsonable(cfg))
    if paths.is_remote(path):  # the writers need a local file: write one, then upload it
        with tempfile.TemporaryDirectory() as tmp_dir:
            local = os.path.join(tmp_dir, paths.path(path).name)
            save_pretrained(local, variables, cfg)
            paths.path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(local, "rb") as src, paths.path(path).open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
        return
    weight_files.write_state_dict(path, sd, meta)


def export_run(workdir: str, out_path: str, step: int | None = None) -> int:
    """Writes a training run's checkpoint as a file `save_pretrained` writes, which
    `load_pretrained` and open_clip read.

    Args:
      workdir: the run's directory (the `--workdir` of `clip_jax.main`), local or gs://.
      out_path: the file to write, `.safetensors` or `.npz`.
      step: the checkpoint to export; None for the run's latest.
    Returns:
      the exported step.
    """
    _, variables, step = runs.load_run(workdir, step)
    model_cfg = state.model_kwargs(runs.read_run_config(workdir, step).model)
    save_pretrained(out_path, jax.device_get(variables), model_cfg)
    return step


def _jsonable(cfg: Any) -> Any:
    if isinstance(cfg, Mapping):
        return {k: _jsonable(v) for k, v in cfg.items()}
    if isinstance(cfg, (tuple, list)):
        return [_jsonable(v) for v in cfg]
    if isinstance(cfg, np.dtype) or hasattr(cfg, "dtype") and not isinstance(cfg, (int, float)):
        return str(np.dtype(cfg))
    return cfg


def create_model_and_transforms(
    model: str, pretrained: str, **kwargs: Any
) -> tuple[Any, dict[str, Any], Callable[[Any], Any]]:
    """Published weights with their preprocessing, as open_clip's function of the same name.

    Returns:
      model: a `CLIP` module; variables: as `load_pretrained` returns them;
      preprocess: images (PIL or uint8 arrays) -> float32 [B, S, S, 3] at the model's resolution,
        normalised with the statistics these weights were trained with.
    """
    weights = lookup(model, pretrained)
    clip, variables = load_pretrained(model, pretrained=pretrained, **kwargs)
    protocol = weights.preprocess(clip.vision["image_size"])
    transform = functools.partial(
        preprocess,
        image_size=protocol.size,
        mean=protocol.mean,
        std=protocol.std,
        resize_mode=protocol.resize_mode,
        interpolation=protocol.interpolation,
    )
    return clip, variables, transform
