"""Benchmarks; each prints one JSON object as its last line.

    python -m clip_jax.benchmark --what=input --config=configs/b32.py \
        [--config.train_data.source=tfrecord:GLOB] [--batch_size=256] [--steps=20]
    python -m clip_jax.benchmark --what=train_step --config=configs/b32.py --batch_size=16
    python -m clip_jax.benchmark --what=loss_memory --config=configs/b16.py --batch_size=8192
    python -m clip_jax.benchmark --what=zeroshot --config=configs/b32.py --batch_size=64
    python -m clip_jax.benchmark --what=checkpoint --config=configs/b16.py:smoke --steps=3
    python -m clip_jax.benchmark --what=patch_dropout --config=configs/b16.py --batch_size=8 \
        --config.model.dtype=float32 --steps=5

Modes (`MODES`, one function each, `fn(config, *, batch_size, steps) -> dict`):
- train_step: pairs per second of the full step on all devices, FLOPs and MFU (where the chip's
  peak is known or given by --peak_tflops), on random data already on the devices.
- loss_memory: temporary bytes per device of the loss and its gradient, gathered vs chunked.
- zeroshot: zero-shot evaluation's per-batch step against the image tower's forward alone on the
  same batch (their ratio), and the whole zero-shot evaluation end to end over JPEG shards.
- input: decoded, augmented, tokenized examples per second of the training input pipeline at the
  config's resolution, on this host's CPU cores. With `train_data.source` synthetic or empty
  it first writes temporary JPEG shards (random smooth images stored at 8/7 of the resolution,
  256 px for 224, as img2dataset stores them; captions of 5 to 20 random words) and reads those.
- checkpoint: how long a save blocks the training loop (the device-to-host copy), how long its
  background write takes alone, and a train step alone vs beside a write.
- patch_dropout: FLIP's speed-up, the image tower's forward and backward and the whole train
  step without and with `model.patch_dropout` (0.5 when the config has 0), timed alternately.
- vs_openclip: the train step against open_clip's (PyTorch, `--openclip_model`) on the same
  model, batch and CPU, and against this machine's best float32 matmul rate, timed alternately
  (open_clip in a process of its own); their ratio and the fraction of the matmul rate the step
  reaches, in one line. The three step modes live in `clip_jax.tools.benchmark_step`.

    python -m clip_jax.benchmark --what=vs_openclip --config=configs/b32.py \
        --config.model.dtype=float32 --batch_size=16 --openclip_model=ViT-B-32 --steps=5

MFU counts the architecture's FLOPs (`models.flops`: forward x 3, 2 per multiply-add); XLA's
cost analysis is shown beside it (it misses GPU library calls, and counts what a backend adds).
"""

import json

from absl import flags, logging

from clip_jax.infra import cli
from clip_jax.infra.errors import UsageError
from clip_jax.tools.benchmarks import MODES

_CONFIG = cli.define_config_flag("Config file, e.g. configs/b32.py.")
_WHAT = flags.DEFINE_string("what", "input", "What to measure: one of MODES.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Examples per batch (0: the mode's default).")
_STEPS = flags.DEFINE_integer("steps", 20, "Batches timed, after a warm-up.")

flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    with cli.user_errors():
        cli.no_arguments(argv)
        if _WHAT.value not in MODES:
            raise UsageError(f"--what={_WHAT.value}: choose one of {sorted(MODES)}")
        result = MODES[_WHAT.value](_CONFIG.value, batch_size=_BATCH.value, steps=_STEPS.value)
    logging.info("%s", result)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    cli.run(main)
