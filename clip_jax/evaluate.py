"""Evaluate a training run or a weight file once, as a batch job:

    python -m clip_jax.evaluate --workdir=DIR [--step=N] [--evals=a,b] [--output=results.json]
    python -m clip_jax.evaluate --config=configs/b16.py --pretrained=FILE [--evals=...]
    python -m clip_jax.evaluate --pretrained=ViT-B-32.pt --evals=paper --data_dir=DIR
    python -m clip_jax.evaluate --pretrained=ViT-B-32 --evals=clip_benchmark --data_dir=DIR

The evals are the config's `evals` entries (a run's own config.json by default, or `--config`),
all of them or those named by `--evals`; `--evals=paper` is the CLIP paper's zero-shot suite
(`evals.suites.PAPER`: every dataset of its table that tfds provides, read from `--data_dir`);
`--evals=clip_benchmark` runs every CLIP_benchmark dataset found under `--data_dir` (webdataset
shards as its hub repositories hold them, `evals.suites.clip_benchmark`), with its metric names,
and also writes one record per dataset to `clip_benchmark/` beside `--output`. `--pretrained`
is a weight file, or a model name whose published weights `--tag` picks (downloaded once). It
prints a table, writes a JSON list of results in CLIP_benchmark's shape (dataset, model, task,
metrics) to `--output` with a Markdown table beside it, and prints the results as JSON last.
Multi-host: as `clip_jax.main` (every process runs this command).
"""

import json

from absl import flags

from clip_jax.inference import jobs
from clip_jax.infra import cli

_CONFIG = cli.define_config_flag("Config file (default: the run's).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_STEP = flags.DEFINE_integer("step", None, "The run's checkpoint step (default: the latest).")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "A weight file (OpenAI, OpenCLIP, ours).")
_EVALS = flags.DEFINE_string(
    "evals", "", "Comma-separated eval names, 'paper' or 'clip_benchmark'; '' = all."
)
_OUTPUT = flags.DEFINE_string("output", "", "Where to write the JSON results.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "tfds data_dir for the evals that leave it empty; CLIP_benchmark's datasets."
)
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global eval batch size (0: each eval's).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer for --pretrained (default clip_bpe).")
_TAG = flags.DEFINE_string(
    "tag", "", "With --pretrained=MODEL (a name such as ViT-B-32): its weights (default openai)."
)
_JOIN = cli.define_distributed_flags()


def main(argv: list[str]) -> None:
    cli.quiet_libraries()
    with cli.user_errors():
        cli.no_arguments(argv)
        _JOIN()
        records = jobs.evaluate(
            _CONFIG.value,
            workdir=_WORKDIR.value,
            step=_STEP.value,
            pretrained=_PRETRAINED.value,
            evals=_EVALS.value,
            output=_OUTPUT.value,
            data_dir=_DATA_DIR.value,
            batch_size=_BATCH.value,
            tokenizer=_TOKENIZER.value,
            tag=_TAG.value,
        )
    import jax

    if jax.process_index() == 0:
        print(jobs.format_table(records))
        print(json.dumps(records), flush=True)


if __name__ == "__main__":
    cli.run(main)
