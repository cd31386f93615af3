"""The batch jobs as functions (`clip_jax.evaluate` and `clip_jax.linear_probe` are their command
lines): `evaluate(config, workdir=... | pretrained=...)` runs configured evals or the paper suite
once, `probe(...)` the linear-probe protocol; both return records in CLIP_benchmark's shape
(dataset, model, task, metrics)."""

import json
import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

import clip_jax
from clip_jax import sharding, state
from clip_jax.evals import extract, runner, suites


def load_model(
    config, workdir: str | None, step: int | None, pretrained: str | None, mesh, tokenizer: str = ""
):
    """(model, variables on the mesh, model name, tokenizer)."""

    if workdir:
        model, variables, step = state.load_run(workdir, step, mesh=mesh)
        return model, variables, f"{workdir}@{step}", clip_jax.get_tokenizer(workdir)
    model, variables = clip_jax.load_pretrained(pretrained)
    tokenizer_name = tokenizer or (
        config.train_data.tokenizer if config is not None else "clip_bpe"
    )
    tokenizer = clip_jax.get_tokenizer(tokenizer_name, model.text["context_length"])
    return model, extract.replicate(variables, mesh), os.path.basename(pretrained), tokenizer


def model_id(workdir: str | None, pretrained: str | None, model_name: str) -> str:
    """What identifies the weights in a feature cache: a run's path and step, or a file's path,
    size and modification time."""
    if workdir:
        return os.path.abspath(workdir) + "@" + model_name.rpartition("@")[2]
    info = os.stat(pretrained)
    return f"{os.path.abspath(pretrained)}:{info.st_size}:{info.st_mtime_ns}"


def format_table(records: list[dict]) -> str:
    """Results as a Markdown table, one row per eval, with the mean of each shared metric."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r["metrics"] if k not in keys]
    lines = ["| eval | task | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in records:
        cells = [f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "" for k in keys]
        lines.append(f"| {r['dataset']} | {r['task']} | " + " | ".join(cells) + " |")
    if len(records) > 1 and len({r["task"] for r in records}) == 1:
        means = [np.mean([r["metrics"][k] for r in records if k in r["metrics"]]) for k in keys]
        lines.append("| **mean** | | " + " | ".join(f"{m:.4f}" for m in means) + " |")
    return "\n".join(lines)


def write_results(output: str, records: list[dict], model_name: str) -> None:
    """`output` (JSON, CLIP_benchmark's shape) and a Markdown table beside it (`.md`)."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(records, f, indent=1)
    with open(os.path.splitext(output)[0] + ".md", "w") as f:
        f.write(f"Model: {model_name}\n\n{format_table(records)}\n")


def select_evals(config: Any, names: str, data_dir: str, batch_size: int) -> dict[str, dict]:
    """The eval entries to run: `names` from `config.evals` (all when empty), or the paper suite."""
    if names == "paper":
        entries = {
            name: {"type": "zeroshot", **{k: v for k, v in entry.items()}}
            for name, entry in suites.suite("paper").items()
        }
    else:
        available = dict(config.evals.to_dict()) if config is not None and config.evals else {}
        wanted = [n.strip() for n in names.split(",") if n.strip()] or list(available)
        unknown = [n for n in wanted if n not in available]
        if unknown:
            raise ValueError(
                f"--evals: no eval named {', '.join(unknown)} in the config (it has "
                f"{', '.join(available) or 'none'}); or use --evals=paper"
            )
        entries = {n: dict(available[n]) for n in wanted}
    if not entries:
        raise ValueError("nothing to evaluate: the config has no evals; name some or --evals=paper")
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
) -> list[dict]:
    """Runs the selected evals once; returns their records (CLIP_benchmark's shape)."""
    import jax

    if bool(workdir) == bool(pretrained):
        raise ValueError("give either --workdir (a training run) or --pretrained (a weight file)")
    if config is None and workdir:
        config = state.read_run_config(workdir)
    entries = select_evals(config, evals, data_dir, batch_size)
    mesh_shape = config.mesh if config is not None else dict(data=-1, fsdp=1, tensor=1)
    mesh = sharding.make_mesh(mesh_shape)
    model, variables, model_name, tokenizer = load_model(
        config, workdir, step, pretrained, mesh, tokenizer
    )
    evaluators = [
        runner.Evaluator(runner.entry_config(name, entry), model, tokenizer, mesh)
        for name, entry in entries.items()
    ]
    records = []
    for e in evaluators:
        logging.info("evaluating %s on %s", e.name, e.source.name)
        cache_root = os.path.join(os.path.dirname(output) or ".", "features") if output else ""
        metrics = e.run(variables, model_id(workdir, pretrained, model_name), cache_root)
        records.append(runner.record(e, metrics, model_name))
    if output and jax.process_index() == 0:
        write_results(output, records, model_name)
    return records


def sources(dataset: str, train: str, test: str, splits: tuple[str, str, str]) -> dict[str, str]:
    """{"train_source", "source" (test), "val_source"} from the flags."""
    train_split, test_split, val_split = splits
    if train or test:
        if dataset or not (train and test):
            raise ValueError("give --dataset, or both --train and --test (not both forms)")
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
        val = os.path.join(rest, "val")
        return {
            "train_source": f"imagefolder:{os.path.join(rest, 'train')}",
            "source": f"imagefolder:{os.path.join(rest, 'test')}",
            "val_source": f"imagefolder:{val}" if os.path.isdir(val) else "",
        }
    raise ValueError(
        f"--dataset={dataset!r}: use tfds:NAME[/CONFIG] or imagefolder:DIR (DIR/train, DIR/test), "
        "or --train and --test sources"
    )


def probe(
    config,
    *,
    workdir: str | None,
    step: int | None,
    pretrained: str | None,
    entry: dict,
    fewshot: tuple[int, ...] = (),
    cache_dir: str = "",
) -> list[dict]:
    """Runs the probe (and k-shot probes) once; returns records in CLIP_benchmark's shape."""

    if bool(workdir) == bool(pretrained):
        raise ValueError("give either --workdir (a training run) or --pretrained (a weight file)")
    if config is None and workdir:
        config = state.read_run_config(workdir)
    mesh_shape = config.mesh if config is not None else dict(data=-1, fsdp=1, tensor=1)
    mesh = sharding.make_mesh(mesh_shape)
    model, variables, model_name, tokenizer = load_model(config, workdir, step, pretrained, mesh)
    if not cache_dir and workdir:
        cache_dir = os.path.join(workdir, "features", f"step_{model_name.rpartition('@')[2]}")
    elif not cache_dir:
        cache_dir = os.path.join(os.path.expanduser("~/.cache/clip_jax/features"), model_name)
    name = entry.pop("name")
    evaluators = [runner.Evaluator(runner.entry_config(name, entry), model, tokenizer, mesh)]
    if fewshot:
        probe_only = ("val_fraction", "val_source", "seed")
        shots = {k: v for k, v in entry.items() if k not in probe_only}
        shots.update(type="fewshot", shots=fewshot)
        evaluators.append(
            runner.Evaluator(runner.entry_config(name, shots), model, tokenizer, mesh)
        )
    records = []
    for e in evaluators:
        logging.info("%s on %s (train %s)", e.kind, e.source.name, e.train_source.name)
        metrics = e.run(variables, model_id(workdir, pretrained, model_name), cache_dir)
        records.append(runner.record(e, metrics, model_name))
    return records
