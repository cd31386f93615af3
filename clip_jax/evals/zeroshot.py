"""Zero-shot classification (Radford et al. 2021, section 3.1): a classifier from class names and
prompt templates, and its accuracy on labelled images.

    classifier = build_classifier(model, variables, tokenizer, classnames, templates)  # [E, C]
    logits = l2_normalize(model.apply(variables, images, method="encode_image")) @ classifier

The classifier is laid out as open_clip's `build_zero_shot_classifier` lays it out: column c is
the mean of the L2-normalised text embeddings of class c's prompts, renormalised (prompt
ensembling, section 3.1.4).
"""

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from clip_jax.data.preprocess import CLIP_MEAN, CLIP_STD
from clip_jax.evals import extract, prompts, suites
from clip_jax.evals.evaluator import Evaluator, Key, PredictFn
from clip_jax.infra.errors import UsageError
from clip_jax.infra.rules import NAMES, Rule
from clip_jax.models.clip import l2_normalize
from clip_jax.parallel import sharding

PROMPTS_PER_BATCH = 1024  # text rows embedded at once while building a classifier


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def build_classifier(
    model: Any,
    variables: Any,
    tokenizer: Any,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    mesh: Mesh | None = None,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
    prompts_per_batch: int = PROMPTS_PER_BATCH,
) -> np.ndarray:
    """The zero-shot classifier of `classnames`, float32 [embed_dim, num_classes].

    Args:
      model, variables: a CLIP and its variables (`load_pretrained`'s pair).
      tokenizer: `tokenize(list[str]) -> int32 [n, L]` at the model's context length.
      classnames: the class names, in label order.
      templates: format strings holding `{}` once ("a photo of a {}.").
      mesh: the devices to shard the prompts over (default: all devices, data-parallel).
      rules: how the text tower's activations are laid out on `mesh` (a run's `mesh.rules`).
      prompts_per_batch: prompts embedded per step; classes are batched so that 1000 classes x
        80 templates never sit in memory as one batch.
    Returns:
      numpy float32 [embed_dim, num_classes].
    """
    if not classnames or not templates:
        raise ValueError("zero-shot classifier: need at least one class name and one template")
    if mesh is None:
        mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    variables = extract.replicate(variables, mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    per_step = min(max(1, prompts_per_batch // len(templates)), len(classnames))  # classes
    rows = -(-per_step * len(templates) // shards) * shards  # padded to the batch shards; every
    # step, the last one included, has this shape, so the text tower compiles once
    embed = _text_encoder(model, mesh, rules)

    columns = []
    with jax.set_mesh(mesh):
        for start in range(0, len(classnames), per_step):
            names = classnames[start : start + per_step]
            texts = [t.format(c) for c in names for t in templates]
            tokens = np.zeros((rows, tokenizer.context_length), np.int32)
            tokens[: len(texts)] = tokenizer.tokenize(texts)
            tokens = extract.shard_rows(tokens, mesh)
            emb = np.asarray(jax.device_get(embed(variables, tokens)))[: len(texts)]
            emb = _normalize(emb.astype(np.float32)).reshape(len(names), len(templates), -1)
            columns.append(_normalize(emb.mean(axis=1)))
    return np.concatenate(columns).T.astype(np.float32)


_ENCODERS: dict[tuple[int, Mesh, sharding.Rules], tuple[Any, Any]] = {}
_MAX_ENCODERS = 4  # models kept compiled at once (training evaluates one)


def _text_encoder(model: Any, mesh: Mesh, rules: sharding.Rules):
    """The jitted text tower of `model` on `mesh`, compiled once however many classifiers are
    built (training builds one per evaluation)."""
    key = (id(model), mesh, rules)
    cached = _ENCODERS.get(key)
    if cached is None or cached[0] is not model:

        def encode(variables, tokens):
            with nn.logical_axis_rules(rules):
                return model.apply(variables, tokens, method="encode_text")

        cached = (model, jax.jit(encode, out_shardings=extract.replicated(mesh)))
        _ENCODERS[key] = cached
        while len(_ENCODERS) > _MAX_ENCODERS:
            del _ENCODERS[next(iter(_ENCODERS))]  # the oldest
    return cached[1]


def make_predict_fn(
    model: Any, num_classes: int, top_k: int = 5, mean=CLIP_MEAN, std=CLIP_STD
) -> PredictFn:
    """`(variables, batch, classifier [E, C]) -> {"top": int32 [B, k]}`: each image's k best
    classes, best first (pixels normalised with `mean` and `std`)."""
    k = min(top_k, num_classes)

    def predict(variables, batch, classifier):
        images = extract.normalize(batch["image"], mean, std)
        emb = l2_normalize(model.apply(variables, images, method="encode_image"))
        logits = jnp.dot(emb, classifier, precision=jax.lax.Precision.HIGHEST)  # [B, C]
        return {"top": jax.lax.top_k(logits, k)[1].astype(jnp.int32)}

    return predict


def classification_metrics(top: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Top-1, top-5 and mean per-class recall (the mean over the classes present in `labels` of
    the fraction of their examples predicted right; CLIP_benchmark's balanced accuracy).

    Args:
      top: int [N, k] predicted classes, best first.
      labels: int [N] true classes.
      num_classes: the classifier's width.
    """
    if len(labels) == 0:
        raise UsageError("zero-shot evaluation: the dataset has no usable example")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UsageError(
            f"labels range over [{labels.min()}, {labels.max()}] but there are {num_classes} "
            "class names; check the class names against the dataset"
        )
    hit1 = top[:, 0] == labels
    hit5 = (top[:, :5] == labels[:, None]).any(axis=1)
    present = np.unique(labels)
    recall = [hit1[labels == c].mean() for c in present]
    return {
        "top1": float(hit1.mean()),
        "top5": float(hit5.mean()),
        "mean_per_class_recall": float(np.mean(recall)),
    }


class ZeroShot(Evaluator):
    """Zero-shot classification of `source` with a classifier built from its class names and
    prompt templates; with `class_subset` (ImageNet-R/A) only the subset's classes are scored and
    the dataset's labels are mapped onto them."""

    KEYS: ClassVar[dict[str, Key]] = {
        "classnames": Key(
            "", "class names: a known name, a list or a file ('': the dataset's own)", NAMES
        ),
        "templates": Key(
            "imagenet",
            "prompt templates with {}: a known name, a list, a file, or 'dataset' for those the "
            "data comes with (CLIP_benchmark's zeroshot_classification_templates.txt)",
            Rule(lambda v: NAMES.ok(v) and len(v) > 0, "a name, a file or a list of strings"),
        ),
        "class_subset": Key(
            "", "score only these classes of ImageNet (imagenet_r, imagenet_a)", NAMES
        ),
    }
    TASK = "zeroshot_classification"
    TEXT = True

    def __init__(self, cfg, model, tokenizer, mesh, rules):
        super().__init__(cfg, model, tokenizer, mesh, rules)
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
        if cfg["templates"] == "dataset":
            if not self.source.templates:
                raise UsageError(
                    f"evals.{self.name}: {self.source.name} comes with no templates; set templates"
                )
            self.templates = prompts.templates(self.source.templates)
        else:
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
        self.require_labels(self.source)

    def evaluate(self, variables, model_id, cache_root) -> dict:
        classifier = build_classifier(
            self.model,
            variables,
            self.tokenizer,
            self.classnames,
            self.templates,
            mesh=self.mesh,
            rules=self.rules,
        )
        classifier = extract.replicate(classifier, self.mesh)
        out, skipped = self.extract(
            "zeroshot",
            lambda: make_predict_fn(
                self.model,
                len(self.classnames),
                mean=self.preprocess.mean,
                std=self.preprocess.std,
            ),
            variables,
            self.source,
            extra=classifier,
        )
        labels = out["label"]
        if self.label_map is not None:
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.label_map)):
                raise UsageError(
                    f"evals.{self.name}: labels range over [{labels.min()}, {labels.max()}], "
                    f"outside the {len(self.label_map)} classes that class_subset maps"
                )
            labels = self.label_map[labels]
        metrics = classification_metrics(out["top"], labels, len(self.classnames))
        return {**metrics, **({"skipped": skipped} if skipped else {})}
