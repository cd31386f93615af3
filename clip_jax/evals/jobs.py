"""What the batch jobs (`clip_jax.evaluate`, `clip_jax.linear_probe`) share: the model to evaluate
from a run or a weight file, and their results as a table and as files."""

import json
import os

import numpy as np


def load_model(
    config, workdir: str | None, step: int | None, pretrained: str | None, mesh, tokenizer: str = ""
):
    """(model, variables on the mesh, model name, tokenizer)."""
    import clip_jax
    from clip_jax import state
    from clip_jax.evals import extract

    if workdir:
        model, variables, step = state.load_run(workdir, step, mesh=mesh)
        return model, variables, f"{workdir}@{step}", clip_jax.get_tokenizer(workdir)
    model, variables = clip_jax.load_pretrained(pretrained)
    tokenizer_name = tokenizer or (
        config.train_data.tokenizer if config is not None else "clip_bpe"
    )
    tokenizer = clip_jax.get_tokenizer(tokenizer_name, model.text["context_length"])
    return model, extract.replicate(variables, mesh), os.path.basename(pretrained), tokenizer


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
