"""`python -m clip_jax.main` on synthetic data whose batches SPIKED (1-based, counted from the
start of the data) have their captions swapped for other examples' (images and captions no
longer match): a loss spike that skipping those batches removes, the same on any mesh and any
number of processes (every example is a function of its global index). Every periodic checkpoint
is written, none postponed while the previous one is being written (`busy` is never true: the
loop waits instead), so that the checkpoint a rollback goes back to never depends on timing.

    python -m tests.spiked_run --config=configs/tiny.py [clip_jax.main's flags]
"""

from clip_jax.data import sources
from clip_jax.training import checkpoint

SPIKED = (8,)
_SHIFT = 1_000_003  # the swapped captions' examples: far from any the run trains on
_batches = sources.SyntheticSource.batches


def spiked_batches(self, global_batch, rows, state=None):
    """SyntheticSource.batches, with the captions of the batches SPIKED swapped."""
    rows_ = sources.batch_rows(rows, global_batch)
    for batch, data_state in _batches(self, global_batch, rows, state):
        taken = data_state["step"]  # batches of the data taken so far, this one included
        if taken in SPIKED:
            others = self.examples((taken - 1) * global_batch + rows_ + _SHIFT)
            batch = {**batch, "text": others["text"]}
        yield batch, data_state


def patch() -> tuple:
    """Spikes the synthetic data and saves every checkpoint; returns what `unpatch` restores."""
    saved = (sources.SyntheticSource.batches, checkpoint.Checkpointer.busy)
    sources.SyntheticSource.batches = spiked_batches
    checkpoint.Checkpointer.busy = lambda self: False
    return saved


def unpatch(saved: tuple) -> None:
    sources.SyntheticSource.batches, checkpoint.Checkpointer.busy = saved


if __name__ == "__main__":
    from clip_jax import main
    from clip_jax.infra import cli

    patch()
    cli.run(main.main)
