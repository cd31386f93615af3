"""Evaluate a training run or a weight file once, as a batch job:

    python -m clip_jax.evaluate --workdir=DIR [--step=N] [--evals=a,b] [--output=results.json]
    python -m clip_jax.evaluate --config=configs/b16.py --pretrained=FILE [--evals=...]
    python -m clip_jax.evaluate --pretrained=ViT-B-32.pt --evals=paper --data_dir=DIR

The evals are the config's `evals` entries (a run's own config.json by default, or `--config`),
all of them or those named by `--evals`; `--evals=paper` is the CLIP paper's zero-shot suite
(`evals.suites.PAPER`: every dataset of its table that tfds provides, read from `--data_dir`). It
prints a table, writes a JSON list of results in CLIP_benchmark's shape (dataset, model, task,
metrics) to `--output` with a Markdown table beside it, and prints the results as JSON last.
Multi-host: as `clip_jax.main` (every process runs this command).
"""

import json
import os
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from clip_jax import cli
from clip_jax.evals.jobs import format_table, load_model, write_results

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (default: the run's).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_STEP = flags.DEFINE_integer("step", None, "The run's checkpoint step (default: the latest).")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "A weight file (OpenAI, OpenCLIP, ours).")
_EVALS = flags.DEFINE_string("evals", "", "Comma-separated eval names, or 'paper'; '' = all.")
_OUTPUT = flags.DEFINE_string("output", "", "Where to write the JSON results.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "tfds data_dir for the evals that leave it empty.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global eval batch size (0: each eval's).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer for --pretrained (default clip_bpe).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def select_evals(config: Any, names: str, data_dir: str, batch_size: int) -> dict[str, dict]:
    """The eval entries to run: `names` from `config.evals` (all when empty), or the paper suite."""
    from clip_jax.evals import suites

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
) -> list[dict]:
    """Runs the selected evals once; returns their records (CLIP_benchmark's shape)."""
    import jax

    from clip_jax import sharding, state
    from clip_jax.evals import runner

    if bool(workdir) == bool(pretrained):
        raise ValueError("give either --workdir (a training run) or --pretrained (a weight file)")
    if config is None and workdir:
        config = state.read_run_config(workdir)
    entries = select_evals(config, evals, data_dir, batch_size)
    mesh_shape = config.mesh if config is not None else dict(data=-1, fsdp=1, tensor=1)
    mesh = sharding.make_mesh(mesh_shape)
    model, variables, model_name, tokenizer = load_model(
        config, workdir, step, pretrained, mesh, _TOKENIZER.value
    )
    evaluators = [
        runner.Evaluator(runner.entry_config(name, entry), model, tokenizer, mesh)
        for name, entry in entries.items()
    ]
    records = []
    for e in evaluators:
        logging.info("evaluating %s on %s", e.name, e.source.name)
        cache_root = os.path.join(os.path.dirname(output) or ".", "features") if output else ""
        records.append(runner.record(e, e.run(variables, step, cache_root), model_name))
    if output and jax.process_index() == 0:
        write_results(output, records, model_name)
    return records


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_libraries()
    with cli.user_errors():
        cli.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        records = evaluate(
            _CONFIG.value,
            workdir=_WORKDIR.value,
            step=_STEP.value,
            pretrained=_PRETRAINED.value,
            evals=_EVALS.value,
            output=_OUTPUT.value,
            data_dir=_DATA_DIR.value,
            batch_size=_BATCH.value,
        )
    import jax

    if jax.process_index() == 0:
        print(format_table(records))
        print(json.dumps(records), flush=True)


if __name__ == "__main__":
    app.run(main)
