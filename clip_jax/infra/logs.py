"""Logs of every entry point: which process prints what, the per-process log files, and the
libraries' chatter kept out.

Process 0 prints its log as a single process does; the others print only warnings and errors,
each line prefixed `[process N] `. `--log_dir=DIR` (every `cli.run` entry point) also writes each
process's whole log, INFO included, to `DIR/process_N.log`.
"""

import dataclasses
import logging as pylogging
import os
import sys
import traceback

from absl import logging

from clip_jax.infra import paths

# absl already defines --log_dir ("directory to write logfiles into"), but only its opt-in
# `use_absl_log_file` reads it, which no entry point calls: the flag does nothing today. Its file
# would replace stderr rather than copy it, is named after host, user, time and pid rather than
# the process index, and is written with `open`, so no object store. The flag keeps its name
# (every absl program has it; a second one cannot be defined) and gets this meaning.

LOG_FILE = "process_{index}.log"
LOG_DIR_HELP = (
    "Also write this process's whole log, INFO included, to DIR/process_N.log (N: its index in "
    "a multi-process job; appended to when a run resumes). A local DIR gets each line at once, "
    "an object store (gs://...) the whole file every 30 s and at exit."
)
REWRITE_SECONDS = 30.0  # how often a log on an object store, which cannot append, is rewritten


class LogFile(pylogging.Handler):
    """`DIR/process_N.log`: every record that reaches the root logger, as absl formats it, plus
    the `error:` line or traceback that ends the program. Lines logged before the process index
    is known wait in memory until `open(index)`."""

    def __init__(self, log_dir: str):
        super().__init__()
        self.setFormatter(logging.PythonFormatter())
        self.remote = paths.is_remote(log_dir)
        self.directory = paths.path(log_dir)
        self.file: paths.Appender | None = None
        self.pending: list[str] | None = []  # lines before `open`

    def open(self, index: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.file = paths.Appender(
            self.directory / LOG_FILE.format(index=index),
            rewrite_secs=REWRITE_SECONDS,
            remote=self.remote,
        )
        pending, self.pending = self.pending, None
        self.write("".join(pending))

    def emit(self, record: pylogging.LogRecord) -> None:
        try:
            self.write(self.format(record).rstrip("\n") + "\n")
        except Exception:  # logging's contract: a handler reports its own failure (handleError
            self.handleError(record)  # prints it with the traceback) and never stops the run

    def write(self, text: str) -> None:
        with self.lock:
            if self.pending is not None:
                self.pending.append(text)
            else:
                self.file.write(text)

    def flush(self) -> None:
        with self.lock:
            if self.file is not None:
                self.file.flush()

    def close(self) -> None:
        with self.lock:
            if self.file is not None:
                self.file.close()
        super().close()


@dataclasses.dataclass
class _ProcessLogs:
    """Where this process's log goes; the process index is known once the job is joined."""

    index: int | None = None
    prefix: str = ""  # `[process N] ` on the processes after the first
    file: LogFile | None = None


STATE = _ProcessLogs()


def prefixed(text: str) -> str:
    if not STATE.prefix:
        return text
    return "".join(STATE.prefix + line for line in text.splitlines(keepends=True))


class _PrefixFormatter(pylogging.Formatter):
    """absl's line format with `[process N] ` before every line of a record."""

    def __init__(self, inner: pylogging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: pylogging.LogRecord) -> str:
        return prefixed(self.inner.format(record))


def print_error(message: str) -> None:
    """`error: MESSAGE` on stderr (prefixed on processes after the first) and in the `--log_dir`
    file: the line that ends a program."""
    line = f"error: {message}\n"
    if STATE.file is not None:
        STATE.file.write(line)
    print(prefixed(line), end="", file=sys.stderr, flush=True)


def flush() -> None:
    """Everything written so far out of this process's buffers and into the `--log_dir` file
    (closed): for a process that ends with `os._exit`, which skips the usual clean-up."""
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    if STATE.file is not None:
        STATE.file.close()


def _excepthook(kind, value, tb) -> None:
    """An uncaught exception's traceback: into the log file too, and prefixed on stderr."""
    text = "".join(traceback.format_exception(kind, value, tb))
    if STATE.file is not None:
        STATE.file.write(text)
    sys.stderr.write(prefixed(text))


def start_log_file(log_dir: str) -> None:
    """`--log_dir`: every record from now on goes to the file too (held until the index is
    known)."""
    if not log_dir or STATE.file is not None:
        return
    STATE.file = LogFile(log_dir)
    pylogging.getLogger().addHandler(STATE.file)
    sys.excepthook = _excepthook


def start_process_logs(process_index: int) -> None:
    """Routes this process's logs once its index in the job is known: on processes after the
    first, stderr keeps only warnings and errors (Python warnings included), each line prefixed
    `[process N] `; the `--log_dir` file opens as `process_N.log`. Only the first call counts."""
    if STATE.index is not None:
        return
    STATE.index = process_index
    if STATE.file is not None:
        STATE.file.open(process_index)
    if process_index == 0:
        return
    STATE.prefix = f"[process {process_index}] "
    handler = logging.get_absl_handler()
    handler.addFilter(lambda record: record.levelno >= pylogging.WARNING)
    python_handler = handler.python_handler
    python_handler.setFormatter(_PrefixFormatter(python_handler.formatter))
    pylogging.captureWarnings(True)  # `warnings.warn` as WARNING records: prefixed, in the file
    sys.excepthook = _excepthook


class _QuietLibraries(pylogging.Filter):
    """Orbax and TensorFlow narrate every save at INFO, and JAX every platform it did not find;
    keep their warnings, drop the chatter."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        parts = ("orbax", "tensorflow", "etils", "xla_bridge")
        noisy = any(part in record.pathname for part in parts)
        return record.levelno >= pylogging.WARNING or not noisy


class _QuietFailedWrites(pylogging.Filter):
    """A failed asynchronous checkpoint write (a full disk) reaches the training loop, which
    reports it in one line (`checkpoint.CheckpointWriteError`); orbax's threads and their
    asyncio tasks also log it, each with its traceback, dozens of times. Drop those copies
    (`CLIP_JAX_DEBUG=1` keeps them)."""

    ORBAX = ("raised an exception", "Failed to run", "Save Finalize thread")

    def filter(self, record: pylogging.LogRecord) -> bool:
        message = record.getMessage()
        if "orbax" in record.pathname and any(m in message for m in self.ORBAX):
            return False
        if record.name == "asyncio" and "never retrieved" in message:
            text = str(record.exc_info[1]) if record.exc_info else ""
            return "orbax" not in f"{message} {text}" and "OCDBT" not in text
        return True


def _quiet_unraisable(previous):
    """Once a failed write has stopped orbax's event loop, tensorstore's callbacks into it fail
    with "Event loop is closed", each printed as an unraisable exception: the aftermath of the
    one-line error, dropped."""

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    return hook


def quiet_libraries() -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if not os.environ.get("CLIP_JAX_DEBUG"):
        quiet = _QuietFailedWrites()
        logging.get_absl_handler().addFilter(quiet)
        pylogging.getLogger("asyncio").addFilter(quiet)
        sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
