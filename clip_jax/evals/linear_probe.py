"""Linear probes: multinomial logistic regression on frozen features, and CLIP's C sweep.

`fit_logistic` minimises scikit-learn's multinomial `LogisticRegression` objective at the same C,

    C · Σ_i CE(x_i W + b, y_i) + ½ ||W||²        (the bias b is not penalised),

with optax's L-BFGS and zoom linesearch inside one `jax.lax.while_loop`, in float32 with the
highest matmul precision. Like scikit-learn it minimises the objective divided by C·n (same
optimum, better conditioned) and stops when the largest gradient entry of that scaled objective
falls to `tol`. The objective and its gradient over all n rows are a few matmuls: features live
on the device once, memory is O(n·(dim + classes)).

`sweep_and_evaluate` is the protocol of Radford et al. 2021, appendix A.3: C on a log grid from
1e-6 to 1e6 at 8 steps per decade, searched on a validation split by a "parametric binary
search" (every second decade first, then halving the interval around the peak), then a refit on
train + validation at the chosen C, scored on the test split.

The eval type `linear_probe` (`LinearProbe`) runs that protocol on frozen image features;
`python -m clip_jax.linear_probe` is its batch job.
"""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clip_jax.evals.evaluator import FeatureProbe, Key
from clip_jax.infra.rules import INT, STRING, Rule, is_number

HIGHEST = jax.lax.Precision.HIGHEST

# The bound on the largest gradient entry of the scaled objective (sklearn's lbfgs `gtol` test),
# tighter than sklearn's 1e-4, which can stop 0.3% above the optimum (C=10 on digits); and the
# CLIP paper's iteration cap (appendix A.3).
TOL = 1e-6
MAX_ITER = 1000

# The paper's grid: C in 10^-6 .. 10^6 at 8 steps per decade (97 values); the search starts on
# every 16th (every second decade) and halves the stride around the peak down to 1.
C_GRID = np.logspace(-6.0, 6.0, 12 * 8 + 1)
COARSE_STRIDE = 16


def _scaled_objective(params, x, y, C):
    """The sklearn objective divided by C·n: mean cross-entropy + ||W||² / (2 C n)."""
    W, b = params
    logits = jnp.dot(x, W, precision=HIGHEST) + b  # [n, classes]
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.take_along_axis(logp, y[:, None], axis=1)  # [n, 1]
    return jnp.mean(ce) + 0.5 / (C * x.shape[0]) * jnp.sum(W * W)


@jax.jit
def _fit(x, y, C, W, b, tol, max_iter):
    """L-BFGS until the scaled gradient's max-abs <= tol, the objective stalls, or max_iter.

    At small C the penalty's curvature 1/(C·n) dwarfs the unpenalised bias's (at most 1/2), and
    float32 L-BFGS stalled with the bias still near its start (at C=1e-6 on 1,197 rows: 2e-4
    above the optimum, a nearest-mean classifier where the optimum predicts the largest class).
    It so optimises V = W / a with a = min(1, sqrt(C·n)), which gives the penalty unit
    curvature and leaves large C as it was; the optimum is the same, and the stopping test is
    still on the gradient with respect to W (d/dW = d/dV / a).
    """
    a = jnp.minimum(1.0, jnp.sqrt(C * x.shape[0]))

    def value_fn(params):
        V, b = params
        return _scaled_objective((a * V, b), x, y, C)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(value_fn)

    def step(carry):
        params, state, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=value_fn)
        return optax.apply_updates(params, updates), state, value

    def keep_going(carry):
        _, state, previous = carry
        count = optax.tree_utils.tree_get(state, "count")
        grad_v, grad_b = optax.tree_utils.tree_get(state, "grad")
        grad_max = jnp.maximum(jnp.max(jnp.abs(grad_v)) / a, jnp.max(jnp.abs(grad_b)))
        # No decrease means the linesearch hit float32's resolution of the objective: stop there
        # rather than spin to max_iter.
        progress = optax.tree_utils.tree_get(state, "value") < previous
        return (count == 0) | ((count < max_iter) & (grad_max > tol) & progress)

    params = (W / a, b)
    carry = (params, opt.init(params), jnp.asarray(jnp.inf, jnp.float32))
    (V, b), state, _ = jax.lax.while_loop(keep_going, step, carry)
    return (a * V, b), optax.tree_utils.tree_get(state, "count")


def fit_logistic(
    x: np.ndarray | jax.Array,
    y: np.ndarray | jax.Array,
    C: float,
    *,
    num_classes: int | None = None,
    init: tuple[jax.Array, jax.Array] | None = None,
    max_iter: int = MAX_ITER,
    tol: float = TOL,
) -> tuple[jax.Array, jax.Array]:
    """Multinomial logistic regression at inverse regularisation C, as scikit-learn's lbfgs.

    Compiled once per shape of (x, classes): C, tol, max_iter and `init` are traced, so a sweep
    over C reuses one executable. Besides `tol` and `max_iter`, it stops when an iteration no
    longer lowers the objective (float32's resolution of it). A class absent from y (possible
    when `num_classes` is given) has no finite optimum: its bias is driven down until its
    probabilities are below `tol`, so it is never predicted, and the other classes match a fit
    without it.

    Args:
      x: [n, dim] features.
      y: [n] int labels in [0, num_classes).
      C: inverse L2 strength (scikit-learn's `C`), > 0.
      num_classes: number of classes; default max(y) + 1.
      init: warm start (W [dim, classes], b [classes]); default zeros.
      max_iter: most L-BFGS iterations.
      tol: stop when max |gradient| of the objective / (C·n) is at most this (sklearn's `tol`).
    Returns:
      W [dim, classes] and b [classes], float32.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.int32)
    if num_classes is None:
        num_classes = int(jnp.max(y)) + 1
    if init is None:
        init = (jnp.zeros((x.shape[1], num_classes), jnp.float32), jnp.zeros(num_classes))
    W, b = (jnp.asarray(a, jnp.float32) for a in init)
    (W, b), _ = _fit(x, y, jnp.float32(C), W, b, jnp.float32(tol), jnp.int32(max_iter))
    return W, b


@jax.jit
def _accuracy(W, b, x, y):
    logits = jnp.dot(x, W, precision=HIGHEST) + b  # [n, classes]
    return jnp.mean(jnp.argmax(logits, axis=1) == y)


def accuracy(
    W: jax.Array, b: jax.Array, x: np.ndarray | jax.Array, y: np.ndarray | jax.Array
) -> float:
    """Top-1 accuracy of the linear classifier x W + b.

    Args:
      W: [dim, classes]; b: [classes].
      x: [n, dim] features; y: [n] int labels.
    Returns:
      The fraction of rows whose largest logit is at their label.
    """
    return float(_accuracy(W, b, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)))


def _holdout_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified seeded split: floor(val_fraction · n_c) random rows of each class c to val."""
    order = np.random.default_rng(seed).permutation(len(y))
    order = order[np.argsort(y[order], kind="stable")]  # grouped by class, random within
    labels = y[order]
    first = np.searchsorted(labels, labels)  # where each row's class starts in `order`
    counts = np.bincount(labels)[labels]
    is_val = np.arange(len(y)) - first < np.floor(val_fraction * counts)
    return np.sort(order[~is_val]), np.sort(order[is_val])


def _search_c(fit_x, fit_y, val_x, val_y, num_classes, max_iter, tol):
    """The paper's binary search over C_GRID -> (best index, its fit, {index: val top-1})."""
    fit_x, fit_y, val_x, val_y = (jnp.asarray(a) for a in (fit_x, fit_y, val_x, val_y))
    solutions, val_top1 = {}, {}  # grid index -> (W, b), validation top-1

    def evaluate(i):
        if i in val_top1:
            return
        init = solutions[min(solutions, key=lambda j: abs(j - i))] if solutions else None
        solutions[i] = fit_logistic(
            fit_x, fit_y, C_GRID[i], num_classes=num_classes, init=init, max_iter=max_iter, tol=tol
        )
        val_top1[i] = accuracy(*solutions[i], val_x, val_y)

    def best(indices):  # highest val top-1, then the smallest C
        return min(indices, key=lambda i: (-val_top1[i], i))

    coarse = list(range(0, len(C_GRID), COARSE_STRIDE))
    for i in coarse:
        evaluate(i)
    peak, span = best(coarse), COARSE_STRIDE // 2
    while span >= 1:
        candidates = sorted({max(peak - span, 0), peak, min(peak + span, len(C_GRID) - 1)})
        for i in candidates:
            evaluate(i)
        peak, span = best(candidates), span // 2
    return peak, solutions[peak], val_top1


def _concatenate(a, b):
    """Rows of a then b, on the device if either is there already."""
    if isinstance(a, jax.Array) or isinstance(b, jax.Array):
        return jnp.concatenate([jnp.asarray(a), jnp.asarray(b)])
    return np.concatenate([np.asarray(a), np.asarray(b)])


def sweep_and_evaluate(
    train_x: np.ndarray | jax.Array,
    train_y: np.ndarray | jax.Array,
    test_x: np.ndarray | jax.Array,
    test_y: np.ndarray | jax.Array,
    *,
    num_classes: int,
    val_fraction: float | None = None,
    seed: int = 0,
    val_x: np.ndarray | jax.Array | None = None,
    val_y: np.ndarray | jax.Array | None = None,
    max_iter: int = MAX_ITER,
    tol: float = TOL,
) -> dict:
    """CLIP's linear-probe protocol: pick C on validation, refit on train + val, score on test.

    The search (Radford et al. 2021, A.3) fits the 7 values C = 1e-6, 1e-4, ..., 1e6, then
    around the best index p of `C_GRID` fits p ± 8, p ± 4, p ± 2, p ± 1 steps (clipped to the
    grid), moving p to the best of {p - s, p, p + s} each round: 15 fits at most, each
    warm-started from the nearest C already fitted (as with scikit-learn's warm_start, a fit at
    large C, where the scaled objective is flat, may stop within `tol` near its warm start).
    Ties in validation top-1 go to the smaller C (the stronger regulariser, the simpler model).
    The refit on train + val starts from the chosen C's fit.

    Args:
      train_x: [n, dim] features; train_y: [n] int labels.
      test_x: [m, dim]; test_y: [m].
      num_classes: number of classes.
      val_fraction: fraction of each class held out of train for validation (stratified by
        label, floor per class), when no validation split is given.
      seed: seed of that hold-out.
      val_x, val_y: a separate validation split, [v, dim] and [v]; used instead of a hold-out.
      max_iter, tol: passed to `fit_logistic`.
    Returns:
      {"top1": test top-1 of the refit, "C": the chosen C, "val_top1": its validation top-1,
       "sweep": {C: validation top-1} for every C fitted, by increasing C}.
    """
    if val_x is None:
        if val_fraction is None:
            raise ValueError("sweep_and_evaluate: give val_x/val_y or a val_fraction")
        fit_idx, val_idx = _holdout_split(np.asarray(train_y), val_fraction, seed)
        fit_x, fit_y = train_x[fit_idx], train_y[fit_idx]
        val_x, val_y = train_x[val_idx], train_y[val_idx]
    else:
        fit_x, fit_y = train_x, train_y
    peak, init, val_top1 = _search_c(fit_x, fit_y, val_x, val_y, num_classes, max_iter, tol)
    W, b = fit_logistic(
        _concatenate(fit_x, val_x),
        _concatenate(fit_y, val_y),
        C_GRID[peak],
        num_classes=num_classes,
        init=init,
        max_iter=max_iter,
        tol=tol,
    )
    return {
        "top1": accuracy(W, b, test_x, test_y),
        "C": float(C_GRID[peak]),
        "val_top1": val_top1[peak],
        "sweep": {float(C_GRID[i]): val_top1[i] for i in sorted(val_top1)},
    }


class LinearProbe(FeatureProbe):
    """CLIP's linear probe (`sweep_and_evaluate`) on frozen image features: C chosen on
    `val_source`, or on a `val_fraction` of `train_source` held out with `seed`."""

    KEYS: ClassVar[dict[str, Key]] = {
        **FeatureProbe.KEYS,
        "val_source": Key("", "the split choosing C ('': held out from train_source)", STRING),
        "val_fraction": Key(
            0.2,
            "share of train_source held out to choose C",
            Rule(lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)"),
        ),
        "seed": Key(0, "seeds the held-out split", INT),
    }
    TASK = "linear_probe"

    def evaluate(self, variables, model_id, cache_root) -> dict:
        (train_x, train_y), val, (test_x, test_y) = self.probe_data(variables, model_id, cache_root)
        if jax.process_index() != 0:  # the fit runs once; its result is broadcast
            return {}
        result = sweep_and_evaluate(
            train_x,
            train_y,
            test_x,
            test_y,
            val_fraction=self.cfg["val_fraction"],
            seed=self.cfg["seed"],
            num_classes=self.num_classes(train_y, test_y),
            **({"val_x": val[0], "val_y": val[1]} if val is not None else {}),
        )
        return {"top1": result["top1"], "C": result["C"], "val_top1": result["val_top1"]}
