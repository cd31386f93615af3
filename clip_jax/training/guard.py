"""What the trainer does with a step whose loss or gradient is not finite (`config.nonfinite`):
the train step never applies such an update and counts it in `nonfinite_steps`; the guard reads
that count as the loop goes and halts the run, lets it skip on within its limits, or says that
the run rolls back (`recovery`)."""

import jax
from absl import logging


class HaltError(RuntimeError):
    """The run stopped itself: its loss went wrong (exit status 3 from `clip_jax.main`)."""


class NonFiniteLossError(HaltError):
    """The loss or the gradient stopped being finite under `nonfinite='halt'` (or a run that
    cannot skip or roll back any more)."""


class LossSpikeError(HaltError):
    """A run of loss spikes under `spike.policy='halt'`."""


class NonFiniteGuard:
    """Applies `config.nonfinite` to the steps whose loss or gradient was not finite (the train
    step did not apply their update and counted them in `nonfinite_steps`).

    halt: stop at the first such step of this run. rollback: `check` returns the step, and the
    loop rolls back (`recovery.Recovery`). skip: log each one and go on, but stop a run
    that is not learning any more: `nonfinite_max_consecutive` skipped steps in a row, or more
    than `nonfinite_max_fraction` of the run's steps (and at least `nonfinite_max_consecutive`).
    Counts start from the restored state's, so a checkpoint never halts the run that resumes it.
    """

    def __init__(self, config, start_step: int, start_count: int):
        self.policy = config.nonfinite
        self.max_consecutive = config.nonfinite_max_consecutive
        self.max_fraction = config.nonfinite_max_fraction
        self.start_step, self.start_count = start_step, start_count
        self.count, self.consecutive, self.checked = start_count, 0, start_step

    def check(self, step: int, count: jax.Array) -> int | None:
        """`count` is `nonfinite_steps` after `step`; steps may be checked more than once.
        Returns `step` when it was not finite under `nonfinite='rollback'`, else None."""
        if step <= self.checked:
            return None
        count = int(count)
        new = count - self.count
        self.checked, self.count = step, count
        if not new:
            self.consecutive = 0
            return None
        if self.policy == "rollback":
            return step
        self.consecutive += new
        skipped = count - self.start_count
        # What to do next (the checkpoint to resume from) is the loop's to add: `recovery`.
        if self.policy == "halt":
            raise NonFiniteLossError(
                f"the loss or gradient became non-finite at step {step} (the update was not "
                f"applied; nothing after step {step - 1} is saved)"
            )
        steps = step - self.start_step
        logging.warning(
            "step %d: non-finite loss or gradient, update skipped (%d in a row; %d of the %d "
            "steps of this run)",
            step,
            self.consecutive,
            skipped,
            steps,
        )
        if self.consecutive >= self.max_consecutive or (
            skipped >= self.max_consecutive and skipped > self.max_fraction * steps
        ):
            raise NonFiniteLossError(
                f"{skipped} of the {steps} steps up to step {step} had a non-finite loss or "
                f"gradient ({self.consecutive} in a row; nonfinite_max_consecutive="
                f"{self.max_consecutive}, nonfinite_max_fraction={self.max_fraction}): the run "
                "is not learning"
            )
        return None
