"""What every entry point shares: one flag style, joining the other processes of a multi-host job,
and a user's mistake as one line and exit status 2.

Every entry point takes absl flags (`--name=value` or `--name value`); `--help` prints its usage
and exits 0; a bad flag, config file, config key or other `UsageError` ends it with one `error:`
line on stderr and exit status 2 (`CLIP_JAX_DEBUG=1` shows the traceback). Anything else is a bug
and keeps its traceback.

    cli.run(main)                                  main, evaluate, linear_probe, benchmark: absl's
                                                   app.run with these rules
    cli.run_tool(argv, define_flags, body, doc)    small tools (prepare, digits, tokenizers,
                                                   checkpoint export), callable in-process

Logs of a multi-process job: process 0 prints its log as a single process does; the others print
only warnings and errors, each line prefixed `[process N] `. `--log_dir=DIR` (every `cli.run`
entry point) also writes each process's whole log, INFO included, to `DIR/process_N.log`.
"""

import contextlib
import dataclasses
import difflib
import fnmatch
import importlib.util
import logging as pylogging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn

import ml_collections
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as config_flags_lib

from clip_jax.errors import UsageError

HELP_FLAGS = ("-h", "-?", "-help", "--help", "-helpshort", "--helpshort", "-helpfull", "--helpfull")
KEYS_HINT = "python -m clip_jax.main --config=FILE --show_config lists every key"


def _cluster_detected() -> bool:
    """A multi-process launch that `jax.distributed.initialize()` can configure by itself."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # a multi-host TPU slice


def define_distributed_flags():
    """The `--coordinator_address --num_processes --process_id` flags every entry point takes;
    returns a function that joins the job they describe (`initialize_distributed`)."""
    global _PROCESS_ID_FLAG
    coordinator = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
    num_processes = flags.DEFINE_integer("num_processes", None, "Number of processes.")
    process_id = flags.DEFINE_integer("process_id", None, "This process's index.")
    _PROCESS_ID_FLAG = process_id
    return lambda: initialize_distributed(coordinator.value, num_processes.value, process_id.value)


_PROCESS_ID_FLAG: flags.FlagHolder | None = None  # --process_id, once an entry point defines it


def initialize_distributed(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Joins a multi-process job: explicit flags, else TPU pods and SLURM detected, else alone;
    then routes this process's logs by its index (`start_process_logs`)."""
    import jax

    # CPU collectives across processes (tests, CPU clusters); accelerators are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise UsageError("--coordinator_address needs --num_processes and --process_id")
        start_process_logs(process_id)  # before JAX's own lines about joining
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif _cluster_detected():
        jax.distributed.initialize()
        start_process_logs(jax.process_index())
    else:
        start_process_logs(0)


# --- Logs -------------------------------------------------------------------------------------
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


class _LogFile(pylogging.Handler):
    """`DIR/process_N.log`: every record that reaches the root logger, as absl formats it, plus
    the `error:` line or traceback that ends the program. Lines logged before the process index
    is known wait in memory until `open(index)`."""

    def __init__(self, log_dir: str):
        super().__init__()
        self.setFormatter(logging.PythonFormatter())
        self.remote = bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", log_dir))
        self.directory = epath.Path(log_dir if self.remote else os.path.abspath(log_dir))
        self.path: epath.Path | None = None
        self.pending: list[str] | None = []  # lines before `open`
        self.stream = None  # a local file, appended to
        self.text: list[str] = []  # an object store's file, rewritten whole
        self.written_at = 0.0

    def open(self, index: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / LOG_FILE.format(index=index)
        if self.remote:
            self.text = [self.path.read_text()] if self.path.exists() else []
        else:
            self.stream = self.path.open("a")
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
            elif self.remote:
                self.text.append(text)
                if time.monotonic() - self.written_at >= REWRITE_SECONDS:
                    self._rewrite()
            else:
                self.stream.write(text)
                self.stream.flush()

    def _rewrite(self) -> None:
        self.path.write_text("".join(self.text))
        self.written_at = time.monotonic()

    def flush(self) -> None:
        with self.lock:
            if self.remote and self.path is not None:
                self._rewrite()

    def close(self) -> None:
        self.flush()
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        super().close()


@dataclasses.dataclass
class _ProcessLogs:
    """Where this process's log goes; the process index is known once the job is joined."""

    index: int | None = None
    prefix: str = ""  # `[process N] ` on the processes after the first
    file: _LogFile | None = None


_LOGS = _ProcessLogs()


def _prefixed(text: str) -> str:
    if not _LOGS.prefix:
        return text
    return "".join(_LOGS.prefix + line for line in text.splitlines(keepends=True))


class _PrefixFormatter(pylogging.Formatter):
    """absl's line format with `[process N] ` before every line of a record."""

    def __init__(self, inner: pylogging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: pylogging.LogRecord) -> str:
        return _prefixed(self.inner.format(record))


def _excepthook(kind, value, tb) -> None:
    """An uncaught exception's traceback: into the log file too, and prefixed on stderr."""
    text = "".join(traceback.format_exception(kind, value, tb))
    if _LOGS.file is not None:
        _LOGS.file.write(text)
    sys.stderr.write(_prefixed(text))


def _start_log_file(log_dir: str) -> None:
    """`--log_dir`: every record from now on goes to the file too (held until the index is
    known)."""
    if not log_dir or _LOGS.file is not None:
        return
    _LOGS.file = _LogFile(log_dir)
    pylogging.getLogger().addHandler(_LOGS.file)
    sys.excepthook = _excepthook


def start_process_logs(process_index: int) -> None:
    """Routes this process's logs once its index in the job is known: on processes after the
    first, stderr keeps only warnings and errors (Python warnings included), each line prefixed
    `[process N] `; the `--log_dir` file opens as `process_N.log`. Only the first call counts."""
    if _LOGS.index is not None:
        return
    _LOGS.index = process_index
    if _LOGS.file is not None:
        _LOGS.file.open(process_index)
    if process_index == 0:
        return
    _LOGS.prefix = f"[process {process_index}] "
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
        exit_with_error(str(e), 2)


def exit_with_error(message: str, status: int) -> NoReturn:
    """Ends the program with `error: MESSAGE` on stderr (prefixed on processes after the first,
    and in the `--log_dir` file) and exit `status`."""
    line = f"error: {message}\n"
    if _LOGS.file is not None:
        _LOGS.file.write(line)
    print(_prefixed(line), end="", file=sys.stderr, flush=True)
    sys.exit(status)


# --- Flags ------------------------------------------------------------------------------------


def _wants_help(argv: Sequence[str]) -> str:
    """Whether `argv` asks for help before any `--`: "short", "full" or ""."""
    for arg in argv:
        if arg == "--":
            break
        if arg in HELP_FLAGS:
            return "full" if arg.endswith("full") else "short"
    return ""


def _flag_error(e: flags.Error) -> str:
    """A flag-parsing error as one line: the UsageError a flag's parser raised (absl wraps it),
    else absl's own message."""
    cause = e.__context__
    while cause is not None and not isinstance(cause, UsageError):
        cause = cause.__context__
    message = str(cause if cause is not None else e).strip().splitlines()[0]
    required = re.search(r"Flag --(\S+) must have a value other than None", message)
    if required:
        return f"--{required.group(1)} is required (--help lists the flags)"
    if isinstance(e, flags.UnrecognizedFlagError):
        return f"{message} (--help lists the flags)"
    return message


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for `app.run`, with `--help` exiting 0 and a bad flag exiting 2."""
    help_kind = _wants_help(argv[1:])
    if help_kind:
        app.usage(shorthelp=help_kind == "short", writeto_stdout=True)
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        if os.environ.get("CLIP_JAX_DEBUG"):
            raise
        exit_with_error(_flag_error(e), 2)


def run(main: Callable[[list[str]], Any]) -> None:
    """`app.run(main)` with the rules above: help exits 0, a bad flag or config is one line;
    `--log_dir` and the logs of a multi-process job as the module docstring says."""
    log_dir = flags.FLAGS["log_dir"]
    log_dir.help = LOG_DIR_HELP
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], log_dir)  # listed by --help

    def main_with_logs(argv: list[str]) -> Any:
        _start_log_file(log_dir.value)
        if _PROCESS_ID_FLAG is None:  # an entry point that never joins a job: process 0
            start_process_logs(0)
        elif _PROCESS_ID_FLAG.value is not None:  # known before the job is joined
            start_process_logs(_PROCESS_ID_FLAG.value)
        try:
            return main(argv)
        finally:
            if _LOGS.index is None:  # ended before joining the job it was launched in
                start_process_logs(0)

    app.run(main_with_logs, flags_parser=_parse_flags)


def run_tool(
    argv: Sequence[str],
    define_flags: Callable[[flags.FlagValues], None],
    body: Callable[[flags.FlagValues, list[str]], int],
    doc: str,
) -> int:
    """A small tool's `main(argv) -> exit status`: its absl flags live in their own FlagValues, so
    that tools can be called in one process (tests do) and share flag names with `clip_jax.main`.

    Args:
      argv: the arguments after the program name.
      define_flags: defines the tool's flags on the FlagValues it is given.
      body: `body(flag_values, positional_args) -> exit status`, run once the flags parsed.
      doc: the usage text `--help` prints above the flags.
    Returns:
      0 after `--help`; 2 after a bad flag or a UsageError (one `error:` line); else `body`'s.
    """
    fv = flags.FlagValues()
    define_flags(fv)
    if _wants_help(argv):
        print(doc.strip() + "\n\nflags:\n" + fv.get_help(include_special_flags=False))
        return 0
    try:
        rest = fv(["tool", *argv])[1:]
        return body(fv, rest)
    except (flags.Error, UsageError) as e:
        if os.environ.get("CLIP_JAX_DEBUG"):
            raise
        message = _flag_error(e) if isinstance(e, flags.Error) else str(e)
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2


def no_arguments(argv: Sequence[str]) -> None:
    """Entry points take flags only: anything else is a mistake (a missing `--`, a typo)."""
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])} (flags start with --)")


# --- Config files -----------------------------------------------------------------------------


def define_config_flag(help_string: str, name: str = "config") -> flags.FlagHolder:
    """`--config=FILE[:ARG]` with `--config.KEY=VALUE` overrides (ml_collections), whose mistakes
    are UsageErrors naming the file: a missing file, a key the file sets or reads that the config
    lacks (configs are locked: `configs/common.base_config`), an override of an unknown key."""
    holder = config_flags.DEFINE_config_file(name, None, help_string)
    flags.FLAGS[name].parser = _ConfigFileParser(name)
    return holder


class _ConfigFileParser(config_flags_lib.ConfigFileFlagParser):
    def parse(self, path: str) -> ml_collections.ConfigDict:
        file, has_arg, arg = path.partition(":")
        if not os.path.isfile(file):
            raise UsageError(
                f"--{self.name}={path}: no file {file!r} (a config is a Python file such as "
                "configs/b16.py; run from the repository root)"
            )
        spec = importlib.util.spec_from_file_location(f"{self.name}_config", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        try:
            config = module.get_config(arg) if has_arg else module.get_config()
        except UsageError as e:
            raise UsageError(f"--{self.name}={path}: {e}") from None
        except (AttributeError, KeyError, TypeError) as e:
            message = _config_dict_error(e)
            if message is None:  # not a ConfigDict refusing a key: a bug in the file
                raise
            raise UsageError(message) from None
        _check_overrides(config, self.name, file)
        config.lock()
        return config


def _config_dict_error(e: Exception) -> str | None:
    """One line for a ConfigDict's refusal inside a config file (an unknown key set or read, a
    value of the wrong type), naming the file and line; None for any other error."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames or "ml_collections" not in frames[-1].filename:
        return None
    user = [f for f in frames if "ml_collections" not in f.filename][-1]
    text = str(e.args[0] if isinstance(e, AttributeError) and e.args else e).strip("'\"")
    file = os.path.relpath(user.filename)
    file = user.filename if file.startswith("..") else file
    where = f"{file}:{user.lineno}: `{(user.line or '').strip()}`"
    if isinstance(e, TypeError):
        return f"{where}: {text.splitlines()[0]}"
    key = re.search(r'Key "([^"]+)" does not exist', text) or re.match(r"'?([^'\s]+)'?", text)
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    hint = f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""
    return (
        f"{where}: the config has no key {key.group(1)!r}{hint}; {KEYS_HINT} "
        "(`with config.unlocked():` adds a key on purpose)"
    )


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """Every leaf of `config` by its dotted path (an empty sub-config is a leaf)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            out.update(config_keys(value, path + "."))
        else:
            out[path] = value
    return out


def _check_overrides(config: ml_collections.ConfigDict, name: str, file: str) -> None:
    """Each `--config.KEY` on the command line names a key the config has."""
    argv = flags.FLAGS.read_flags_from_files(sys.argv, force_gnu=False)  # as ml_collections
    pattern = re.compile(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)")
    for match in filter(None, (pattern.match(a) for a in argv[1:])):
        path, node = match.group(1), config
        for part in path.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                close = difflib.get_close_matches(path, list(config_keys(config)), 1, 0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UsageError(f"--{name}.{path}: {file} has no key {path!r}{hint}; {KEYS_HINT}")
            node = node[part]


def default_workdir(config_arg: str) -> str:
    """`runs/<config name>`: the config file's name without `.py`, plus `_ARG` for `FILE:ARG`."""
    file, _, arg = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(file))[0] + (f"_{arg}" if arg else "")
    return os.path.join("runs", re.sub(r"[^\w.-]+", "_", name).strip("_"))


def config_meanings() -> dict[str, str]:
    """One line per config key: the config files' (`configs/common.py`, when the config came
    from there) and the eval entries' (`evals.NAME.KEY`, next to their defaults)."""
    from clip_jax.evals import entries

    common = sys.modules.get("configs.common")
    evals = {f"evals.*.{key}": meaning for key, meaning in entries.MEANINGS.items()}
    return {**getattr(common, "MEANINGS", {}), **evals}


def describe_config(config: ml_collections.ConfigDict, meanings: Mapping[str, str]) -> str:
    """`key = value  # meaning` for every key of `config`; `meanings` maps dotted keys (`*` as a
    wildcard component, e.g. `evals.*.source`) to one line each."""
    rows = []
    for key, value in config_keys(config).items():
        value = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
        meaning = meanings.get(key) or next(
            (m for pattern, m in meanings.items() if fnmatch.fnmatchcase(key, pattern)), ""
        )
        rows.append((f"{key} = {value!r}", meaning))
    width = min(max(len(r[0]) for r in rows), 48)
    return "\n".join(f"{left:<{width}}  # {m}" if m else left for left, m in rows)
