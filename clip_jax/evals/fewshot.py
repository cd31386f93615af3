"""Few-shot linear classifiers in closed form: the cheap probe run during training.

The recipe of big_vision's `evaluators/fewshot_lsr.py` (with `configs/common_fewshot.py`'s
l2_reg = 2^10): per seed, draw k training examples of each class; standardise features with the
mean and std of those examples (std + 1e-5); append a constant feature 100 for the bias, so that
it is all but unregularised; regress onto one-hot targets rescaled to ±1 with ridge penalty
l2_reg; score top-1 on the whole test set. The draw is big_vision's too: with
`np.random.default_rng(seed)`, a permutation of each class's indices in class order, its first k.
A class with fewer than k training examples contributes all it has (one with none still gets a
classifier column, regressed onto -1 everywhere).

The eval type `fewshot` (`FewShot`) runs these probes on frozen image features.
"""

import functools
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.evals.evaluator import FeatureProbe, Key
from clip_jax.evals.linear_probe import accuracy
from clip_jax.infra.rules import POSITIVE_INTS, Rule, is_int, is_seq

HIGHEST = jax.lax.Precision.HIGHEST

L2_REG = 2.0**10  # big_vision/configs/common_fewshot.py
BIAS_CONSTANT = 100.0  # big_vision/evaluators/fewshot_lsr.py


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _fit_ridge(x, y, l2_reg, *, num_classes):
    mean = jnp.mean(x, axis=0)
    std = jnp.std(x, axis=0) + 1e-5
    z = jnp.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)  # [n, dim+1]
    targets = 2.0 * jax.nn.one_hot(y, num_classes) - 1.0  # [n, classes]
    n, dim = z.shape
    # Solve in the smaller of the two spaces: (zᵀz + λI)⁻¹ zᵀt = zᵀ(zzᵀ + λI)⁻¹ t.
    if n >= dim:
        gram = jnp.dot(z.T, z, precision=HIGHEST) + l2_reg * jnp.eye(dim)
        w = jax.scipy.linalg.solve(gram, jnp.dot(z.T, targets, precision=HIGHEST), assume_a="pos")
    else:
        gram = jnp.dot(z, z.T, precision=HIGHEST) + l2_reg * jnp.eye(n)
        w = jnp.dot(z.T, jax.scipy.linalg.solve(gram, targets, assume_a="pos"), precision=HIGHEST)
    # Fold the standardisation and the bias feature into one affine map of the raw features.
    W = w[:-1] / std[:, None]  # [dim, classes]
    b = BIAS_CONSTANT * w[-1] - jnp.dot(mean, W, precision=HIGHEST)  # [classes]
    return W, b


def fit_ridge(
    x: np.ndarray | jax.Array,
    y: np.ndarray | jax.Array,
    *,
    num_classes: int,
    l2_reg: float = L2_REG,
) -> tuple[jax.Array, jax.Array]:
    """big_vision's few-shot classifier: ridge regression of ±1 one-hot targets, closed form.

    Args:
      x: [n, dim] features (standardised here with their own mean and std).
      y: [n] int labels in [0, num_classes).
      num_classes: number of classes.
      l2_reg: ridge penalty λ on the standardised weights (and, weakly, the bias).
    Returns:
      W [dim, classes] and b [classes], float32, acting on raw features: scores = x W + b.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.int32)
    return _fit_ridge(x, y, jnp.float32(l2_reg), num_classes=num_classes)


def draw_shots(y: np.ndarray, shots: int, seed: int, num_classes: int) -> np.ndarray:
    """Indices of `shots` random examples of each class (all of a class's, if it has fewer).

    Args:
      y: [n] int labels.
      shots: examples per class.
      seed: seed of the draw (big_vision's: one permutation per class, in class order).
      num_classes: number of classes.
    Returns:
      [≤ shots · num_classes] indices into y, grouped by class.
    """
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(num_classes)]
    return np.concatenate([idx[:shots] for idx in per_class])


def fewshot_accuracies(
    train_x: np.ndarray | jax.Array,
    train_y: np.ndarray | jax.Array,
    test_x: np.ndarray | jax.Array,
    test_y: np.ndarray | jax.Array,
    *,
    shots: Sequence[int] = (1, 5, 10, 25),
    seeds: Sequence[int] = (0, 1, 2),
    l2_reg: float = L2_REG,
    num_classes: int | None = None,
) -> dict[str, float]:
    """k-shot top-1 of the closed-form ridge classifier, averaged over seeds.

    Args:
      train_x: [n, dim] features to draw the shots from; train_y: [n] int labels.
      test_x: [m, dim] features scored in full; test_y: [m].
      shots: the k to evaluate.
      seeds: one draw per seed for each k; the same seed draws nested sets across k.
      l2_reg: ridge penalty (see `fit_ridge`).
      num_classes: number of classes; default max label + 1 over train and test.
    Returns:
      {"<k>shot": mean test top-1 over seeds} for each k.
    """
    train_x, train_y = np.asarray(train_x), np.asarray(train_y)
    if num_classes is None:
        num_classes = int(max(train_y.max(), np.max(test_y))) + 1
    test_x, test_y = jnp.asarray(test_x, jnp.float32), jnp.asarray(test_y, jnp.int32)
    results = {}
    for k in shots:
        top1 = []
        for seed in seeds:
            idx = draw_shots(train_y, k, seed, num_classes)
            W, b = fit_ridge(train_x[idx], train_y[idx], num_classes=num_classes, l2_reg=l2_reg)
            top1.append(accuracy(W, b, test_x, test_y))
        results[f"{k}shot"] = float(np.mean(top1))
    return results


class FewShot(FeatureProbe):
    """k-shot ridge probes (`fewshot_accuracies`) on frozen image features, for each k of `shots`,
    averaged over `seeds`: metrics `1shot`, `5shot`, ..."""

    KEYS: ClassVar[dict[str, Key]] = {
        **FeatureProbe.KEYS,
        "shots": Key(
            (1, 5, 10, 25),
            "examples per class of each k-shot probe",
            POSITIVE_INTS,
        ),
        "seeds": Key(
            (0, 1, 2),
            "seeds of the k-shot draws, averaged",
            Rule(lambda v: is_seq(v, is_int) and len(v) > 0, "a list of integers"),
        ),
    }
    TASK = "fewshot"

    def evaluate(self, variables, model_id, cache_root) -> dict:
        (train_x, train_y), _, (test_x, test_y) = self.probe_data(variables, model_id, cache_root)
        if jax.process_index() != 0:
            return {}
        return fewshot_accuracies(
            train_x,
            train_y,
            test_x,
            test_y,
            shots=tuple(self.cfg["shots"]),
            seeds=tuple(self.cfg["seeds"]),
            num_classes=self.num_classes(train_y, test_y),
        )
