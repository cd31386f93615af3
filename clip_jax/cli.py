"""What every entry point (main, evaluate, linear_probe) shares: joining the other processes of a
multi-host job, and turning a user's mistake into one line and exit status 2."""

import contextlib
import logging as pylogging
import os
import sys
from collections.abc import Iterator

from absl import logging

from clip_jax.errors import UsageError


def _cluster_detected() -> bool:
    """A multi-process launch that `jax.distributed.initialize()` can configure by itself."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # a multi-host TPU slice


def initialize_distributed(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Joins a multi-process job: explicit flags, else TPU pods and SLURM detected, else alone."""
    import jax

    # CPU collectives across processes (tests, CPU clusters); accelerators are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise UsageError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif _cluster_detected():
        jax.distributed.initialize()


class _QuietLibraries(pylogging.Filter):
    """Orbax and TensorFlow narrate every save at INFO; keep their warnings, drop the chatter."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ("orbax", "tensorflow", "etils"))
        return record.levelno >= pylogging.WARNING or not noisy


def quiet_libraries() -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A `UsageError` inside ends the program with one line on stderr and exit status 2
    (`CLIP_JAX_DEBUG=1` keeps the traceback); anything else, a plain ValueError included, is a
    bug and keeps its traceback."""
    try:
        yield
    except UsageError as e:
        if os.environ.get("CLIP_JAX_DEBUG"):
            raise
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
