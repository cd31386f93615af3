"""OpenAI / OpenCLIP state dicts <-> clip_jax variables, both directions, exactly.

PyTorch's CLIP state dict (OpenAI's layout, which OpenCLIP keeps) names every tensor; this module
maps each to a leaf of our Flax variables by its path, with one of three transforms: conv kernels
(OIHW <-> HWIO), dense kernels ([out, in] <-> [in, *out_dims] or [*in_dims, out]) and plain
reshapes (biases, fused-QKV biases, everything already in place). Every transform is a transpose
or reshape, so import followed by export reproduces the tensors bit for bit.

SigLIP models (a MAP-pooled image tower, `models.sizes.is_siglip`) have open_clip's SigLIP layout
instead: the image tower is a timm `VisionTransformer` under `visual.trunk.` (`patch_embed.proj`,
`pos_embed`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, `attn_pool`)
and the text tower sits under `text.` (open_clip's `CustomTextCLIP`).

The files themselves (`.safetensors`, `.npz`, `.pt`, `.bin`) are `clip_jax.weights.files`'s;
loading any weights by name, file or run is `clip_jax.inference.load`'s.
"""

import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from clip_jax.infra.errors import UsageError
from clip_jax.models import sizes
from clip_jax.models.clip import CLIP, complete_config, is_resnet, layers_layout

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


# The same for SigLIP's layout: timm's names in the image tower, open_clip's in the text tower.
_SIGLIP_KEY_RULES = [
    (r"^text_tower/", "text/"),
    (r"^visual/", "visual/trunk/"),
    (r"^(visual/trunk/)conv1/", r"\1patch_embed/proj/"),
    (r"^(visual/trunk/)positional_embedding$", r"\1pos_embed"),
    (r"^(visual/trunk/)ln_post/", r"\1norm/"),
    (r"^(visual/trunk/)transformer/resblocks_(\d+)/ln_(\d)/", r"\1blocks/\2/norm\3/"),
    (r"^(visual/trunk/)transformer/resblocks_(\d+)/attn/out/", r"\1blocks/\2/attn/proj/"),
    (r"^(visual/trunk/)transformer/resblocks_(\d+)/", r"\1blocks/\2/"),
    (r"^(visual/trunk/)map_head/", r"\1attn_pool/"),
    (r"^(visual/trunk/attn_pool/)ln/", r"\1norm/"),
    (r"^(visual/trunk/attn_pool/)out/", r"\1proj/"),
    (r"^(visual/trunk/.*)mlp/c_fc/", r"\1mlp/fc1/"),
    (r"^(visual/trunk/.*)mlp/c_proj/", r"\1mlp/fc2/"),
    (r"(resblocks)_(\d+)", r"\1/\2"),
    (r"^(text/.*)attn/qkv/kernel$", r"\1attn/in_proj_weight"),  # timm's keep `qkv`
    (r"^(text/.*)attn/qkv/bias$", r"\1attn/in_proj_bias"),
    (r"^(text/.*)attn/out/", r"\1attn/out_proj/"),
    (r"/(kernel|scale|embedding)$", "/weight"),
]


# timm's parameters that carry a leading axis of 1 (pos_embed [1, N, D], latent [1, 1, D]).
_TIMM_BATCH_AXIS = ("visual.trunk.pos_embed", "visual.trunk.attn_pool.latent")


def _torch_key(path: tuple[str, ...], siglip: bool = False) -> str:
    """The PyTorch state-dict key of a Flax leaf, e.g.
    ('text_tower', 'transformer', 'resblocks_3', 'attn', 'qkv', 'kernel') ->
    'transformer.resblocks.3.attn.in_proj_weight' (`siglip`: open_clip's SigLIP layout, where it
    is 'text.transformer.resblocks.3.attn.in_proj_weight')."""
    key = "/".join(path)
    for pattern, repl in _SIGLIP_KEY_RULES if siglip else _KEY_RULES:
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
    if "visual.trunk.pos_embed" in sd:
        return _infer_siglip(sd)
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


def _infer_siglip(sd: StateDict) -> dict[str, Any]:
    """`infer_config` for open_clip's SigLIP layout (`visual.trunk.`, `text.`). What shapes do
    not say, the activations, is taken from the named size (`models.sizes`) of the same shapes
    when there is one (exact GELU elsewhere)."""
    required = ("text.token_embedding.weight", "text.positional_embedding", "text.ln_final.weight")
    missing = [k for k in required + ("visual.trunk.patch_embed.proj.weight",) if k not in sd]
    if missing:
        raise UsageError(f"not an open_clip SigLIP state dict: missing {', '.join(missing)}")
    vwidth, _, patch, _ = sd["visual.trunk.patch_embed.proj.weight"].shape
    grid = round(int(np.prod(sd["visual.trunk.pos_embed"].shape[:-1])) ** 0.5)
    vision = dict(
        image_size=patch * grid,
        patch_size=patch,
        width=vwidth,
        layers=_count(sd, r"visual\.trunk\.blocks\.(\d+)\."),
        heads=max(vwidth // 64, 1),
        mlp_ratio=_mlp_ratio(sd["visual.trunk.blocks.0.mlp.fc1.weight"].shape[0], vwidth),
        pool_type="map",
        patch_bias="visual.trunk.patch_embed.proj.bias" in sd,
        ln_eps=1e-6,
    )
    width = sd["text.ln_final.weight"].shape[0]
    text = dict(
        context_length=sd["text.positional_embedding"].shape[0],
        vocab_size=sd["text.token_embedding.weight"].shape[0],
        width=width,
        heads=max(width // 64, 1),
        layers=_count(sd, r"text\.transformer\.resblocks\.(\d+)\."),
        mlp_ratio=_mlp_ratio(sd["text.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], width),
        causal=False,
        pool_type="last",
        ln_eps=1e-6,
    )
    if "text.text_projection.weight" in sd:
        embed_dim = sd["text.text_projection.weight"].shape[0]
        text["proj_bias"] = "text.text_projection.bias" in sd
    else:
        embed_dim = width
        text["proj_type"] = "none"
    # The temperature starts where SigLIP's does (t' = log 10) if the model is trained further.
    cfg = dict(embed_dim=embed_dim, vision=vision, text=text, init_logit_scale=math.log(10))
    if "logit_bias" in sd:
        cfg["init_logit_bias"] = float(np.asarray(sd["logit_bias"]).reshape(()))
    known = _siglip_size_like(vision, text)
    if known is not None:  # what the shapes cannot tell: heads and activations
        for tower, ours in (("vision", vision), ("text", text)):
            ours["heads"] = known[tower]["heads"]
            ours["gelu_tanh"] = known[tower].get("gelu_tanh", False)
    return complete_config(cfg)


def _siglip_size_like(vision: dict[str, Any], text: dict[str, Any]) -> dict[str, Any] | None:
    """The named SigLIP size (`models.sizes.MODELS`) with the towers' widths, patch and
    vocabulary of these: of those, one at the same resolution if there is one (timm's activation
    can differ by resolution); depth and context may differ (a shallowed model)."""
    like = [
        cfg
        for cfg in sizes.MODELS.values()
        if sizes.is_siglip(cfg)
        and all(cfg["vision"][k] == vision[k] for k in ("patch_size", "width"))
        and all(cfg["text"][k] == text[k] for k in ("vocab_size", "width"))
    ]
    same_size = [c for c in like if c["vision"]["image_size"] == vision["image_size"]]
    return (same_size or like or [None])[0]


def _mlp_ratio(hidden: int, width: int) -> float:
    """The MLP ratio whose int(width * ratio) is `hidden`: exact where it divides, else the ratio
    rounded up at 4 decimals, as open_clip's configs state it (4304 of 1152: 3.7362)."""
    if hidden % width == 0:
        return hidden / width
    ratio = math.ceil(hidden / width * 1e4) / 1e4
    if int(width * ratio) != hidden:
        raise UsageError(f"an MLP of {hidden} units over width {width} has no 4-decimal ratio")
    return ratio


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
    siglip = sizes.is_siglip(cfg)
    flat, used, problems = {}, set(), []
    for (collection, *path), leaf in abstract.items():
        key = _torch_key(tuple(path), siglip)
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
    siglip = sizes.is_siglip(cfg)
    unscanned = layers_layout(jax.device_get(nn.unbox(variables)), scan_layers=False)
    for (_, *path), x in _flat_leaves(unscanned).items():
        path = tuple(path)
        x = np.asarray(x)
        key = _torch_key(path, siglip)
        sd[key] = _to_torch(_kind(path, x.ndim), x)
        if key in _TIMM_BATCH_AXIS:  # timm keeps a leading batch axis of 1 on these
            sd[key] = sd[key][None]
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
