"""Logs of a multi-process job: process 0 prints as a single process does, the others only their
warnings and errors, each line prefixed `[process N] `, and `--log_dir` holds every process's whole
log. This module is also the program the tests launch (`python -m tests.test_logs`): an entry
point that logs a line before joining the job, then an info line, a warning and a Python warning,
and ends as `--end` says."""

import logging as pylogging
import os
import re
import subprocess
import sys
import warnings

from clip_jax.infra import cli, logs, paths
from clip_jax.infra.errors import UsageError

LINE = re.compile(r"^[IWEF]\d{4} ")  # absl's line prefix: level letter, month and day


def _program(argv: list[str], join, end: str) -> None:
    from absl import logging

    logging.info("before joining the job")
    join()
    import jax

    i = jax.process_index()
    logging.info("info line of process %d", i)
    logging.warning("warning line of process %d", i)
    warnings.warn(f"python warning of process {i}", stacklevel=1)
    if end == "usage":
        with cli.user_errors():
            raise UsageError(f"a user's mistake on process {i}")
    if end == "crash":
        raise RuntimeError(f"a bug on process {i}")


def _launch(*args: str) -> subprocess.CompletedProcess:
    """One process of the program above, without a job to join."""
    from tests.conftest import ROOT  # here: conftest imports open_clip, the program not

    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    env.pop("CLIP_JAX_DEBUG", None)
    command = [sys.executable, "-m", "tests.test_logs", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _read(path) -> str:
    with open(path) as f:
        return f.read()


def test_other_processes_print_only_warnings_prefixed_and_log_dir_holds_everything(tmp_path):
    from tests.conftest import run_processes  # here: conftest imports open_clip, the program not

    results = run_processes("tests.test_logs", [f"--log_dir={tmp_path}"], devices=1)
    for code, out in results:
        assert code == 0, out[-3000:]
    first, second = (out for _, out in results)

    for text in ("before joining the job", "info line of process 0", "warning line of process 0"):
        line = next(line for line in first.splitlines() if text in line)
        assert LINE.match(line), line  # as a single process prints it: no prefix
    assert "python warning of process 0" in first

    assert "before joining" not in second and "info line" not in second, second[-3000:]
    for text in ("warning line of process 1", "python warning of process 1"):
        lines = [line for line in second.splitlines() if text in line]
        assert lines and all(line.startswith("[process 1] W") for line in lines), second[-3000:]

    assert sorted(os.listdir(tmp_path)) == ["process_0.log", "process_1.log"]
    for i in (0, 1):
        log = _read(tmp_path / f"process_{i}.log")
        for text in ("before joining the job", f"info line of process {i}"):
            assert text in log, log
        assert f"warning line of process {i}" in log
        assert "[process" not in log  # the file names the process; its lines need no prefix
    assert "python warning of process 1" in _read(tmp_path / "process_1.log")
    assert "process 1" not in _read(tmp_path / "process_0.log")


def test_lines_before_the_index_is_known_reach_the_file_and_a_resume_appends(tmp_path):
    for _ in range(2):
        result = _launch(f"--log_dir={tmp_path}/logs")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "before joining the job" in result.stderr and "[process" not in result.stderr
    log = _read(tmp_path / "logs" / "process_0.log")
    assert log.count("before joining the job") == 2, log  # held until joining, then written
    assert log.index("before joining") < log.index("info line of process 0")


def test_a_later_process_prefixes_its_error_line_and_its_traceback(tmp_path):
    usage = _launch("--process_id=3", "--end=usage", f"--log_dir={tmp_path}")
    assert usage.returncode == 2, usage.stderr[-3000:]
    assert usage.stderr.splitlines()[-1] == "[process 3] error: a user's mistake on process 0"
    assert "info line" not in usage.stderr and "Traceback" not in usage.stderr
    log = _read(tmp_path / "process_3.log")
    assert "info line of process 0" in log
    assert log.splitlines()[-1] == "error: a user's mistake on process 0"

    crash = _launch("--process_id=3", "--end=crash", f"--log_dir={tmp_path}")
    assert crash.returncode == 1
    traceback = crash.stderr[crash.stderr.index("[process 3] Traceback") :].splitlines()
    assert all(line.startswith("[process 3] ") for line in traceback), crash.stderr[-3000:]
    assert traceback[-1] == "[process 3] RuntimeError: a bug on process 0"
    assert _read(tmp_path / "process_3.log").endswith("RuntimeError: a bug on process 0\n")


def test_process_0_prints_its_traceback_as_python_does_and_keeps_it_in_the_file(tmp_path):
    crash = _launch("--end=crash", f"--log_dir={tmp_path}")
    assert crash.returncode == 1 and "[process" not in crash.stderr
    assert crash.stderr.splitlines()[-1] == "RuntimeError: a bug on process 0"
    assert _read(tmp_path / "process_0.log").endswith("RuntimeError: a bug on process 0\n")


def test_help_lists_log_dir():
    result = _launch("--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--log_dir: Also write this process's whole log" in result.stdout, result.stdout


def test_a_log_on_an_object_store_is_rewritten_whole_at_most_every_30s(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(paths.time, "monotonic", lambda: clock[0])  # the appender's clock
    handler = logs.LogFile(str(tmp_path))
    handler.remote = True  # what a gs:// directory sets; the local backend stands in for it
    (tmp_path / "process_2.log").write_text("from before the resume\n")

    def log(message):
        handler.handle(pylogging.LogRecord("x", pylogging.INFO, "f.py", 1, message, None, None))

    log("held until the index is known")
    handler.open(2)
    path = tmp_path / "process_2.log"
    first, held = _read(path).splitlines()
    assert first == "from before the resume" and held.endswith("held until the index is known")
    clock[0] += 10
    log("ten seconds later")
    assert "ten seconds later" not in _read(path)  # not rewritten again yet
    clock[0] += 25
    log("thirty-five seconds later")
    assert "ten seconds later" in _read(path) and "thirty-five" in _read(path)
    log("at exit")
    handler.close()
    assert _read(path).splitlines()[-1].endswith("at exit")


if __name__ == "__main__":
    from absl import flags

    _END = flags.DEFINE_enum("end", "ok", ["ok", "usage", "crash"], "How the program ends.")
    _JOIN = cli.define_distributed_flags()
    cli.run(lambda argv: _program(argv, _JOIN, _END.value))
