"""Start-up checks of a training config: `validate(config)` holds every key to what it allows,
before data is opened or a model built, and refuses the first that is not with one UsageError
line naming the key, the value and what is allowed. Without it, a negative learning rate trains
by gradient ascent, `batch_size=0` ends in a ZeroDivisionError, `total_steps=0` does nothing.

What needs the devices (the mesh's product, the batch over the batch shards) or the data (the
source's files, the tokenizer's file) is checked where those are known: `sharding.make_mesh`,
`sharding.local_rows` and `pipeline.make_source`, which name the key too.
"""

import sys
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging

from clip_jax.data.preprocess import AUGMENTATIONS
from clip_jax.evals import registry
from clip_jax.infra.errors import UsageError
from clip_jax.infra.rules import (
    BETA,
    BOOL,
    COUNT,
    FLOAT_DTYPE,
    FRACTION,
    INT,
    NAME,
    NON_NEGATIVE,
    NUMBER,
    POSITIVE,
    POSITIVE_INT,
    STRING,
    Rule,
    choices,
    is_int,
    is_number,
    is_seq,
    one_of,
)
from clip_jax.models import vit
from clip_jax.models.layers import INIT_SCHEMES, REMAT_POLICIES
from clip_jax.models.text import POOL_TYPES, PROJ_TYPES
from clip_jax.parallel import sharding
from clip_jax.training import losses

NONFINITE_POLICIES = ("halt", "skip", "rollback")
SPIKE_POLICIES = ("log", "halt", "rollback")
SCHEDULES = ("cosine", "constant")  # optim.make_schedule's
ATTN_IMPLS = (None, "xla", "cudnn")  # jax.nn.dot_product_attention's `implementation`
FROZEN_GROUPS = ("visual", "text_tower", "logit_scale", "logit_bias")  # CLIP's top-level params


MESH_AXIS = Rule(lambda v: is_int(v) and (v > 0 or v == -1), "a positive integer, or -1 (the rest)")

# A ResNet has none of these.
VIT_KEYS = (
    "model.vision.patch_size",
    "model.vision.mlp_ratio",
    "model.vision.pool_type",
    "model.vision.patch_bias",
    "model.vision.ln_eps",
    "model.vision.gelu_tanh",
)

# One rule per key of a training config (`configs/common.py`'s base_config); `evals` entries have
# their types' (`evals/registry.py`). A config must have every key but a ResNet's missing ViT ones.
RULES: dict[str, Rule] = {
    "seed": INT,
    "batch_size": POSITIVE_INT,
    "total_steps": POSITIVE_INT,
    "log_every_steps": POSITIVE_INT,
    "checkpoint_every_steps": POSITIVE_INT,
    "keep_checkpoints": POSITIVE_INT,
    "keep_period": Rule(COUNT.ok, "an integer >= 0 (0: none)"),
    "resume_step": Rule(lambda v: v is None or POSITIVE_INT.ok(v), "None or a checkpoint's step"),
    "nonfinite": one_of(NONFINITE_POLICIES),
    "nonfinite_max_consecutive": POSITIVE_INT,
    "nonfinite_max_fraction": FRACTION,
    "spike.window": Rule(COUNT.ok, "an integer >= 0 (0: no spike detection)"),
    "spike.factor": POSITIVE,
    "spike.length": POSITIVE_INT,
    "spike.policy": one_of(SPIKE_POLICIES),
    "max_rollbacks": COUNT,
    "rollback_lr_scale": Rule(lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "init_from": STRING,
    "init_from_allow_torchscript_code": BOOL,
    "mesh.data": MESH_AXIS,
    "mesh.fsdp": MESH_AXIS,
    "mesh.tensor": MESH_AXIS,
    "mesh.allow_split_physical_axes": BOOL,
    "mesh.rules": Rule(
        lambda v: is_seq(v, lambda e: is_seq(e, lambda _: True) and len(e) == 2),
        "a list of (logical axis, mesh axes) pairs",
    ),
    "model.embed_dim": POSITIVE_INT,
    "model.quick_gelu": BOOL,
    "model.dtype": FLOAT_DTYPE,
    "model.param_dtype": FLOAT_DTYPE,
    "model.remat_policy": one_of(tuple(REMAT_POLICIES)),
    "model.attn_impl": one_of(ATTN_IMPLS),
    "model.patch_dropout": Rule(BETA.ok, "a number in [0, 1): the fraction of patches dropped"),
    "model.scan_layers": BOOL,
    "model.init_logit_scale": NUMBER,
    "model.init_logit_bias": Rule(lambda v: v is None or is_number(v), "None or a finite number"),
    "model.vision.image_size": POSITIVE_INT,
    "model.vision.patch_size": POSITIVE_INT,
    "model.vision.width": POSITIVE_INT,
    "model.vision.layers": Rule(
        lambda v: POSITIVE_INT.ok(v) or (is_seq(v, POSITIVE_INT.ok) and len(v) == 4),
        "a positive integer (ViT) or 4 positive integers (ResNet: blocks per stage)",
    ),
    "model.vision.heads": POSITIVE_INT,
    "model.vision.mlp_ratio": POSITIVE,
    "model.vision.init_scheme": one_of(INIT_SCHEMES),
    "model.vision.pool_type": one_of(vit.POOL_TYPES),
    "model.vision.patch_bias": BOOL,
    "model.vision.ln_eps": POSITIVE,
    "model.vision.gelu_tanh": BOOL,
    "model.text.context_length": POSITIVE_INT,
    "model.text.vocab_size": POSITIVE_INT,
    "model.text.width": POSITIVE_INT,
    "model.text.layers": POSITIVE_INT,
    "model.text.heads": POSITIVE_INT,
    "model.text.mlp_ratio": POSITIVE,
    "model.text.pool_type": one_of(POOL_TYPES),
    "model.text.eot_token_id": Rule(lambda v: v is None or COUNT.ok(v), "None or a token id"),
    "model.text.causal": BOOL,
    "model.text.proj_type": one_of(PROJ_TYPES),
    "model.text.proj_bias": BOOL,
    "model.text.ln_eps": POSITIVE,
    "model.text.gelu_tanh": BOOL,
    "loss.name": one_of(tuple(losses.LOSSES)),
    "loss.chunk_size": Rule(COUNT.ok, "an integer >= 0 (0: not chunked)"),
    "loss.max_logit_scale": POSITIVE,
    "loss.allow_mismatch": BOOL,
    "optim.learning_rate": POSITIVE,
    "optim.warmup_steps": COUNT,
    "optim.schedule": one_of(SCHEDULES),
    "optim.b1": BETA,
    "optim.b2": BETA,
    "optim.eps": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.grad_clip_norm": Rule(NON_NEGATIVE.ok, "a number >= 0 (0: no clipping)"),
    "optim.mu_dtype": FLOAT_DTYPE,
    "optim.accum_steps": POSITIVE_INT,
    "optim.frozen": Rule(
        lambda v: is_seq(v, lambda x: x in FROZEN_GROUPS),
        f"a list of parameter groups, each {choices(FROZEN_GROUPS)}",
    ),
    # The source's form and files, and the tokenizer's, are checked when the data opens.
    "train_data.source": STRING,
    "train_data.image_key": NAME,
    "train_data.text_key": NAME,
    "train_data.tokenizer": NAME,
    "train_data.shuffle_buffer": Rule(COUNT.ok, "an integer >= 0 (0 or 1: no shuffling)"),
    "train_data.crop_scale": Rule(
        lambda v: is_seq(v, is_number) and len(v) == 2 and 0 < v[0] <= v[1] <= 1,
        "(low, high) with 0 < low <= high <= 1: the kept area fraction",
    ),
    "train_data.data_dir": STRING,
    "train_data.augmentation": one_of(AUGMENTATIONS),
    "train_data.templates": Rule(
        lambda v: is_seq(v, lambda t: isinstance(t, str) and t.count("{}") == 1) and len(v) > 0,
        "a non-empty list of strings, each holding {} once",
    ),
    "train_data.max_image_pixels": POSITIVE_INT,
}


def validate(config: ml_collections.ConfigDict) -> None:
    """Refuses a training config with a value its key does not allow.

    Args:
      config: a training config (`configs/*.py`, after `--config.KEY=VALUE` overrides).
    Raises:
      UsageError: one line, `KEY=VALUE: use WHAT IS ALLOWED`, for the first key found wrong.
    """
    for key, rule in RULES.items():
        found, value = _lookup(config, key)
        if not found and key not in VIT_KEYS:
            raise UsageError(
                f"the config has no {key}: derive it from configs/common.py's base_config, "
                "which defines every key"
            )
        if found and not rule.ok(value):
            _refuse(key, value, rule.allowed)
    _check_together(config)
    if "evals" not in config:
        raise UsageError("the config has no evals: derive it from configs/common.py's base_config")
    for name, entry in config.evals.items():
        _check_eval(name, entry)


def _lookup(config: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping | ml_collections.ConfigDict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _refuse(key: str, value: Any, allowed: str) -> None:
    raise UsageError(f"{key}={value!r}: use {allowed}")


def _check_together(c: ml_collections.ConfigDict) -> None:
    """The rules between keys, each checked only once both keys passed their own."""
    if c.optim.warmup_steps > c.total_steps:  # a shortened trial run: said, not refused
        logging.warning(
            "optim.warmup_steps=%d is longer than the run (total_steps=%d): the learning rate "
            "never reaches optim.learning_rate",
            c.optim.warmup_steps,
            c.total_steps,
        )
    if c.batch_size % c.optim.accum_steps:
        _refuse(
            "batch_size",
            c.batch_size,
            f"a multiple of optim.accum_steps={c.optim.accum_steps} (the micro-batches per step)",
        )
    sizes = [c.mesh[a] for a in sharding.AXES]
    if sizes.count(-1) > 1:
        _refuse("mesh", dict(zip(sharding.AXES, sizes, strict=True)), "-1 on at most one axis")
    sharding.check_rules(c.mesh.rules)
    vision, text = c.model.vision, c.model.text
    if isinstance(vision.layers, int):  # a ViT
        if "patch_size" not in vision:
            raise UsageError("model.vision.patch_size is missing: a ViT (int layers) needs it")
        # timm's SigLIP towers drop the pixels past the last whole patch (SO400M-14 at 384).
        if vision.image_size % vision.patch_size and vision.get("pool_type") != "map":
            _refuse(
                "model.vision.image_size",
                vision.image_size,
                f"a multiple of model.vision.patch_size={vision.patch_size}",
            )
        _check_heads("model.vision", vision.width, vision.heads)
    else:  # a ResNet: the attention pool sees width x 32 channels
        _check_heads("model.vision", vision.width * 32, vision.heads, "width x 32")
        if c.model.patch_dropout:
            _refuse(
                "model.patch_dropout",
                c.model.patch_dropout,
                "0 with a ResNet image tower (patch dropout drops a ViT's patch tokens)",
            )
    _check_heads("model.text", text.width, text.heads)
    if text.pool_type == "eot" and text.eot_token_id is None:
        raise UsageError("model.text.pool_type='eot' needs model.text.eot_token_id")
    if text.eot_token_id is not None and text.eot_token_id >= text.vocab_size:
        _refuse(
            "model.text.eot_token_id",
            text.eot_token_id,
            f"an id below model.text.vocab_size={text.vocab_size}",
        )
    if c.loss.name == "sigmoid" and c.model.init_logit_bias is None:
        raise UsageError(
            "loss.name='sigmoid' needs a learned bias: set model.init_logit_bias (SigLIP: -10)"
        )
    if (
        c.loss.name == "softmax"
        and c.model.init_logit_bias is not None
        and not c.loss.get("allow_mismatch", False)
    ):
        raise UsageError(
            f"loss.name='softmax' with a model that has a logit bias (model.init_logit_bias="
            f"{c.model.init_logit_bias}): the bias and temperature belong to SigLIP's sigmoid "
            "loss, which softmax would silently retrain; use loss.name=sigmoid, or set "
            "loss.allow_mismatch=True to train this model with CLIP's loss on purpose"
        )


def _check_heads(tower: str, width: int, heads: int, what: str = "width") -> None:
    if width % heads:
        _refuse(f"{tower}.heads", heads, f"a divisor of the {what}, {width}")


def _check_eval(name: str, entry: Any) -> None:
    if not isinstance(entry, Mapping | ml_collections.ConfigDict):
        _refuse(f"evals.{name}", entry, "dict(type=..., source=..., ...)")
    cfg = registry.entry_config(name, entry)
    for key, spec in registry.keys(cfg["type"]).items():
        if not spec.rule.ok(cfg[key]):
            _refuse(f"evals.{name}.{key}", cfg[key], spec.rule.allowed)


def config_meanings() -> dict[str, str]:
    """One line per config key: the config files' (`configs/common.py`, when the config came
    from there) and the eval entries' (`evals.NAME.KEY`, next to their defaults)."""
    common = sys.modules.get("configs.common")
    evals = {f"evals.*.{key}": spec.meaning for key, spec in registry.keys().items()}
    return {**getattr(common, "MEANINGS", {}), **evals}
