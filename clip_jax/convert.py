"""OpenAI / OpenCLIP checkpoints <-> clip_jax variables, both directions, exactly.

PyTorch's CLIP state dict (OpenAI's layout, which OpenCLIP keeps) names every tensor; this module
maps each to a leaf of our Flax variables by its path, with one of three transforms: conv kernels
(OIHW <-> HWIO), dense kernels ([out, in] <-> [in, *out_dims] or [*in_dims, out]) and plain
reshapes (biases, fused-QKV biases, everything already in place). Every transform is a transpose
or reshape, so import followed by export reproduces the tensors bit for bit.

The files themselves (`.safetensors`, `.npz`, `.pt`, `.bin`) are `clip_jax.weights.files`'s.

Writer: `save_pretrained`, an OpenCLIP-layout file with our model config in its metadata; a
training run's checkpoint becomes one with `export_run`, or from the shell:

    python -m clip_jax.convert export --workdir=DIR --out=FILE.safetensors [--step=N]
"""

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import traverse_util

from clip_jax.infra import cli, paths
from clip_jax.infra.errors import UsageError
from clip_jax.models.clip import CLIP, complete_config, is_resnet, layers_layout
from clip_jax.weights import files as weight_files
from clip_jax.weights.files import read_state_dict
from clip_jax.weights.pretrained import resolve

# Entries of PyTorch state dicts that carry no weight: OpenAI's TorchScript extras, attention-mask
# buffers, BatchNorm's step counters.
_IGNORED = re.compile(
    r"(^|\.)(input_resolution|context_length|vocab_size|attn_mask|num_batches_tracked)$"
)

Variables = dict[str, Any]
StateDict = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------------
# Names and transforms


# Flax path (joined by "/") -> PyTorch key, applied in order; "/" becomes "." at the end.
_KEY_RULES = [
    (r"^text_tower/", ""),  # the text tower's tensors sit at the top level in PyTorch
    (r"(resblocks|layer\d)_(\d+)", r"\1/\2"),
    (r"(?:stem|conv)(\d)/conv/", r"conv\1/"),  # a ConvBN is conv{i} + bn{i} in PyTorch
    (r"(?:stem|conv)(\d)/bn/", r"bn\1/"),
    (r"downsample/conv/", "downsample/0/"),  # the shortcut is Sequential(pool, conv, bn)
    (r"downsample/bn/", "downsample/1/"),
    (r"attn/qkv/kernel$", "attn/in_proj_weight"),
    (r"attn/qkv/bias$", "attn/in_proj_bias"),
    (r"attn/out/", "attn/out_proj/"),
    (r"/(kernel|scale|embedding)$", "/weight"),
    (r"/mean$", "/running_mean"),  # batch_stats
    (r"/var$", "/running_var"),
]


def _torch_key(path: tuple[str, ...]) -> str:
    """The PyTorch state-dict key of a Flax leaf, e.g.
    ('text_tower', 'transformer', 'resblocks_3', 'attn', 'qkv', 'kernel') ->
    'transformer.resblocks.3.attn.in_proj_weight'."""
    key = "/".join(path)
    for pattern, repl in _KEY_RULES:
        key = re.sub(pattern, repl, key)
    return key.replace("/", ".")


def _kind(path: tuple[str, ...], ndim: int) -> str:
    if path[-1] == "bias":
        return "bias"  # fused-QKV and per-head biases are [3, heads, head_dim] or [heads, head_dim]
    if path[-1] != "kernel":
        return "same"
    if path[-2] in ("conv", "conv1"):  # ConvBN convs; the ViT's patch embedding
        return "conv"
    # Attention output projections take their input over (heads, head_dim).
    return "kernel_out_last" if path[-2] in ("out", "c_proj") and ndim == 3 else "kernel"


def _to_flax(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "conv":  # OIHW -> HWIO
        return np.transpose(w, (2, 3, 1, 0))
    if kind.startswith("kernel"):  # [out, in] -> [in, *out] or [*in, out]
        return np.ascontiguousarray(w.T).reshape(shape)
    return w.reshape(shape)


def _to_torch(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))
    if kind == "kernel":
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    if kind == "kernel_out_last":
        return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
    return x.reshape(-1) if kind == "bias" else x


def _torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `_to_torch` gives a leaf of `shape`: what an imported tensor must have."""
    if kind == "conv":  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if kind == "kernel":  # [in, *out] -> [out, in]
        return (int(np.prod(shape[1:])), shape[0])
    if kind == "kernel_out_last":  # [*in, out] -> [out, in]
        return (shape[-1], int(np.prod(shape[:-1])))
    return (int(np.prod(shape)),) if kind == "bias" else tuple(shape)


def _same_layout(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Equal shapes up to size-1 axes ([] and [1], [D] and [1, D]): the same values in order."""
    return [d for d in a if d != 1] == [d for d in b if d != 1]


def _flat_leaves(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(nn.unbox(tree))


# ---------------------------------------------------------------------------------------------
# Architecture from shapes


def infer_config(sd: StateDict) -> dict[str, Any]:
    """The `CLIP` keyword arguments of an OpenAI-layout state dict, from its tensor shapes alone
    (as OpenAI's build_model does): tower widths, depths, patch size, resolution, vocabulary;
    every other field at its module's default."""
    required = (
        "text_projection",
        "token_embedding.weight",
        "positional_embedding",
        "ln_final.weight",
    )
    missing = [k for k in required if k not in sd]
    if missing:
        raise UsageError(
            f"not an OpenAI/OpenCLIP CLIP state dict: missing {', '.join(missing)} "
            f"(found keys like {', '.join(sorted(sd)[:5])})"
        )
    width = sd["ln_final.weight"].shape[0]
    text = dict(
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        width=width,
        heads=max(width // 64, 1),
        layers=_count(sd, r"transformer\.resblocks\.(\d+)\."),
        mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
    )
    if "visual.proj" in sd:
        vwidth, _, patch, _ = sd["visual.conv1.weight"].shape
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = dict(
            image_size=patch * grid,
            patch_size=patch,
            width=vwidth,
            layers=_count(sd, r"visual\.transformer\.resblocks\.(\d+)\."),
            heads=max(vwidth // 64, 1),
            mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vwidth,
        )
    elif "visual.attnpool.positional_embedding" in sd:
        vwidth = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = dict(
            image_size=grid * 32,
            layers=tuple(_count(sd, rf"visual\.layer{s}\.(\d+)\.") for s in (1, 2, 3, 4)),
            width=vwidth,
            heads=max(vwidth * 32 // 64, 1),
        )
    else:
        raise UsageError(
            "the state dict has neither a ViT (visual.proj) nor a ResNet (visual.attnpool)"
        )
    cfg = dict(embed_dim=sd["text_projection"].shape[1], vision=vision, text=text)
    if "logit_bias" in sd:
        cfg["init_logit_bias"] = float(np.asarray(sd["logit_bias"]).reshape(()))
    return complete_config(cfg)  # what the shapes do not say: the modules' defaults


def _count(sd: StateDict, pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def abstract_variables(cfg: Mapping[str, Any]) -> Variables:
    """The variables' shapes of `CLIP(**cfg)` (unboxed), without allocating them."""
    model = CLIP(**cfg)
    size = cfg["vision"]["image_size"]
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, cfg["text"]["context_length"]), jnp.int32)
    return jax.eval_shape(
        lambda i, t: nn.unbox(model.init(jax.random.key(0), i, t)), images, tokens
    )


# ---------------------------------------------------------------------------------------------
# Conversion


def from_state_dict(sd: StateDict, cfg: Mapping[str, Any]) -> Variables:
    """PyTorch state dict (numpy arrays) -> Flax variables of `CLIP(**cfg)`, float32 params.

    Every model leaf must find its tensor in PyTorch's layout (the shape export writes, up to
    size-1 axes), and every tensor must be used: a tensor of the right size in another shape (say,
    stored transposed) is refused, never reshaped into scrambled weights. A model with
    `scan_layers` gets each stack's per-layer tensors stacked (`models.clip.stack_layers`).
    """
    abstract = _flat_leaves(abstract_variables({**cfg, "scan_layers": False}))
    flat, used, problems = {}, set(), []
    for (collection, *path), leaf in abstract.items():
        key = _torch_key(tuple(path))
        if key not in sd:
            problems.append(f"missing {key} (for {'/'.join(path)})")
            continue
        w = np.asarray(sd[key])
        kind = _kind(tuple(path), len(leaf.shape))
        want = _torch_shape(kind, leaf.shape)
        if not _same_layout(w.shape, want):
            problems.append(f"{key} has shape {w.shape}, the model needs {want}")
            continue
        x = _to_flax(kind, w.reshape(want), leaf.shape)
        flat[(collection, *path)] = x.astype(leaf.dtype) if x.dtype != leaf.dtype else x
        used.add(key)
    unused = sorted(k for k in sd if k not in used and not _IGNORED.search(k))
    if unused:
        problems.append(
            f"unused tensors: {', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}"
        )
    if problems:
        raise UsageError("checkpoint does not fit the model: " + "; ".join(problems[:6]))
    variables = traverse_util.unflatten_dict(flat)
    return layers_layout(variables, CLIP(**cfg).scan_layers)


def to_state_dict(variables: Variables, cfg: Mapping[str, Any]) -> StateDict:
    """Flax variables -> OpenCLIP-layout state dict (numpy), loadable by open_clip strictly; a
    scanned model's stacked layers are written one by one, as the unscanned model's are."""
    sd: StateDict = {}
    unscanned = layers_layout(jax.device_get(nn.unbox(variables)), scan_layers=False)
    for (_, *path), x in _flat_leaves(unscanned).items():
        path = tuple(path)
        x = np.asarray(x)
        sd[_torch_key(path)] = _to_torch(_kind(path, x.ndim), x)
    if is_resnet(cfg["vision"]):
        for key in [k for k in sd if k.endswith(".running_mean")]:
            sd[key.replace("running_mean", "num_batches_tracked")] = np.zeros((), np.int64)
    return sd


def merge_config(cfg: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level overrides replace fields; `vision=` / `text=` dicts update the tower fields; the
    result names every field (`models.complete_config`)."""
    known = set(CLIP.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UsageError(f"unknown model override(s) {unknown}; known: {sorted(known)}")
    out = dict(cfg)
    for key, value in overrides.items():
        out[key] = {**out[key], **value} if key in ("vision", "text") else value
    return complete_config(out)


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
        from clip_jax.training import state

        model, variables, _ = state.load_run(path, step, **overrides)
        return model, layers_layout(variables, model.scan_layers)  # `scan_layers=` may flip it
    if step is not None:
        raise UsageError(f"step={step} applies to a training run's directory, not to {path}")
    sd, stored = read_state_dict(path, allow_torchscript_code=allow_torchscript_code)
    cfg = stored if stored is not None else {**infer_config(sd), "quick_gelu": True}
    if is_resnet(cfg["vision"]):
        cfg["vision"] = {**cfg["vision"], "layers": tuple(cfg["vision"]["layers"])}
    cfg = merge_config(cfg, overrides)
    variables = jax.device_put(from_state_dict(sd, cfg))
    return CLIP(**cfg), variables


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
    from clip_jax.training import state  # state builds on this module: import it only when called

    _, variables, step = state.load_run(workdir, step)
    model_cfg = state.model_config(state.read_run_config(workdir, step).model)
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


USAGE = """Export a training run's parameters for `clip_jax.load_pretrained` and open_clip:

    python -m clip_jax.convert export --workdir=DIR --out=FILE.safetensors [--step=N]
"""


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "The training run's directory.", flag_values=fv)
    flags.DEFINE_string("out", None, "The file to write: .safetensors or .npz.", flag_values=fv)
    flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
    if args != ["export"]:
        raise UsageError(
            f"the command is export, not {' '.join(args) or 'nothing'}: "
            "python -m clip_jax.convert export --workdir=DIR --out=FILE"
        )
    step = export_run(fv.workdir, fv.out, fv.step)
    print(f"wrote step {step} of {fv.workdir} to {fv.out}")
    return 0


def main(argv: list[str]) -> int:
    """`python -m clip_jax.convert export --workdir DIR --out FILE [--step N]` -> status."""
    return cli.run_tool(argv, define_flags, run, USAGE)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
