"""Where training metrics go: `DIR/metrics.jsonl` (one JSON object per logged step), TensorBoard
event files in DIR, and a console progress line. Only process 0 writes."""

import json
import math
import os
import time
from typing import Any

from absl import logging


class MetricsWriter:
    """Appends `{"step": s, **values}` to metrics.jsonl and the same scalars to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._workdir = workdir

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        with open(self._path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self._workdir, flush_secs=30)
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, global_step=int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep the row parseable
    return value


class Progress:
    """A console line per log: step, loss, pairs/s and the time left at the current pace."""

    def __init__(self, total_steps: int, start_step: int):
        self.total, self.start, self.t0 = total_steps, start_step, time.monotonic()

    def line(self, step: int, loss: float, pairs_per_sec: float) -> str:
        done = step - self.start
        elapsed = time.monotonic() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        return (
            f"step {step}/{self.total} ({100 * step / self.total:.1f}%) loss {loss:.4f} "
            f"{pairs_per_sec:,.0f} pairs/s ETA {_duration(eta)}"
        )

    def log(self, step: int, loss: float, pairs_per_sec: float) -> None:
        logging.info(self.line(step, loss, pairs_per_sec))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"
