"""The batch jobs as functions (`clip_jax.evaluate` and `clip_jax.linear_probe` are their command
lines): `evaluate(config, workdir=... | pretrained=...)` runs configured evals or the paper suite
once, `probe(...)` the linear-probe protocol; both return records in CLIP_benchmark's shape
(dataset, model, task, metrics)."""

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from clip_jax.data.tokenizers import get_tokenizer
from clip_jax.evals import extract, registry, runner, suites
from clip_jax.inference.load import load_pretrained
from clip_jax.infra import cache, paths
from clip_jax.infra.errors import UsageError
from clip_jax.parallel import sharding
from clip_jax.training import runs
from clip_jax.weights import pretrained as pretrained_lib


@dataclasses.dataclass
class Subject:
    """The model under evaluation: where it came from, on which mesh, with which tokenizer."""

    config: Any  # the run's or the given config (None for a weight file without --config)
    mesh: Any
    rules: Any  # the config's mesh.rules (the default rules without a config)
    model: Any
    variables: Any  # on the mesh
    name: str  # shown in results: "DIR@STEP" or the file's name
    weights_id: str  # identifies the weights in feature caches
    tokenizer: Any
    # The weights' evaluation protocol (resize_mode, interpolation, mean, std): the registry's
    # for a pretrained tag; empty (CLIP's defaults) otherwise. Entries that leave a key empty
    # take it from here.
    protocol: dict = dataclasses.field(default_factory=dict)
    model_name: str = ""  # CLIP_benchmark's `model` and `pretrained` of the records
    pretrained_name: str = ""


def _protocol(weights: Any) -> dict:
    return {
        "resize_mode": weights.resize_mode,
        "interpolation": weights.interpolation,
        "mean": tuple(weights.mean),
        "std": tuple(weights.std),
    }


def prepare(
    config: Any,
    workdir: str | None,
    step: int | None,
    pretrained: str | None,
    tokenizer: str = "",
    tag: str = "",
) -> Subject:
    """The model of a training run (`workdir`, `step`), of a weight file, or of published weights
    (`pretrained` a model name such as "ViT-B-32" and `tag` its weights, "openai" by default
    where the model has them), on the config's mesh (all devices data-parallel without a config),
    with its tokenizer."""
    if bool(workdir) == bool(pretrained):
        raise UsageError("give either --workdir (a training run) or --pretrained (a weight file)")
    if config is None and workdir:
        config = runs.read_run_config(workdir)
    if config is None:  # a weight file alone: every device data-parallel, the default layout
        mesh, rules = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)), sharding.DEFAULT_RULES
    else:
        mesh, rules = sharding.config_mesh(config.mesh), sharding.check_rules(config.mesh.rules)
    if workdir:
        model, variables, step = runs.load_run(workdir, step, mesh=mesh)
        return Subject(
            config,
            mesh,
            rules,
            model,
            variables,
            f"{workdir}@{step}",
            f"{paths.path(workdir)}@{step}",
            get_tokenizer(workdir),
        )
    name = tokenizer or (config.train_data.tokenizer if config is not None else "clip_bpe")
    if not paths.path(pretrained).exists() and pretrained_lib.list_tags(pretrained):
        tags = pretrained_lib.list_tags(pretrained)
        tag = tag or ("openai" if "openai" in tags else "")
        if not tag:
            raise UsageError(
                f"--pretrained={pretrained}: choose its weights with --tag (one of "
                f"{', '.join(tags)})"
            )
        weights = pretrained_lib.lookup(pretrained, tag)
        protocol = _protocol(weights)
        name = tokenizer or weights.tokenizer  # the tag's own (SigLIP's), unless one is given
        model, variables = load_pretrained(pretrained, pretrained=tag)
        shown = weights_id = f"{pretrained}:{tag}"
        model_name, pretrained_name = pretrained, tag
    else:
        if tag:
            raise UsageError(
                f"--tag={tag} applies to a model name given as --pretrained, not a file"
            )
        model, variables = load_pretrained(pretrained)
        info, protocol = paths.path(pretrained).stat(), {}
        shown = model_name = paths.path(pretrained).name
        weights_id = f"{paths.path(pretrained)}:{info.length}:{info.mtime}"
        pretrained_name = str(pretrained)
    return Subject(
        config,
        mesh,
        rules,
        model,
        extract.replicate(variables, mesh),
        shown,
        weights_id,
        get_tokenizer(name, model.text["context_length"]),
        protocol=protocol,
        model_name=model_name,
        pretrained_name=pretrained_name,
    )


def make_evaluator(subject: Subject, name: str, entry: Mapping[str, Any]) -> Any:
    """The evaluator of one entry; the protocol keys it leaves empty are the weights'."""
    entry = {**entry, **{k: v for k, v in subject.protocol.items() if not entry.get(k)}}
    return registry.make_evaluator(
        name, entry, subject.model, subject.tokenizer, subject.mesh, subject.rules
    )


def format_table(records: list[dict]) -> str:
    """Results as a Markdown table, one row per eval (the mean is a record of its own)."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r["metrics"] if k not in keys]
    lines = ["| eval | task | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in records:
        cells = [f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "" for k in keys]
        lines.append(f"| {r['dataset']} | {r['task']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def with_mean(records: list[dict]) -> list[dict]:
    """`records`, plus a record "mean" of each metric over them when they are of one task."""
    if len(records) < 2 or len({r["task"] for r in records}) != 1:
        return records
    keys = [k for k in records[0]["metrics"] if all(k in r["metrics"] for r in records)]
    mean = {k: float(np.mean([r["metrics"][k] for r in records])) for k in keys}
    return [
        *records,
        {
            **records[0],
            "dataset": "mean",
            "source": "",
            "metrics": mean,
            "seconds": float(sum(r["seconds"] for r in records)),
        },
    ]


def write_results(output: str, records: list[dict], model_name: str, skipped=()) -> None:
    """`output` (JSON, CLIP_benchmark's shape) and a Markdown table beside it (`.md`)."""
    paths.write_text(output, json.dumps(records, indent=1))
    notes = "".join(f"\n- skipped {name}: {why}" for name, why in skipped)
    table = paths.path(output).with_suffix(".md")
    paths.write_text(table, f"Model: {model_name}\n\n{format_table(records)}\n{notes}\n")


def select_evals(config: Any, names: str, data_dir: str, batch_size: int) -> dict[str, dict]:
    """The eval entries to run: `names` from `config.evals` (all when empty), or the paper suite."""
    if names == "paper":
        entries = {
            name: {"type": "zeroshot", **entry} for name, entry in suites.suite("paper").items()
        }
    else:
        available = dict(config.evals.to_dict()) if config is not None and config.evals else {}
        wanted = [n.strip() for n in names.split(",") if n.strip()] or list(available)
        unknown = [n for n in wanted if n not in available]
        if unknown:
            raise UsageError(
                f"--evals: no eval named {', '.join(unknown)} in the config (it has "
                f"{', '.join(available) or 'none'}); or use --evals=paper"
            )
        entries = {n: dict(available[n]) for n in wanted}
    if not entries:
        raise UsageError("nothing to evaluate: the config has no evals; name some or --evals=paper")
    for entry in entries.values():
        if data_dir and not entry.get("data_dir"):
            entry["data_dir"] = data_dir
        if batch_size:
            entry["batch_size"] = batch_size
    return entries


def evaluate(
    config: ml_collections.ConfigDict | None,
    *,
    workdir: str | None = None,
    step: int | None = None,
    pretrained: str | None = None,
    evals: str = "",
    output: str = "",
    data_dir: str = "",
    batch_size: int = 0,
    tokenizer: str = "",
    tag: str = "",
) -> list[dict]:
    """Runs the selected evals once; returns their records (CLIP_benchmark's shape), with a mean
    record when they are all of one task (the paper suite).

    `evals="clip_benchmark"` runs every CLIP_benchmark dataset found under `data_dir`
    (`suites.clip_benchmark`) and returns CLIP_benchmark's own records (its dataset names and
    metric names, `pretrained`, `language`); with `output`, one file per dataset is also written
    to `clip_benchmark/` beside it, named as CLIP_benchmark names them, for `clip_benchmark
    build`."""
    subject = prepare(config, workdir, step, pretrained, tokenizer, tag)
    benchmark: dict[str, str] = {}
    skipped: list[tuple[str, str]] = []
    if evals == "clip_benchmark":
        if not data_dir:
            raise UsageError("--evals=clip_benchmark reads its datasets from --data_dir=DIR")
        entries, benchmark, missing = suites.clip_benchmark(data_dir)
        if not entries:
            raise UsageError(
                f"no CLIP_benchmark dataset under {data_dir} (want DIR/wds_NAME/test/0.tar ... "
                "as the clip-benchmark hub repositories hold them)"
            )
        skipped += [(name, f"not found under {data_dir}") for name in missing]
        logging.info(
            "CLIP_benchmark: %d datasets found, %d missing (%s)",
            len(entries),
            len(missing),
            ", ".join(missing),
        )
        for entry in entries.values():
            if batch_size:
                entry["batch_size"] = batch_size
    else:
        entries = select_evals(subject.config, evals, data_dir, batch_size)
    evaluators = []
    for name, entry in entries.items():
        try:
            evaluators.append(make_evaluator(subject, name, entry))
        except UsageError as e:
            if evals not in ("paper", "clip_benchmark"):
                raise
            # A suite runs on the datasets the user has prepared; the others are reported.
            logging.warning("skipping %s: %s", name, e)
            skipped.append((name, str(e)))
    if not evaluators:
        raise UsageError(f"none of the datasets could be read: {skipped[0][1]}")
    cache_root = str(paths.path(output).parent / "features") if output else ""
    records = []
    for e in evaluators:
        logging.info("evaluating %s on %s", e.name, e.source.name)
        metrics = e.run(subject.variables, subject.weights_id, cache_root)
        records.append(runner.record(e, metrics, subject.name))
    if benchmark:
        records = [benchmark_record(r, benchmark[r["dataset"]], subject) for r in records]
    else:
        records = with_mean(records)
    if output and jax.process_index() == 0:
        write_results(output, records, subject.name, skipped)
        if benchmark:
            folder = paths.path(output).parent / "clip_benchmark"
            for r in records:
                paths.write_text(folder / benchmark_filename(r), json.dumps(r, indent=1))
    return records


def benchmark_record(record: Mapping[str, Any], name: str, subject: Subject) -> dict:
    """One result as CLIP_benchmark writes it: its dataset name and metric names, the model and
    its pretrained weights, the language."""
    names = suites.BENCHMARK_METRICS[record["task"]]
    return {
        "dataset": name,
        "model": subject.model_name or subject.name,
        "pretrained": subject.pretrained_name,
        "task": record["task"],
        "metrics": {names[k]: v for k, v in record["metrics"].items() if k in names},
        "language": "en",
    }


def benchmark_filename(record: Mapping[str, Any]) -> str:
    """CLIP_benchmark's file name for a record: {dataset}_{pretrained}_{model}_{language}_{task}
    (the dataset without "wds/", slashes as underscores)."""
    parts = [
        record["dataset"].removeprefix("wds/"),
        paths.path(record["pretrained"]).name if record["pretrained"] else "",
        record["model"],
        record["language"],
        record["task"],
    ]
    return "_".join(p.replace("/", "_") for p in parts) + ".json"


def sources(dataset: str, train: str, test: str, splits: tuple[str, str, str]) -> dict[str, str]:
    """{"train_source", "source" (test), "val_source"} from the flags."""
    train_split, test_split, val_split = splits
    if train or test:
        if dataset or not (train and test):
            raise UsageError("give --dataset, or both --train and --test (not both forms)")
        return {"train_source": train, "source": test, "val_source": ""}
    kind, _, rest = dataset.partition(":")
    if kind == "tfds" and rest:
        val = f"tfds:{rest}:{val_split}" if val_split else ""
        return {
            "train_source": f"tfds:{rest}:{train_split}",
            "source": f"tfds:{rest}:{test_split}",
            "val_source": val,
        }
    if kind == "imagefolder" and rest:
        root = paths.path(rest)
        return {
            "train_source": f"imagefolder:{root / 'train'}",
            "source": f"imagefolder:{root / 'test'}",
            "val_source": f"imagefolder:{root / 'val'}" if (root / "val").is_dir() else "",
        }
    raise UsageError(
        f"--dataset={dataset!r}: use tfds:NAME[/CONFIG] or imagefolder:DIR (DIR/train, DIR/test), "
        "or --train and --test sources"
    )


def probe(
    config: Any,
    *,
    workdir: str | None,
    step: int | None,
    pretrained: str | None,
    entry: Mapping[str, Any],
    fewshot: tuple[int, ...] = (),
    cache_dir: str = "",
) -> list[dict]:
    """Runs the linear probe (and k-shot probes on the same features) once; returns records in
    CLIP_benchmark's shape. `entry` is a linear_probe eval entry with its `name`."""
    subject = prepare(config, workdir, step, pretrained)
    entry = dict(entry)
    name = entry.pop("name")
    if not cache_dir:
        digest = hashlib.sha256(subject.weights_id.encode()).hexdigest()[:12]
        base = (
            paths.path(workdir) / "features" if workdir else paths.path(cache.cache_dir("features"))
        )
        cache_dir = str(base / f"{paths.path(subject.name).name}-{digest}")
    evaluators = [make_evaluator(subject, name, entry)]
    if fewshot:
        probe_only = ("val_fraction", "val_source", "seed")
        shots = {k: v for k, v in entry.items() if k not in probe_only}
        evaluators.append(
            make_evaluator(subject, name, {**shots, "type": "fewshot", "shots": fewshot})
        )
    records = []
    for e in evaluators:
        logging.info("%s on %s (train %s)", e.kind, e.source.name, e.train_source.name)
        metrics = e.run(subject.variables, subject.weights_id, cache_dir)
        records.append(runner.record(e, metrics, subject.name))
    return records
