"""Train CLIP: `python -m clip_jax.main --config=configs/b16.py --workdir=DIR [--config.KEY=VALUE]`.

Multi-host: pass `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`; without them,
TPU pods and SLURM jobs are detected by `jax.distributed.initialize()`, else one process runs.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from clip_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/b16.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_libraries()
    from clip_jax import train

    try:
        with cli.user_errors():
            cli.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
            train.run(_CONFIG.value, _WORKDIR.value)
    except train.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    app.run(main)
