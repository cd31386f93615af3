"""Loss spikes: a step whose loss rises far above the run's recent losses (PaLM, OLMo and others
restart such runs from an earlier checkpoint and skip the batches around the spike).

`SpikeDetector` keeps the last `spike.window` calm losses; once it holds that many, a step whose
loss exceeds their mean by more than `spike.factor` times their spread is a spike. A spike starts
an episode; `spike.length` spikes in a row call for `spike.policy`, and as many calm steps in a
row end the episode (the run has recovered). Spikes never enter the window, so an episode does
not raise its own threshold. Every process sees the same (global) loss, so all of them decide
alike. The detector's state goes into each checkpoint, so a resume detects exactly as the
uninterrupted run would.
"""

import math
from collections import deque
from typing import Any

import numpy as np

# The spread is at least this fraction of the mean: a loss that has stopped moving (a constant
# window) would otherwise call every rounding-level rise a spike.
MIN_RELATIVE_SPREAD = 0.01


class SpikeDetector:
    """Reads one loss per step; says which steps are spikes and when a run of them is long
    enough to act on.

    Attributes:
      spikes: spike steps so far in the run (the restored checkpoint's count, then this run's).
      episode_start: the first spike step of the episode in progress, or None (recovered).
    """

    def __init__(self, window: int, factor: float, length: int, state: dict | None = None):
        self.window, self.factor, self.length = window, factor, length
        state = state or {}
        self._losses: deque[float] = deque(state.get("losses", ()), maxlen=max(window, 1))
        self.spikes = int(state.get("spikes", 0))
        self.episode_start: int | None = state.get("episode_start")
        self._run = int(state.get("run", 0))  # spikes in a row
        self._calm = int(state.get("calm", 0))  # calm steps in a row within an episode
        self.checked = int(state.get("checked", 0))  # the last step read

    def threshold(self) -> float | None:
        """The loss above which a step is a spike; None until the window is full (or with
        detection off)."""
        if self.window == 0 or len(self._losses) < self.window:
            return None
        losses = np.asarray(self._losses, np.float64)
        mean = float(losses.mean())
        spread = max(float(losses.std()), MIN_RELATIVE_SPREAD * abs(mean))
        return mean + self.factor * spread

    def observe(self, step: int, loss: float) -> bool:
        """Reads the loss of `step` (steps read before are ignored); returns True when it ends a
        run of `length` spikes in a row: the moment to act on `spike.policy`. A non-finite loss
        is not read here (the non-finite guard owns it)."""
        if step <= self.checked or not math.isfinite(loss):
            return False
        self.checked = step
        limit = self.threshold()
        if limit is not None and loss > limit:
            self.spikes += 1
            self._run += 1
            self._calm = 0
            if self.episode_start is None:
                self.episode_start = step
            return self._run == self.length
        self._run = 0
        self._losses.append(float(loss))
        if self.episode_start is not None:
            self._calm += 1
            if self._calm >= self.length:
                self.episode_start, self._calm = None, 0
        return False

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the detector (JSON)."""
        return {
            "losses": list(self._losses),
            "spikes": self.spikes,
            "episode_start": self.episode_start,
            "run": self._run,
            "calm": self._calm,
            "checked": self.checked,
        }
