"""What every entry point shares: one flag style, joining the other processes of a multi-host job,
and a user's mistake as one line and exit status 2.

Every entry point takes absl flags (`--name=value` or `--name value`); `--help` prints its usage
and exits 0; a bad flag, config file (one that does not load too: its file, line and Python's
message), config key or other `UsageError` ends it with one `error:` line on stderr and exit
status 2 (`CLIP_JAX_DEBUG=1` shows the traceback). Anything else is a bug and keeps its traceback.
In a job of several processes, one that stops makes the others stop too, and one that is lost
makes them stop with exit status 75 (`clip_jax.infra.watchdog`).

    cli.run(main)                                  main, evaluate, linear_probe, benchmark: absl's
                                                   app.run with these rules
    cli.run_tool(argv, define_flags, body, doc)    small tools (prepare, digits, tokenizers,
                                                   convert export), callable in-process

Logs (which process prints what, `--log_dir`, the libraries' chatter) are `clip_jax.infra.logs`.
"""

import contextlib
import difflib
import fnmatch
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn

import ml_collections
from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as config_flags_lib

from clip_jax.infra import coordination, logs, watchdog
from clip_jax.infra.errors import UsageError
from clip_jax.infra.logs import quiet_libraries, start_process_logs  # noqa: F401 (entry points' API)

HELP_FLAGS = ("-h", "-?", "-help", "--help", "-helpshort", "--helpshort", "-helpfull", "--helpfull")
KEYS_HINT = "python -m clip_jax.main --config=FILE --show_config lists every key"
# jax.distributed.initialize's defaults, given to the coordination service's process too
INITIALIZATION_TIMEOUT = 300  # seconds for every process to join
SHUTDOWN_TIMEOUT = 300  # seconds JAX's shutdown barrier waits for the other processes


def _cluster_detected() -> bool:
    """A multi-process launch that `jax.distributed.initialize()` can configure by itself."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # a multi-host TPU slice


def define_distributed_flags():
    """The `--coordinator_address --num_processes --process_id --heartbeat_timeout_seconds` flags
    every entry point that can run as several processes takes; returns a function that joins the
    job they describe (`initialize_distributed`)."""
    global _PROCESS_ID_FLAG
    coordinator = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
    num_processes = flags.DEFINE_integer("num_processes", None, "Number of processes.")
    process_id = flags.DEFINE_integer("process_id", None, "This process's index.")
    heartbeat = flags.DEFINE_float(
        "heartbeat_timeout_seconds", 60.0, watchdog.HEARTBEAT_TIMEOUT_HELP, lower_bound=1.0
    )
    _PROCESS_ID_FLAG = process_id
    return lambda: initialize_distributed(
        coordinator.value, num_processes.value, process_id.value, heartbeat.value
    )


_PROCESS_ID_FLAG: flags.FlagHolder | None = None  # --process_id, once an entry point defines it


def initialize_distributed(
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    heartbeat_timeout: float,
) -> None:
    """Joins a multi-process job: explicit flags, else TPU pods and SLURM detected, else alone;
    then routes this process's logs by its index (`start_process_logs`) and, in a job of several
    processes, starts the watchdog that stops this one when another is lost (`watchdog`).
    Process 0 hosts the job's coordination service in a process of its own (`coordination`),
    so that its death is noticed like any other process's."""
    import jax

    # CPU collectives across processes (tests, CPU clusters); accelerators are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    local_devices = None
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise UsageError("--coordinator_address needs --num_processes and --process_id")
    elif _cluster_detected():
        from jax._src import clusters  # what jax.distributed.initialize() would detect

        coordinator, num_processes, process_id, local_devices = (
            clusters.ClusterEnv.auto_detect_unset_distributed_params(
                None, None, None, None, None, INITIALIZATION_TIMEOUT
            )
        )
        if None in (coordinator, num_processes, process_id):
            raise UsageError(
                "a multi-process launch was detected, but not its coordinator, size or this "
                "process's index: pass --coordinator_address, --num_processes and --process_id"
            )
    else:
        logs.start_process_logs(0)
        return
    logs.start_process_logs(process_id)  # before JAX's own lines about joining
    # JAX's own detection of a lost process aborts every process with a stack trace: it stays
    # well behind the watchdog's, as a backstop.
    jax_heartbeat = max(100, int(2 * heartbeat_timeout))
    bind = None
    if process_id == 0 and num_processes > 1:
        coordination.start(
            coordinator, num_processes, jax_heartbeat, SHUTDOWN_TIMEOUT, heartbeat_timeout
        )
        bind = coordination.IDLE_ADDRESS
    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        local_device_ids=local_devices,
        initialization_timeout=INITIALIZATION_TIMEOUT,
        heartbeat_timeout_seconds=jax_heartbeat,
        shutdown_timeout_seconds=SHUTDOWN_TIMEOUT,
        coordinator_bind_address=bind,
    )
    watchdog.start(heartbeat_timeout, coordinator)


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


def print_stdout(text: str) -> None:
    """Prints `text`; a reader that stopped reading (`| head`) is no error: the rest of the
    output goes nowhere, without the BrokenPipeError Python would raise now and at exit."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def exit_with_error(message: str, status: int) -> NoReturn:
    """Ends the program with `error: MESSAGE` on stderr (prefixed on processes after the first,
    and in the `--log_dir` file) and exit `status`; in a multi-process job, the other processes
    stop too, with a line naming this one (`watchdog.Watchdog.stop`)."""
    if watchdog.ACTIVE is not None:  # the other processes of the job stop too
        watchdog.ACTIVE.stop(status, message)
    logs.print_error(message)
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
    if cause is not None:  # its whole message: a config's syntax error shows the line after it
        return str(cause).strip()
    message = str(e).strip().splitlines()[0]
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
    log_dir.help = logs.LOG_DIR_HELP
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], log_dir)  # listed by --help

    def main_with_logs(argv: list[str]) -> Any:
        logs.start_log_file(log_dir.value)
        if _PROCESS_ID_FLAG is None:  # an entry point that never joins a job: process 0
            logs.start_process_logs(0)
        elif _PROCESS_ID_FLAG.value is not None:  # known before the job is joined
            logs.start_process_logs(_PROCESS_ID_FLAG.value)
        try:
            return main(argv)
        except Exception as e:
            if watchdog.ACTIVE is None:  # alone: a bug, its traceback printed by Python
                raise
            # In a job: the news of another process lost or stopped, else a bug, with its
            # traceback; either way every process stops.
            watchdog.ACTIVE.stop_with_traceback(e)
        finally:
            if logs.STATE.index is None:  # ended before joining the job it was launched in
                logs.start_process_logs(0)

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
        try:
            spec.loader.exec_module(module)
            get_config = getattr(module, "get_config", None)
            if not callable(get_config):
                raise UsageError(f"{file} defines no `get_config(arg=None)`")
            config = get_config(arg) if has_arg else get_config()
        except UsageError as e:
            raise UsageError(f"--{self.name}={path}: {e}") from e
        except Exception as e:  # the config file is the user's code: whatever it raises is theirs
            message = None
            if isinstance(e, (AttributeError, KeyError, TypeError)):
                message = _config_dict_error(e)
            raise UsageError(message or _config_load_error(e, self.name, path)) from e
        if not isinstance(config, ml_collections.ConfigDict):
            raise UsageError(
                f"--{self.name}={path}: get_config() returned a {type(config).__name__}, not an "
                "ml_collections.ConfigDict"
            )
        _check_overrides(config, self.name, file)
        config.lock()
        return config


def _config_load_error(e: Exception, name: str, path: str) -> str:
    """A config file that does not load (a syntax error, a failed import, an exception in its
    get_config) as one line: the file, the line of it where things went wrong (the innermost
    frame in that file, so a call into other code is named by the call), and Python's message. A
    syntax error in the file itself is followed by its source line and caret line."""
    file = path.partition(":")[0]
    here = os.path.abspath(file)
    head = f"--{name}={path} does not load"
    if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == here:
        shown = traceback.format_exception_only(type(e), e)  # File..., source, carets, message
        source = "".join(line for line in shown[1:-1] if line.strip()).rstrip("\n")
        where = f"{head}: {file}:{e.lineno}: {type(e).__name__}: {e.msg}"
        return f"{where}\n{source}" if source else where
    text = str(e).strip().splitlines()
    message = type(e).__name__ + (f": {text[0]}" if text else "")
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if os.path.abspath(f.filename) == here]
    if not ours:  # raised on calling get_config (it takes no ARG, say)
        return f"{head}: {message}"
    return f"{head}: {file}:{ours[-1].lineno}: `{(ours[-1].line or '').strip()}`: {message}"


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
