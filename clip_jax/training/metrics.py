"""Where training metrics go: `DIR/metrics.jsonl` (one JSON object per logged step), TensorBoard
event files in DIR, and the console's progress line (the summaries that start and end a run are
`summary`'s). Only process 0 writes."""

import json
import math
import time
from typing import Any

from absl import logging

from clip_jax.infra import paths
from clip_jax.infra.errors import UsageError

METRICS_FILE = "metrics.jsonl"
PROGRESS_EVERY_S = 30.0  # a console line at least this often, whatever log_every_steps is


class MetricsWriteError(UsageError):
    """metrics.jsonl could not be written (a full disk, lost access): one line."""


class MetricsWriter:
    """Appends `{"step": s, **values}` to metrics.jsonl and the same scalars to TensorBoard.

    `start_step` is the step the run starts from (the restored checkpoint's, 0 for a fresh run):
    rows past it were logged by an earlier attempt after its last checkpoint and are dropped, so
    that a reader sees each step once. On an object store (no append) the file is rewritten
    whole, at most every `flush_secs` and at `flush` / `close`.

    A write of metrics.jsonl that the OS refuses raises MetricsWriteError; one of TensorBoard's
    events is a warning, and TensorBoard gets no more events this run (metrics.jsonl has them).
    """

    def __init__(
        self, workdir: str, enabled: bool = True, start_step: int = 0, flush_secs: float = 30.0
    ):
        self.enabled = enabled
        self._tb, self._tb_failed = None, False
        self._file: paths.Appender | None = None  # opened at the first row
        if not enabled:
            return
        self._workdir = str(paths.path(workdir))
        self._path = paths.path(workdir) / METRICS_FILE
        self._flush_secs = flush_secs
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self.rewind(start_step)

    def rewind(self, step: int) -> None:
        """Drops the rows past `step`: logged after the checkpoint that the run resumes, or
        goes back to (a rollback)."""
        if not self.enabled:
            return
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
        text = self._path.read_text() if self._path.exists() else ""
        rows = parse_rows(text, str(self._path))
        kept = [row for row in rows if row["step"] <= step]
        kept_text = "".join(json.dumps(row) + "\n" for row in kept)
        if kept_text != text:
            logging.info(
                "%s: dropped %d rows past step %d (logged after the checkpoint this run goes on "
                "from; those of an abandoned branch are kept in its folder)",
                self._path,
                len(rows) - len(kept),
                step,
            )
            paths.write_text(self._path, kept_text)

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        if self._file is None:
            self._file = paths.Appender(self._path, rewrite_secs=self._flush_secs)
        try:
            self._file.write(json.dumps(row) + "\n")
        except OSError as e:
            raise self._failed(e) from None
        if self._tb is None and not self._tb_failed:
            from tensorboardX import SummaryWriter

            paths.register_tensorboard_schemes()
            self._tb = SummaryWriter(self._workdir, flush_secs=self._flush_secs)
        scalars = [
            (key, value)
            for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)
        ]
        self._tensorboard(
            lambda tb: [tb.add_scalar(k, v, global_step=int(step)) for k, v in scalars]
        )

    def flush(self) -> None:
        """Makes every row written so far visible in the file (and TensorBoard's)."""
        if not self.enabled:
            return
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as e:
                raise self._failed(e) from None
        self._tensorboard(lambda tb: tb.flush())

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
        self._tensorboard(lambda tb: tb.close())
        self._tb = None

    def _failed(self, e: OSError) -> MetricsWriteError:
        reason = e.strerror or str(e)
        return MetricsWriteError(
            f"writing {self._path} failed ({reason}): free space (or fix access) and rerun to "
            "resume from the last checkpoint"
        )

    def _tensorboard(self, call) -> None:
        """`call(writer)` on TensorBoard's writer; an OS error ends TensorBoard for this run
        with a warning, and stops tensorboardX's thread and exit hook from flushing again."""
        if self._tb is None:
            return
        try:
            call(self._tb)
        except OSError as e:
            logging.warning(
                "TensorBoard events in %s: %s; none more this run (metrics.jsonl has them all)",
                self._workdir,
                e.strerror or e,
            )
            for file_writer in (self._tb.all_writers or {}).values():
                events = getattr(file_writer, "event_writer", None)
                worker = getattr(events, "_worker", None)
                if worker is not None:  # stop its thread without another flush
                    worker._queue.put(worker._shutdown_signal)
                if events is not None:
                    events._closed = True  # tensorboardX's exit hook: nothing left to flush
            self._tb, self._tb_failed = None, True


def parse_rows(text: str, name: str) -> list[dict]:
    """The rows of a metrics.jsonl text; a line that is not a whole row (the half-written last
    line of a killed run) is left out, with a warning."""
    rows, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            bad += 1
    if bad:
        logging.warning("%s: left out %d lines that are not whole rows", name, bad)
    return rows


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep the row parseable
    return value


class Progress:
    """The console's progress line: step/total, loss, pairs/s since the previous line and the time
    left at the pace since the first step. The clock starts with the loop (after compilation), and
    time that is not training's (evals) is left out with `exclude`."""

    def __init__(self, total_steps: int, start_step: int, batch_size: int):
        self.total, self.start, self.batch = total_steps, start_step, batch_size
        self.t0 = self._line_t = time.monotonic()
        self._line_step = start_step

    def due(self, step: int) -> bool:
        """A line at the first step, then at least every PROGRESS_EVERY_S seconds."""
        return step == self.start + 1 or time.monotonic() - self._line_t >= PROGRESS_EVERY_S

    def exclude(self, seconds: float) -> None:
        self.t0 += seconds
        self._line_t += seconds

    def line(self, step: int, loss: float) -> str:
        now = time.monotonic()
        pairs_per_sec = (step - self._line_step) * self.batch / max(now - self._line_t, 1e-9)
        eta = (now - self.t0) / max(step - self.start, 1) * (self.total - step)
        self._line_t, self._line_step = now, step
        return (
            f"step {step}/{self.total} ({100 * step / self.total:.1f}%) loss {loss:.4f} "
            f"{pairs_per_sec:,.0f} pairs/s ETA {duration(eta)}"
        )

    def log(self, step: int, loss: float) -> None:
        logging.info(self.line(step, loss))

    def elapsed(self) -> float:
        """Seconds of training since the loop started (compilation and evals excluded)."""
        return time.monotonic() - self.t0


def is_eval_value(key: str) -> bool:
    """Whether a metrics key is an eval's result (`zeroshot/NAME/top1`, ...): not its timing
    (`eval/NAME/seconds`) nor a training figure with a "/" (`checkpoint/blocking_seconds`)."""
    return "/" in key and not key.startswith(("eval/", "checkpoint/"))


def last_evals(workdir: str) -> dict[str, float]:
    """The eval values of the last eval row of `workdir/metrics.jsonl` (keys holding a "/";
    their timings left out); {} when the run logged none."""
    path = paths.path(workdir) / METRICS_FILE
    if not path.exists():
        return {}
    rows = parse_rows(path.read_text(), str(path))
    for row in reversed(rows):
        evals = {k: v for k, v in row.items() if is_eval_value(k)}
        if evals:
            return evals
    return {}


def duration(seconds: float) -> str:
    """H:MM:SS."""
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"
