"""The entries of `config.evals`: each type's keys, their defaults and one-line meanings (the
one place they are stated), and `entry_config`, which fills an entry in and checks it."""

from collections.abc import Mapping
from typing import Any

from clip_jax.infra.errors import UsageError

# Each type's keys and their defaults: the one place they are stated. `source` is the dataset
# evaluated (the test split of probes); `every_steps=0` runs an eval at the end of training only.
COMMON = dict(
    source="",
    every_steps=0,
    batch_size=256,
    data_dir="",
    image_key="",
    label_key="",
    text_key="",
    image_id_key="",
)
DEFAULTS: dict[str, dict[str, Any]] = {
    "zeroshot": dict(classnames="", templates="imagenet", class_subset=""),
    "retrieval": dict(ks=(1, 5, 10), max_captions=7),
    "linear_probe": dict(
        train_source="", val_source="", features="pre", val_fraction=0.2, seed=0, cache_dir=""
    ),
    "fewshot": dict(
        train_source="", features="pre", shots=(1, 5, 10, 25), seeds=(0, 1, 2), cache_dir=""
    ),
}
# One line per key, what `python -m clip_jax.main --show_config` prints beside an entry's values.
MEANINGS = {
    "type": "zeroshot, retrieval, linear_probe or fewshot",
    "source": "the data evaluated: tfds:NAME[/CONFIG]:SPLIT, imagefolder:DIR or tfrecord:GLOB",
    "every_steps": "run every this many steps, and at the end (0: at the end only)",
    "batch_size": "global batch of the eval's forward passes",
    "data_dir": "tfds data_dir ('': tfds's default)",
    "image_key": "the records' image feature ('': the source's default)",
    "label_key": "the records' int64 label feature ('': label)",
    "text_key": "the records' caption feature ('': txt)",
    "image_id_key": "the feature grouping one image's captions for retrieval ('': key)",
    "classnames": "class names: a known name, a list or a file ('': the dataset's own)",
    "templates": "prompt templates with {}: a known name, a list or a file",
    "class_subset": "score only these classes of ImageNet (imagenet_r, imagenet_a)",
    "ks": "recall@K for these K",
    "max_captions": "captions kept per image",
    "train_source": "the data a probe is fitted on",
    "val_source": "the split choosing C ('': held out from train_source)",
    "features": "pre (image features before the projection) or post",
    "val_fraction": "share of train_source held out to choose C",
    "seed": "seeds the held-out split",
    "cache_dir": "where extracted features are cached ('': beside the run)",
    "shots": "examples per class of each k-shot probe",
    "seeds": "seeds of the k-shot draws, averaged",
}
FEATURES = ("pre", "post")


def entry_config(name: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """An eval's entry with every key filled in; unknown types and keys are errors."""
    entry = dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)
    kind = entry.pop("type", None)
    if kind not in DEFAULTS:
        raise UsageError(f"evals.{name}.type={kind!r}; choose one of {sorted(DEFAULTS)}")
    known = {**COMMON, **DEFAULTS[kind]}
    unknown = sorted(set(entry) - set(known))
    if unknown:
        raise UsageError(f"evals.{name}: unknown key(s) {unknown}; {kind} takes {sorted(known)}")
    cfg = {**known, **entry, "type": kind, "name": name}
    if not cfg["source"]:
        from clip_jax.evals.data import SOURCE_HELP

        raise UsageError(f"evals.{name}.source is empty; {SOURCE_HELP}")
    if kind in ("linear_probe", "fewshot"):
        if not cfg["train_source"]:
            raise UsageError(f"evals.{name}.train_source is empty: a {kind} trains on it")
        if cfg["features"] not in FEATURES:
            raise UsageError(f"evals.{name}.features={cfg['features']!r}; choose pre or post")
    return cfg
