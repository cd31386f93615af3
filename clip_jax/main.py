"""Train CLIP: `python -m clip_jax.main --config=configs/b16.py --workdir=DIR [--config.KEY=VALUE]`.

Multi-host: pass `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`; without them,
TPU pods and SLURM jobs are detected by `jax.distributed.initialize()`, else one process runs.
"""

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/b16.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors a user fixes by changing a flag, a config value or a file: one line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def _cluster_detected() -> bool:
    """A multi-process launch that `jax.distributed.initialize()` can configure by itself."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # a multi-host TPU slice


def initialize_distributed(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> None:
    import jax

    # CPU collectives across processes (tests, CPU clusters); accelerators are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif _cluster_detected():
        jax.distributed.initialize()


class _QuietLibraries(pylogging.Filter):
    """Orbax and TensorFlow narrate every save at INFO; keep their warnings, drop the chatter."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ("orbax", "tensorflow", "etils"))
        return record.levelno >= pylogging.WARNING or not noisy


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from clip_jax import train

    try:
        initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        train.run(_CONFIG.value, _WORKDIR.value)
    except USER_ERRORS as e:
        if os.environ.get("CLIP_JAX_DEBUG"):
            raise
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except train.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    app.run(main)
