"""The training input: a source chosen by `train_data.source` (see `sources` for the interface).

    synthetic                       learnable synthetic pairs, no files (tests, smoke runs)
    tfrecord:GLOB                   img2dataset-style TFRecord shards, local or gs://
    wds:GLOB                        webdataset tar shards (img2dataset, DataComp): KEY.jpg|png|
                                    webp with KEY.txt or the caption of KEY.json, local or gs://
    tfds:NAME[/CONFIG]:SPLIT        a prepared TensorFlow Datasets split (captions or labels)
    digits:train                    the demo's 1,497 captioned handwritten digits (scikit-learn's),
                                    written to the cache on first use (`digits.cached_shards`)
    SOURCE@W,SOURCE@W,...           a mixture: each example drawn from a source with probability
                                    proportional to its weight W (default 1)

e.g. `--config.train_data.source='tfrecord:gs://b/laion/*.tfrecord@0.7,tfds:coco_captions:train@0.3'`.

`cfg` is the whole `train_data` config: every key of it is read (their defaults and meanings
are `configs/common.py`'s).
"""

from typing import Any

import ml_collections

from clip_jax.data.sources import SyntheticSource
from clip_jax.infra.errors import UsageError

SOURCE_HELP = (
    "use synthetic, tfrecord:GLOB, wds:GLOB, tfds:NAME[/CONFIG]:SPLIT, or several sources joined "
    "by ',' each with an optional @WEIGHT"
    " (digits:train is the demo's handwritten digits)"
)


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """'a@0.7,b@0.3' -> [('a', 0.7), ('b', 0.3)]; a source without @WEIGHT weighs 1."""
    parts = []
    for item in spec.split(","):
        name, at, weight = item.strip().rpartition("@")
        if not at:
            name, weight = item.strip(), "1"
        try:
            w = float(weight)
        except ValueError:
            raise UsageError(
                f"train_data.source: weight {weight!r} of {name!r} is not a number (a path "
                "holding '@' needs an explicit weight: PATH@1)"
            ) from None
        if not w > 0:
            raise UsageError(f"train_data.source: weight of {name!r} must be positive, not {w}")
        parts.append((name, w))
    return parts


def make_reader(
    spec: str,
    cfg: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int,
    process_count: int,
) -> Any:
    """One `readers` object for a single (unmixed) source string."""
    from clip_jax.data import readers

    common = dict(
        seed=seed,
        shuffle_buffer=cfg.shuffle_buffer,
        process_index=process_index,
        process_count=process_count,
    )
    kind, _, rest = spec.partition(":")
    if kind == "tfrecord" and rest:
        return readers.TFRecordReader(
            rest, image_key=cfg.image_key, text_key=cfg.text_key, **common
        )
    if kind == "wds" and rest:
        return readers.WebDatasetReader(rest, **common)
    if kind == "digits":
        from clip_jax.data import digits, prepare

        return readers.TFRecordReader(
            digits.cached_shards(rest),
            image_key=prepare.IMAGE_KEY,  # the shards are written by `prepare`, whatever the config
            text_key=prepare.TEXT_KEY,
            **common,
        )
    name, _, split = rest.partition(":")
    if kind == "tfds" and name and split:
        return readers.TFDSReader(
            name,
            split,
            data_dir=cfg.data_dir or None,  # "": tfds's own
            image_key=cfg.image_key,
            text_key=cfg.text_key,
            templates=tuple(cfg.templates),
            **common,
        )
    if spec == "synthetic":
        raise UsageError("train_data.source: synthetic cannot be part of a mixture")
    raise UsageError(f"unknown train_data.source {spec!r}; {SOURCE_HELP}")


def make_source(
    cfg: ml_collections.ConfigDict,
    *,
    seed: int,
    image_size: int,
    context_length: int,
    vocab_size: int,
    process_index: int,
    process_count: int,
    tokenizer: Any = None,
) -> Any:
    """The source named by `cfg.source`, reading this process's share of the data.

    Args:
      cfg: the `train_data` config.
      seed: the run's seed; the same seed gives the same batches.
      image_size, context_length, vocab_size: what the model takes.
      process_index, process_count: this process among those reading (jax.process_*).
      tokenizer: a `tokenizers.Tokenizer` to use instead of `cfg.tokenizer` (tests). Unused by
        `synthetic`, whose captions end in the highest id.
    Returns:
      the source; its `tokenizer` is what tokenizes its captions (None for `synthetic`).
    """
    spec = str(cfg["source"]).strip()
    if not spec:
        raise UsageError(
            "train_data.source is empty: give the data to train on, e.g. "
            "--config.train_data.source=tfrecord:gs://bucket/shards-*.tfrecord or "
            "tfds:NAME:SPLIT, or --config.train_data.source=synthetic for random pairs"
        )
    if spec == "synthetic":
        return SyntheticSource(seed, image_size, context_length, vocab_size=vocab_size)
    parts = parse_mixture(spec)
    readers = [
        make_reader(
            name,
            cfg,
            seed=seed * 1009 + j,
            process_index=process_index,
            process_count=process_count,
        )
        for j, (name, _) in enumerate(parts)
    ]
    if tokenizer is None:
        from clip_jax.data import tokenizers

        tokenizer = tokenizers.get_tokenizer(cfg.tokenizer, context_length)
    if tokenizer.context_length != context_length or tokenizer.vocab_size > vocab_size:
        raise UsageError(
            f"tokenizer {cfg.tokenizer!r} (context {tokenizer.context_length}, "
            f"vocabulary {tokenizer.vocab_size}) does not fit the model (context "
            f"{context_length}, vocabulary {vocab_size}); change model.text or train_data.tokenizer"
        )
    from clip_jax.data.tfdata import TFDataSource

    return TFDataSource(
        readers,
        tokenizer=tokenizer,
        seed=seed,
        image_size=image_size,
        context_length=context_length,
        augmentation=cfg.augmentation,
        weights=[w for _, w in parts],
        crop_scale=tuple(cfg.crop_scale),
        process_index=process_index,
        max_image_pixels=cfg.max_image_pixels,
    )
