"""Scheduling the evaluators of `config.evals` for training and recording their results: which
are due at a step, which a preemption interrupted, and where results go
(`workdir/evals/step_N/NAME.json`, in CLIP_benchmark's shape)."""

import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from clip_jax.evals import extract, registry
from clip_jax.evals.evaluator import Evaluator
from clip_jax.infra import paths

RESULTS_DIR = "evals"  # workdir/evals/step_N/NAME.json: what ran, for resumes and people


def make_evaluators(
    config: Any, model: Any, mesh: Mesh, rules: Any, tokenizer: Any = None
) -> list[Evaluator]:
    """The evaluators of `config.evals` for `model` on `mesh` laid out by `rules` (each entry
    checked, its data opened); `tokenizer` is the run's (`config.train_data.tokenizer`) unless
    one is given."""
    if not config.evals:
        return []
    if tokenizer is None:
        from clip_jax.data import tokenizers

        tokenizer = tokenizers.get_tokenizer(
            config.train_data.tokenizer, config.model.text.context_length
        )
    return [
        registry.make_evaluator(name, entry, model, tokenizer, mesh, rules)
        for name, entry in config.evals.items()
    ]


def due(evaluators: Sequence[Evaluator], step: int, total_steps: int) -> list[Evaluator]:
    """The evaluators that run after `step`: every `every_steps`, and all at the last step."""
    return [
        e
        for e in evaluators
        if step == total_steps or (e.every_steps > 0 and step % e.every_steps == 0)
    ]


def _result_path(workdir: str, step: int, name: str):
    return paths.path(workdir) / RESULTS_DIR / f"step_{step}" / f"{name}.json"


def missing(evaluators: Sequence[Evaluator], workdir: str, step: int, total: int) -> list:
    """The evaluators due at `step` whose results are not in `workdir` (a preempted eval), as
    process 0 sees them, so that every process runs the same evals."""
    due_now = due(evaluators, step, total)
    names = None
    if jax.process_index() == 0:
        names = [e.name for e in due_now if not _result_path(workdir, step, e.name).exists()]
    names = extract.broadcast_json(names)
    return [e for e in due_now if e.name in names]


def stored(evaluators: Sequence[Evaluator], workdir: str, step: int) -> dict[str, float]:
    """The metric values of evaluators whose results at `step` are in `workdir` (process 0)."""
    values = {}
    for e in evaluators:
        path = _result_path(workdir, step, e.name)
        if jax.process_index() == 0 and path.exists():
            result = json.loads(path.read_text())
            values.update({f"{e.kind}/{e.name}/{k}": v for k, v in result["metrics"].items()})
            values[f"eval/{e.name}/seconds"] = result["seconds"]
    return values


def record(evaluator: Evaluator, metrics: Mapping[str, float], model_name: str) -> dict:
    """One result in CLIP_benchmark's shape: dataset, model, task, metrics."""
    prefix = f"{evaluator.kind}/{evaluator.name}/"
    return {
        "dataset": evaluator.name,
        "source": evaluator.source.name,
        "model": model_name,
        "task": evaluator.TASK,
        "metrics": {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)},
        "seconds": metrics[f"eval/{evaluator.name}/seconds"],
    }


def run(evaluators: Sequence[Evaluator], variables: Any, step: int, workdir: str) -> dict:
    """Runs `evaluators` during training; their results also go to workdir/evals/step_N/."""
    results = {}
    for e in evaluators:
        cache_root = paths.path(workdir) / RESULTS_DIR / f"step_{step}" / "features"
        metrics = e.run(variables, f"{paths.path(workdir)}@{step}", str(cache_root))
        results.update(metrics)
        if jax.process_index() == 0:
            record_ = record(e, metrics, f"{workdir}@{step}")
            paths.write_text(_result_path(workdir, step, e.name), json.dumps(record_, indent=1))
            if (cache_root / e.name).exists():
                (cache_root / e.name).rmtree()
    return results
