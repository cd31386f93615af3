"""A run's curves and results, read back from its `metrics.jsonl`: `plot_run(workdir)` draws the
loss, the learning rate, the temperature and the evals against the step into `curves.png`, and
`results_table(workdir)` gives the latest value of every eval metric as text.

Training rows hold plain keys (`loss`, `learning_rate`, `logit_scale`, and `logit_bias` for a
model with the sigmoid loss's bias); eval rows hold
slash-scoped ones (`zeroshot/digits/top1`, `linear_probe/probe/top1`, `eval/probe/seconds`).
A step logged twice (a resumed run logs its restored step's evals again) keeps its last value.
"""

import io
import math
import re

from clip_jax.infra import paths
from clip_jax.infra.errors import UsageError
from clip_jax.training.metrics import is_eval_value, parse_rows

CURVES_FILE = "curves.png"
# Eval metrics drawn: accuracies and recalls, which share the [0, 1] axis (not C, ranks, times).
PLOTTED = re.compile(r"^(zeroshot|linear_probe|fewshot|retrieval)/[^/]+/(top1|.*r@1|\d+shot)$")
MARKERS = ("o", "s", "^", "D", "v", "P")
TRAINING_PANELS = (
    ("loss", "contrastive loss", "linear"),
    ("learning_rate", "learning rate", "linear"),
    ("logit_scale", "temperature: logit scale 1/τ", "linear"),
    ("logit_bias", "logit bias b (sigmoid loss)", "linear"),
)


def read_series(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """`workdir/metrics.jsonl` as {key: [(step, value), ...]} sorted by step, one value a step
    (the last logged), finite numbers only."""
    series: dict[str, dict[int, float]] = {}
    path = paths.path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise UsageError(f"{path}: no such file; is {workdir} the workdir of a training run?")
    for row in parse_rows(path.read_text(), str(path)):
        step = int(row.pop("step"))
        for key, value in row.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key, {})[step] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def plot_run(workdir: str) -> str:
    """Draws the run's curves into `workdir/curves.png` and returns that path.

    Panels: loss, learning rate, temperature (logit scale) and, where the model has one, the
    logit bias against the step; then one with
    every eval accuracy (zero-shot and probe top-1, k-shot, retrieval R@1) when the run has
    evals, each labelled with its last value.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    from matplotlib.ticker import MaxNLocator

    series = read_series(workdir)
    evals = sorted(k for k in series if PLOTTED.match(k))
    panels = [p for p in TRAINING_PANELS if p[0] in series]
    count = len(panels) + (1 if evals else 0)
    if count == 0:
        raise UsageError(f"{workdir}/metrics.jsonl has no training or eval values to plot")
    cols = 2 if count > 1 else 1
    rows = -(-count // cols)
    fig = Figure(figsize=(5.2 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (key, title, scale) in zip(axes, panels, strict=False):
        steps, values = zip(*series[key], strict=True)
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(title)
        ax.set_yscale(scale)
    if evals:
        ax = axes[len(panels)]
        for i, key in enumerate(evals):  # shrinking markers: equal values stay visible
            steps, values = zip(*series[key], strict=True)
            marker, size = MARKERS[i % len(MARKERS)], max(3, 9 - 2 * i)
            ax.plot(
                steps, values, marker=marker, markersize=size, label=f"{key} ({values[-1]:.3f})"
            )
        ax.set_title("evals")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize="small", loc="best")
    last_step = max(steps[-1][0] for steps in series.values())
    for ax in axes[:count]:  # one step axis for all, so that evals line up with training
        ax.set_xlim(0, last_step * 1.03)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[count:]:
        ax.set_visible(False)
    fig.suptitle(str(workdir), fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    path = paths.path(workdir) / CURVES_FILE
    path.write_bytes(buffer.getvalue())
    return str(path)


def results_table(workdir: str) -> str:
    """The latest value of each eval metric of the run (times left out), one aligned line each:
    `metric  step  value`; "" when the run has no eval results."""
    series = read_series(workdir)
    keys = sorted(k for k in series if is_eval_value(k))
    if not keys:
        return ""
    width = max(len("metric"), *(len(k) for k in keys))
    lines = [f"{'metric':<{width}}  {'step':>7}  value"]
    for key in keys:
        step, value = series[key][-1]
        lines.append(f"{key:<{width}}  {step:>7}  {value:.4f}")
    return "\n".join(lines)
