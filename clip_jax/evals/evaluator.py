"""What every eval type shares. An eval type is one module of this folder holding a subclass of
`Evaluator` (big_vision's evaluators are the model): its keys (`KEYS`: default, one-line meaning
and allowed values of each), its checks (`__init__`), what it computes per batch and its
`evaluate`. `registry.TYPES` names the types; a config entry picks one:

    config.evals.cifar10 = dict(type="zeroshot", source="tfds:cifar10:test", every_steps=5000)

`run(variables) -> {metric key: value}` is the one method the trainer and the batch jobs call;
keys are `TYPE/NAME/METRIC` (`zeroshot/cifar10/top1`) plus `eval/NAME/seconds`. This module
opens the entry's data, compiles the per-batch function on the mesh, extracts over the whole
source (with a feature cache where asked) and makes every process agree on the result.
"""

import abc
import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from clip_jax.data import tokenizers
from clip_jax.data.preprocess import INTERPOLATIONS, RESIZE_MODES, Preprocess
from clip_jax.data.sources import EVAL_SOURCE_HELP
from clip_jax.evals import extract
from clip_jax.infra import paths
from clip_jax.infra.errors import UsageError
from clip_jax.infra.rules import COUNT, POSITIVE_INT, STRING, Rule, is_number, is_seq, one_of
from clip_jax.parallel import sharding

PredictFn = Callable[[Any, dict, Any], dict]  # (variables, batch, extra) -> per-example outputs
STATS = Rule(
    lambda v: v in ((), []) or (is_seq(v, is_number) and len(v) == 3),
    "three numbers, one per RGB channel, or () for the weights' own",
)


class Key(NamedTuple):
    """One key of an eval entry: its default, what `--show_config` says of it, what it allows."""

    default: Any
    meaning: str
    rule: Rule


class Evaluator(abc.ABC):
    """One eval over one model: its data opened, its compiled functions built on first use.

    Subclasses set `KEYS` (their own keys; the common ones below are added), `TASK`
    (CLIP_benchmark's task name), `TEXT` (whether they embed text, so that the tokenizer must end
    captions where the text tower pools) and implement `evaluate`.
    """

    # Keys every entry has. `source` is the data evaluated (the test split of probes);
    # `every_steps=0` runs the eval at the end of training only.
    KEYS: ClassVar[dict[str, Key]] = {
        "source": Key("", f"the data evaluated: {EVAL_SOURCE_HELP.removeprefix('use ')}", STRING),
        "every_steps": Key(
            0,
            "run every this many steps, and at the end (0: at the end only)",
            Rule(COUNT.ok, "an integer >= 0 (0: at the end only)"),
        ),
        "batch_size": Key(256, "global batch of the eval's forward passes", POSITIVE_INT),
        "data_dir": Key("", "tfds data_dir ('': tfds's default)", STRING),
        "image_key": Key("", "the records' image feature ('': the source's default)", STRING),
        "label_key": Key("", "the records' int64 label feature ('': label)", STRING),
        "text_key": Key("", "the records' caption feature ('': txt)", STRING),
        "image_id_key": Key(
            "", "the feature grouping one image's captions for retrieval ('': key)", STRING
        ),
        "resize_mode": Key(
            "",
            "shortest (shorter side to S, centre crop), longest (longer side to S, padded) or "
            "squash; '': the weights' protocol (shortest for CLIP's)",
            one_of(("", *RESIZE_MODES)),
        ),
        "interpolation": Key(
            "", "bicubic or bilinear; '': the weights' protocol", one_of(("", *INTERPOLATIONS))
        ),
        "mean": Key((), "pixel mean per RGB channel, in [0, 1]; (): the weights' (CLIP's)", STATS),
        "std": Key((), "pixel standard deviation per RGB channel; (): the weights'", STATS),
    }
    TASK: ClassVar[str] = ""
    TEXT: ClassVar[bool] = False

    def __init__(
        self, cfg: dict[str, Any], model: Any, tokenizer: Any, mesh: Mesh, rules: sharding.Rules
    ):
        self.cfg, self.model, self.tokenizer, self.mesh = cfg, model, tokenizer, mesh
        self.rules = rules
        self.name, self.kind = cfg["name"], cfg["type"]
        if self.TEXT:
            tokenizers.check_pooling(
                tokenizer,
                model.text,
                "of this evaluation",
                fix="evaluate with the tokenizer the model was trained with (clip_jax.evaluate: "
                "--tokenizer)",
            )
        self.every_steps = int(cfg["every_steps"])
        self._steps: dict[str, Any] = {}
        self.dropped_captions = 0
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if cfg["batch_size"] % shards:
            raise UsageError(
                f"evals.{self.name}.batch_size={cfg['batch_size']} is not divisible by the "
                f"{shards} batch shards of the mesh"
            )
        size = int(model.vision["image_size"])
        self.preprocess = Preprocess(
            size,
            **{k: cfg[k] for k in ("resize_mode", "interpolation") if cfg.get(k)},
            **{k: tuple(cfg[k]) for k in ("mean", "std") if cfg.get(k)},
        )
        self.source = self.open(cfg["source"])

    @classmethod
    def keys(cls) -> dict[str, Key]:
        """Every key of this type's entries: the common ones and its own."""
        return {**Evaluator.KEYS, **cls.KEYS}

    @classmethod
    def check(cls, cfg: Mapping[str, Any]) -> None:
        """Checks between an entry's keys that need no data (a UsageError naming the key); most
        types have none."""
        del cfg

    @abc.abstractmethod
    def evaluate(self, variables: Any, model_id: str, cache_root: str) -> dict[str, float]:
        """This eval's metrics {METRIC: value}, computed on process 0 at least (the others may
        return {}: `run` shares process 0's)."""

    def open(self, spec: str) -> Any:
        """An eval source of this entry (`data.EvalSource`), with its key settings."""
        from clip_jax.evals import data  # TensorFlow, once data is read (see `extract`)

        c = self.cfg
        return data.open_source(
            spec,
            data_dir=c["data_dir"],
            image_key=c["image_key"],
            label_key=c["label_key"],
            text_key=c["text_key"],
            image_id_key=c["image_id_key"],
        )

    def require_labels(self, *sources: Any) -> None:
        for src in sources:
            if src is not None and not src.has_labels:
                raise UsageError(f"evals.{self.name}: {src.name} has no labels")

    def extract(
        self,
        what: str,
        predict_fn: Callable[[], PredictFn],
        variables: Any,
        source: Any,
        *,
        max_captions: int = 0,
        cache_dir: str = "",
        meta: Mapping[str, Any] | None = None,
        extra: Any = None,
    ) -> tuple[dict[str, np.ndarray], int]:
        """`predict_fn()`'s outputs over every example of `source` (per-example arrays, in order)
        and the number of undecodable images skipped. `what` names the compiled function, which is
        built once; `max_captions > 0` tokenizes up to that many captions per image."""
        # TensorFlow is imported when data is first read, not with the eval types: imported
        # before torch's triton (open_clip), it makes that import crash the process.
        from clip_jax.evals import data

        if what not in self._steps:
            self._steps[what] = extract.make_step(predict_fn(), self.mesh, self.rules)
        batch = self.cfg["batch_size"]
        rows = sharding.local_rows(self.mesh, batch)
        stats: dict[str, int] = {}

        def make_batches(start):
            return data.batches(
                source,
                preprocess=self.preprocess,
                global_batch=batch,
                rows=rows,
                start=start,
                stats=stats,
                tokenize_fn=self.tokenizer.tokenize if max_captions else None,
                max_captions=max_captions,
            )

        cache = None
        if cache_dir:
            cache = extract.FeatureCache(
                cache_dir,
                {
                    **(meta or {}),
                    "source": source.name,
                    "examples": source.num_examples,
                    "batch_size": batch,
                    "preprocess": dataclasses.asdict(self.preprocess),
                },
                16,
            )
        out = extract.run(
            self._steps[what],
            variables,
            make_batches,
            mesh=self.mesh,
            global_batch=batch,
            total_batches=data.num_batches(source.num_examples, batch),
            cache=cache,
            label=f"{self.name} {source.name}",
            extra=extra,
        )
        skipped = sum_over_processes(stats["skipped"])
        if skipped:
            logging.warning(
                "%s: %d undecodable images skipped in %s", self.name, skipped, source.name
            )
        self.dropped_captions = sum_over_processes(stats["dropped_captions"])
        if self.dropped_captions:
            logging.warning(
                "%s: %d captions past max_captions=%d left out of %s",
                self.name,
                self.dropped_captions,
                max_captions,
                source.name,
            )
        return out, skipped

    def run(self, variables: Any, model_id: str = "", cache_root: str = "") -> dict[str, float]:
        """This eval's metrics for `variables`, the same on every process.

        Args:
          variables: the model's variables (on the mesh, or anywhere: they are replicated).
          model_id: names the weights (a run and step, a file and its date) in the feature
            caches of probes, so that a cache is only reused for the same weights.
          cache_root: where probes cache features (`cache_dir` of the entry wins); "": nowhere.
        """
        t0 = time.perf_counter()
        variables = extract.replicate(variables, self.mesh)
        failure = None
        try:
            metrics = self.evaluate(variables, model_id, cache_root)
        except Exception as e:  # noqa: BLE001  re-raised below, once every process knows
            metrics, failure = None, e
        # The probes fit on process 0 alone: every process must learn its result, or its error,
        # instead of waiting for a broadcast that never comes.
        shared = extract.broadcast_json(
            {
                "metrics": metrics,
                "error": None if failure is None else str(failure),
                "user_error": isinstance(failure, UsageError),
            }
            if jax.process_index() == 0
            else None
        )
        if failure is not None:
            raise failure
        if shared["error"] is not None:
            kind = UsageError if shared["user_error"] else RuntimeError
            raise kind(f"evals.{self.name} failed on process 0: {shared['error']}")
        out = {f"{self.kind}/{self.name}/{k}": float(v) for k, v in shared["metrics"].items()}
        out[f"eval/{self.name}/seconds"] = time.perf_counter() - t0
        return out


FEATURES = ("pre", "post")  # image features before or after the projection


class FeatureProbe(Evaluator):
    """What the probes share: a classifier fitted on frozen image features of `train_source`,
    scored on `source`; the features are extracted once and cached, and the fit runs on process
    0 alone."""

    KEYS: ClassVar[dict[str, Key]] = {
        "train_source": Key("", "the data a probe is fitted on", STRING),
        "features": Key(
            "pre", "pre (image features before the projection) or post", one_of(FEATURES)
        ),
        "cache_dir": Key("", "where extracted features are cached ('': beside the run)", STRING),
    }

    @classmethod
    def check(cls, cfg: Mapping[str, Any]) -> None:
        name, kind = cfg["name"], cfg["type"]
        if not cfg["train_source"]:
            raise UsageError(f"evals.{name}.train_source is empty: a {kind} trains on it")
        if cfg["features"] not in FEATURES:
            raise UsageError(f"evals.{name}.features={cfg['features']!r}; choose pre or post")

    def __init__(self, cfg, model, tokenizer, mesh, rules):
        super().__init__(cfg, model, tokenizer, mesh, rules)
        self.train_source = self.open(cfg["train_source"])
        self.val_source = self.open(cfg["val_source"]) if cfg.get("val_source") else None
        self.require_labels(self.source, self.train_source, self.val_source)

    def _predict_features(self) -> PredictFn:
        project = self.cfg["features"] == "post"
        model, protocol = self.model, self.preprocess

        def predict(variables, batch, extra):
            del extra
            images = extract.normalize(batch["image"], protocol.mean, protocol.std)
            return {"x": model.apply(variables, images, project=project, method="encode_image")}

        return predict

    def features(self, variables, source, split, model_id, cache_root) -> tuple[np.ndarray, ...]:
        """(x [N, D], y [N]) of `source` on process 0 (empty arrays on the others)."""
        cache_dir = self.cfg["cache_dir"] or cache_root
        if cache_dir:
            cache_dir = str(paths.path(cache_dir) / self.name / split)
        meta = {"features": self.cfg["features"], "model": model_id}
        out, _ = self.extract(
            "features",
            self._predict_features,
            variables,
            source,
            cache_dir=cache_dir,
            meta=meta,
        )
        if jax.process_index() != 0:  # only process 0 holds the cached part; it fits alone
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int32)
        x, y = out.get("x", np.zeros((0, 0), np.float32)), out.get("label", np.zeros(0, np.int32))
        if len(y) == 0:
            raise UsageError(f"evals.{self.name}: {source.name} has no usable example")
        if y.min() < 0:
            raise UsageError(
                f"evals.{self.name}: {int((y < 0).sum())} records of {source.name} have no label"
            )
        return x, y

    def probe_data(self, variables, model_id, cache_root):
        """The (x, y) of the train, validation (None without val_source) and test splits."""
        train = self.features(variables, self.train_source, "train", model_id, cache_root)
        test = self.features(variables, self.source, "test", model_id, cache_root)
        val = None
        if self.val_source is not None:
            val = self.features(variables, self.val_source, "val", model_id, cache_root)
        return train, val, test

    def num_classes(self, train_y: np.ndarray, test_y: np.ndarray) -> int:
        """The dataset's class count where it says (some classes may be absent from a split)."""
        seen = int(max(train_y.max(), test_y.max())) + 1
        return max(seen, len(self.source.classnames or ()))


def sum_over_processes(n: int) -> int:
    if jax.process_count() == 1:
        return int(n)
    from jax.experimental import multihost_utils

    return int(multihost_utils.process_allgather(np.array([n], np.int32)).sum())
