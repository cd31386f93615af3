"""The eval types by name, and the entries of `config.evals` that pick them.

    config.evals.cifar10 = dict(type="zeroshot", source="tfds:cifar10:test", every_steps=5000)
    config.evals.coco = dict(type="retrieval", source="tfds:coco_captions:val")
    config.evals.probe = dict(type="linear_probe", train_source="tfds:cifar10:train",
                              source="tfds:cifar10:test", features="pre")
    config.evals.shots = dict(type="fewshot", train_source=..., source=..., shots=(1, 5, 10))

A new eval type is one module of this folder with an `evaluator.Evaluator` subclass, and one line
in `TYPES`. Its keys, their defaults, meanings and allowed values are the class's `KEYS`.
"""

from collections.abc import Mapping
from typing import Any

from jax.sharding import Mesh

from clip_jax.data.sources import EVAL_SOURCE_HELP
from clip_jax.evals.evaluator import Evaluator, Key
from clip_jax.evals.fewshot import FewShot
from clip_jax.evals.linear_probe import LinearProbe
from clip_jax.evals.retrieval import Retrieval
from clip_jax.evals.zeroshot import ZeroShot
from clip_jax.infra.errors import UsageError
from clip_jax.infra.rules import STRING

TYPES: dict[str, type[Evaluator]] = {
    "zeroshot": ZeroShot,
    "retrieval": Retrieval,
    "linear_probe": LinearProbe,
    "fewshot": FewShot,
}


def entry_config(name: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """An eval's entry with every key filled in; unknown types and keys are errors."""
    entry = dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)
    kind = entry.pop("type", None)
    if kind not in TYPES:
        raise UsageError(f"evals.{name}.type={kind!r}; choose one of {sorted(TYPES)}")
    keys = TYPES[kind].keys()
    unknown = sorted(set(entry) - set(keys))
    if unknown:
        raise UsageError(f"evals.{name}: unknown key(s) {unknown}; {kind} takes {sorted(keys)}")
    cfg = {**{k: key.default for k, key in keys.items()}, **entry, "type": kind, "name": name}
    if not cfg["source"]:
        raise UsageError(f"evals.{name}.source is empty; {EVAL_SOURCE_HELP}")
    TYPES[kind].check(cfg)
    return cfg


def keys(kind: str | None = None) -> dict[str, Key]:
    """The keys of an entry of type `kind`, or of any type (`type` among them)."""
    kinds = [kind] if kind else list(TYPES)
    out = {"type": Key(None, ", ".join(TYPES) + " (the eval type)", STRING)}
    for k in kinds:
        out.update(TYPES[k].keys())
    return out


def make_evaluator(
    name: str, entry: Mapping[str, Any], model: Any, tokenizer: Any, mesh: Mesh, rules: Any
) -> Evaluator:
    """The evaluator of entry `evals.NAME` over `model` on `mesh` (its data opened)."""
    cfg = entry_config(name, entry)
    return TYPES[cfg["type"]](cfg, model, tokenizer, mesh, rules)
