"""The summaries that start and end a training run on the console: devices, mesh, batch, data
and model before the first step; final loss, last evals and where the checkpoint, metrics and
curves are after the last."""

from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from clip_jax.infra import paths
from clip_jax.training import plots
from clip_jax.training.metrics import METRICS_FILE, duration, last_evals


def summary(title: str, rows: Sequence[tuple[str, str]]) -> str:
    """A titled block of aligned `name  value` lines, what starts and ends a run on the console."""
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join([title, *(f"  {name:<{width}}  {value}" for name, value in rows)])


def format_flops(flops: float | None) -> str:
    if not flops:
        return "unknown"
    for unit, scale in (("PFLOPs", 1e15), ("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6)):
        if flops >= scale:
            return f"{flops / scale:,.2f} {unit}"
    return f"{flops:,.0f} FLOPs"


def start_summary(config, mesh, spec, workdir: str, latest, accum_steps: int) -> str:
    """What a run is about to do: devices, mesh, batch, data, parameters, steps, workdir."""
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(spec.abstract.params))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    per_device = config.batch_size // shards
    micro = f", micro-batches of {per_device // accum_steps}" if accum_steps > 1 else ""
    if latest is None:
        where = "a fresh run"
    elif config.resume_step is not None and config.resume_step < latest:
        where = f"resume_step={config.resume_step} asked for; its newest checkpoint: step {latest}"
    elif latest >= config.total_steps:
        where = f"finished at step {latest}"
    else:
        where = f"resuming at step {latest}"
    return summary(
        "run",
        [
            (
                "devices",
                f"{jax.device_count()} x {jax.devices()[0].device_kind} "
                f"({jax.local_device_count()} per process), processes: {jax.process_count()}",
            ),
            ("mesh", " ".join(f"{axis}={n}" for axis, n in mesh.shape.items())),
            ("batch", f"{config.batch_size:,} global, {per_device:,} per device{micro}"),
            ("data", str(config.train_data.source)),
            ("model", f"{n_params / 1e6:,.2f}M parameters"),
            ("steps", f"{config.total_steps:,}"),
            ("workdir", f"{workdir} ({where})"),
        ],
    )


def end_summary(config, workdir: str, checkpoints: str, last: dict, step: int, seconds) -> str:
    """What a run did: final loss, last evals, where the checkpoint, metrics and curves are."""
    rows = []
    if "loss" in last:
        rows.append(("final loss", f"{last['loss']:.4f}"))
    for key, value in sorted(last_evals(workdir).items()):
        rows.append((key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    rows.append(("checkpoint", str(paths.path(checkpoints) / str(step))))
    rows.append(("metrics", f"{paths.path(workdir) / METRICS_FILE} (and TensorBoard)"))
    curves = _plot(workdir) if last else ""
    if curves:
        rows.append(("curves", curves))
    if step < config.total_steps:
        title = f"stopped at step {step} of {config.total_steps}: rerun the command to resume"
    else:
        title = f"done: step {step} of {config.total_steps} in {duration(seconds)}"
    return summary(title, rows)


def _plot(workdir: str) -> str:
    """The PNG of the run's curves (`plots.plot_run`), or "" when matplotlib is missing."""
    try:
        return plots.plot_run(workdir)
    except ImportError as e:
        logging.info("no curves PNG: %s (pip install matplotlib)", e)
        return ""
