"""Evaluators: one eval of `config.evals` over one model. Each entry names one:

    config.evals.cifar10 = dict(type="zeroshot", source="tfds:cifar10:test", every_steps=5000)
    config.evals.coco = dict(type="retrieval", source="tfds:coco_captions:val")
    config.evals.probe = dict(type="linear_probe", train_source="tfds:cifar10:train",
                              source="tfds:cifar10:test", features="pre")
    config.evals.shots = dict(type="fewshot", train_source=..., source=..., shots=(1, 5, 10))

An `Evaluator` is built from its entry (`entries.entry_config` fills in and checks its keys) and the
model, and has one method, `run(variables) -> {metric key: value}` (big_vision's evaluators are
the model); `runner` schedules them. Keys: `zeroshot/NAME/top1`, `.../top5`,
`.../mean_per_class_recall`, `retrieval/NAME/image_to_text_r@1`, ..., `linear_probe/NAME/top1`,
`linear_probe/NAME/C`, `fewshot/NAME/10shot`, and `eval/NAME/seconds` for each.
"""

import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from clip_jax.data import tokenizers
from clip_jax.evals import (
    extract,
    fewshot,
    linear_probe,
    prompts,
    retrieval,
    suites,
    zeroshot,
)
from clip_jax.infra import paths
from clip_jax.infra.errors import UsageError
from clip_jax.models.clip import l2_normalize
from clip_jax.parallel import sharding


class Evaluator:
    """One eval over one model: its data opened, its compiled functions built on first use."""

    def __init__(
        self, cfg: dict[str, Any], model: Any, tokenizer: Any, mesh: Mesh, rules: sharding.Rules
    ):
        self.cfg, self.model, self.tokenizer, self.mesh = cfg, model, tokenizer, mesh
        self.rules = rules
        self.name, self.kind = cfg["name"], cfg["type"]
        if self.kind in TEXT_KINDS:  # these embed text: the tokenizer must end it where pooled
            tokenizers.check_pooling(
                tokenizer,
                model.text,
                "of this evaluation",
                fix="evaluate with the tokenizer the model was trained with (clip_jax.evaluate: "
                "--tokenizer)",
            )
        self.every_steps = int(cfg["every_steps"])
        self._steps: dict[str, Any] = {}
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if cfg["batch_size"] % shards:
            raise UsageError(
                f"evals.{self.name}.batch_size={cfg['batch_size']} is not divisible by the "
                f"{shards} batch shards of the mesh"
            )
        self.source = self._open(cfg["source"])
        # Keys of the probe types alone (`entries.DEFAULTS`); linear_probe's val_source may be "".
        self.train_source = self._open(cfg["train_source"]) if "train_source" in cfg else None
        self.val_source = self._open(cfg["val_source"]) if cfg.get("val_source") else None
        self._dropped_captions = 0
        if self.kind == "zeroshot":
            self._zeroshot_classes(cfg)
        if self.kind == "retrieval" and not self.source.has_captions:
            raise UsageError(f"evals.{self.name}: {self.source.name} has no captions to retrieve")
        if self.kind in ("zeroshot", "linear_probe", "fewshot"):
            for src in (self.source, self.train_source, self.val_source):
                if src is not None and not src.has_labels:
                    raise UsageError(f"evals.{self.name}: {src.name} has no labels")

    def _zeroshot_classes(self, cfg: dict[str, Any]) -> None:
        """Class names and templates; with `class_subset` (ImageNet-R/A) only the subset's
        classes are scored and the dataset's labels are mapped onto them."""
        names = (
            cfg["classnames"] or suites.classnames_for(self.source.name) or self.source.classnames
        )
        if not names:
            raise UsageError(
                f"evals.{self.name}: {self.source.name} carries no class names; set classnames "
                "(a known dataset name, a list, or a file with one name per line)"
            )
        self.classnames = prompts.classnames(names)
        if any(suites.WNID.fullmatch(n) for n in self.classnames):
            raise UsageError(
                f"evals.{self.name}: the class names of {self.source.name} are WordNet ids "
                f"({self.classnames[0]}, ...), not words; set classnames (e.g. 'imagenet')"
            )
        self.templates = prompts.templates(cfg["templates"])
        self.label_map = None
        if cfg["class_subset"]:
            subset = prompts.class_subset(cfg["class_subset"])
            if max(subset) >= len(self.classnames):
                raise UsageError(
                    f"evals.{self.name}: class_subset {cfg['class_subset']!r} indexes up to "
                    f"{max(subset)}, but there are {len(self.classnames)} class names"
                )
            self.label_map = np.full(len(self.classnames), -1, np.int64)
            self.label_map[subset] = np.arange(len(subset))
            self.classnames = [self.classnames[i] for i in subset]

    def _open(self, spec: str) -> Any:
        from clip_jax.evals import data

        c = self.cfg
        return data.open_source(
            spec,
            data_dir=c["data_dir"],
            image_key=c["image_key"],
            label_key=c["label_key"],
            text_key=c["text_key"],
            image_id_key=c["image_id_key"],
        )

    def _step(self, what: str) -> Any:
        """This evaluator's jitted per-batch function, built and compiled once."""
        if what not in self._steps:
            self._steps[what] = extract.make_step(
                PREDICT_FNS[what](self.model, self), self.mesh, self.rules
            )
        return self._steps[what]

    def _extract(
        self, what, variables, source, with_text=False, cache_dir="", meta=None, extra=None
    ):
        from clip_jax.evals import data

        size = self.model.vision["image_size"]
        batch = self.cfg["batch_size"]
        rows = sharding.local_rows(self.mesh, batch)
        stats: dict[str, int] = {}

        def make_batches(start):
            return data.batches(
                source,
                image_size=size,
                global_batch=batch,
                rows=rows,
                start=start,
                stats=stats,
                tokenize_fn=self.tokenizer.tokenize if with_text else None,
                # Shards of one caption per record (grouped by image id) need one row each.
                max_captions=(1 if source.has_image_ids else self.cfg["max_captions"])
                if with_text
                else 0,
            )

        total = data.num_batches(source.num_examples, batch)
        cache = None
        if cache_dir:
            cache = extract.FeatureCache(
                cache_dir,
                {
                    **(meta or {}),
                    "source": source.name,
                    "examples": source.num_examples,
                    "batch_size": batch,
                    "image_size": size,
                },
                16,
            )
        out = extract.run(
            self._step(what),
            variables,
            make_batches,
            mesh=self.mesh,
            global_batch=batch,
            total_batches=total,
            cache=cache,
            label=f"{self.name} {source.name}",
            extra=extra,
        )
        skipped = _sum_over_processes(stats["skipped"])
        if skipped:
            logging.warning(
                "%s: %d undecodable images skipped in %s", self.name, skipped, source.name
            )
        self._dropped_captions = _sum_over_processes(stats["dropped_captions"])
        if self._dropped_captions:
            logging.warning(
                "%s: %d captions past max_captions=%d left out of %s",
                self.name,
                self._dropped_captions,
                self.cfg["max_captions"],
                source.name,
            )
        return out, skipped

    def run(self, variables: Any, model_id: str = "", cache_root: str = "") -> dict:
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
            metrics = getattr(self, f"_run_{self.kind}")(variables, model_id, cache_root)
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
        metrics = shared["metrics"]
        out = {f"{self.kind}/{self.name}/{k}": float(v) for k, v in metrics.items()}
        out[f"eval/{self.name}/seconds"] = time.perf_counter() - t0
        return out

    def _run_zeroshot(self, variables, model_id, cache_root) -> dict:
        classifier = zeroshot.build_classifier(
            self.model,
            variables,
            self.tokenizer,
            self.classnames,
            self.templates,
            mesh=self.mesh,
            rules=self.rules,
        )
        classifier = extract.replicate(classifier, self.mesh)
        out, skipped = self._extract("zeroshot", variables, self.source, extra=classifier)
        labels = out["label"]
        if self.label_map is not None:
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.label_map)):
                raise UsageError(
                    f"evals.{self.name}: labels range over [{labels.min()}, {labels.max()}], "
                    f"outside the {len(self.label_map)} classes that class_subset maps"
                )
            labels = self.label_map[labels]
        metrics = zeroshot.classification_metrics(out["top"], labels, len(self.classnames))
        return {**metrics, **({"skipped": skipped} if skipped else {})}

    def _run_retrieval(self, variables, model_id, cache_root) -> dict:
        out, _ = self._extract("retrieval", variables, self.source, with_text=True)
        image_emb, text_emb, text_ids = group_captions(out)
        metrics = retrieval.metrics(image_emb, text_emb, text_ids, ks=tuple(self.cfg["ks"]))
        if self._dropped_captions:
            metrics["dropped_captions"] = self._dropped_captions
        return metrics

    def _features(self, variables, source, split, model_id, cache_root) -> tuple[np.ndarray, ...]:
        cache_dir = self.cfg["cache_dir"] or cache_root
        if cache_dir:
            cache_dir = str(paths.path(cache_dir) / self.name / split)
        meta = {"features": self.cfg["features"], "model": model_id}
        out, _ = self._extract("features", variables, source, cache_dir=cache_dir, meta=meta)
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

    def _probe_data(self, variables, model_id, cache_root):
        train = self._features(variables, self.train_source, "train", model_id, cache_root)
        test = self._features(variables, self.source, "test", model_id, cache_root)
        val = None
        if self.val_source is not None:
            val = self._features(variables, self.val_source, "val", model_id, cache_root)
        return train, val, test

    def _run_linear_probe(self, variables, model_id, cache_root) -> dict:
        (train_x, train_y), val, (test_x, test_y) = self._probe_data(
            variables, model_id, cache_root
        )
        if jax.process_index() != 0:  # the fit runs once; its result is broadcast
            return {}
        num_classes = self._num_classes(train_y, test_y)
        result = linear_probe.sweep_and_evaluate(
            train_x,
            train_y,
            test_x,
            test_y,
            val_fraction=self.cfg["val_fraction"],
            seed=self.cfg["seed"],
            num_classes=num_classes,
            **({"val_x": val[0], "val_y": val[1]} if val is not None else {}),
        )
        return {"top1": result["top1"], "C": result["C"], "val_top1": result["val_top1"]}

    def _num_classes(self, train_y: np.ndarray, test_y: np.ndarray) -> int:
        """The dataset's class count where it says (some classes may be absent from a split)."""
        seen = int(max(train_y.max(), test_y.max())) + 1
        return max(seen, len(self.source.classnames or ()))

    def _run_fewshot(self, variables, model_id, cache_root) -> dict:
        (train_x, train_y), _, (test_x, test_y) = self._probe_data(variables, model_id, cache_root)
        if jax.process_index() != 0:
            return {}
        num_classes = self._num_classes(train_y, test_y)
        return fewshot.fewshot_accuracies(
            train_x,
            train_y,
            test_x,
            test_y,
            shots=tuple(self.cfg["shots"]),
            seeds=tuple(self.cfg["seeds"]),
            num_classes=num_classes,
        )


def _retrieval_predict(model: Any, evaluator: Evaluator):
    def predict(variables, batch, extra):
        del extra
        images = extract.normalize(batch["image"])
        zimg = model.apply(variables, images, method="encode_image")
        tokens = batch["tokens"]  # [B, M, L]
        b, m, length = tokens.shape
        ztxt = model.apply(variables, tokens.reshape(b * m, length), method="encode_text")
        return {"image_emb": l2_normalize(zimg), "text_emb": l2_normalize(ztxt).reshape(b, m, -1)}

    return predict


def _features_predict(model: Any, evaluator: Evaluator):
    project = evaluator.cfg["features"] == "post"

    def predict(variables, batch, extra):
        del extra
        images = extract.normalize(batch["image"])
        return {"x": model.apply(variables, images, project=project, method="encode_image")}

    return predict


# What each evaluator runs per batch: `fn(model, evaluator) -> predict(variables, batch, extra)`.
TEXT_KINDS = ("zeroshot", "retrieval")  # the evals that embed text

PREDICT_FNS = {
    "zeroshot": lambda model, e: zeroshot.make_predict_fn(model, len(e.classnames)),
    "retrieval": _retrieval_predict,
    "features": _features_predict,
}


def group_captions(out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-example outputs of retrieval's predict -> (image_emb [I, E], text_emb [T, E],
    text_image_ids [T]). Examples sharing an image id (TFRecord shards of one caption per
    record) are one image; tfds examples carry all their captions and no id."""
    counts = out["num_captions"]
    texts = np.concatenate([out["text_emb"][i, :c] for i, c in enumerate(counts)])
    example_of_text = np.repeat(np.arange(len(counts)), counts)
    ids = out.get("image_key")
    if ids is None:
        return out["image_emb"], texts, example_of_text
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True, axis=0)
    order = np.argsort(first)  # images in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    image_of_example = rank[inverse.reshape(-1)]
    return out["image_emb"][first[order]], texts, image_of_example[example_of_text]


def _sum_over_processes(n: int) -> int:
    if jax.process_count() == 1:
        return int(n)
    from jax.experimental import multihost_utils

    return int(multihost_utils.process_allgather(np.array([n], np.int32)).sum())
