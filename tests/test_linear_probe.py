"""Linear-probe and few-shot maths: against scikit-learn's LogisticRegression and float64 numpy.

Run with `-s` to see fit_logistic's timings next to scikit-learn's on digits.
"""

import time

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from clip_jax.evals import fewshot, linear_probe

CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(y))
    train, test = perm[:1400], perm[1400:]
    return x[train], y[train], x[test], y[test]


def _objective64(W, b, x, y, C):
    """scikit-learn's objective C·Σ CE + ½||W||², in float64."""
    W, b, x = (np.asarray(a, np.float64) for a in (W, b, x))
    z = x @ W + b
    z -= z.max(axis=1, keepdims=True)
    ce = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]
    return C * ce.sum() + 0.5 * np.sum(W**2)


def _predict(W, b, x):
    return np.argmax(np.asarray(x) @ np.asarray(W) + np.asarray(b), axis=1)


def _sklearn_fit(x, y, C):
    start = time.perf_counter()
    ref = LogisticRegression(C=C, solver="lbfgs", max_iter=10000, tol=1e-8).fit(x, y)
    return ref, time.perf_counter() - start


@pytest.mark.parametrize("C", CS)
def test_fit_logistic_reaches_sklearn_objective(digits, C):
    x, y, x_test, _ = digits
    ref, sk_seconds = _sklearn_fit(x, y, C)
    # sklearn stops at tol=1e-8 here; at the default tol=1e-4 both solvers stop up to ~3e-3 above
    # the optimum for C=10 (float32 L-BFGS reaches 1e-8 too), so compare at a tight tol.
    linear_probe.fit_logistic(x, y, C, tol=1e-6)  # compile
    start = time.perf_counter()
    W, b = linear_probe.fit_logistic(x, y, C, tol=1e-6)
    W.block_until_ready()
    seconds = time.perf_counter() - start
    ratio = _objective64(W, b, x, y, C) / _objective64(ref.coef_.T, ref.intercept_, x, y, C)
    agree = np.mean(_predict(W, b, x_test) == ref.predict(x_test))
    W_default, b_default = linear_probe.fit_logistic(x, y, C)
    agree_default = np.mean(_predict(W_default, b_default, x_test) == ref.predict(x_test))
    print(
        f"\nC={C:g}: objective ratio {ratio:.7f}, test agreement {agree:.4f} "
        f"(default tol {agree_default:.4f}), fit_logistic {seconds * 1e3:.1f} ms, "
        f"sklearn {sk_seconds * 1e3:.1f} ms ({ref.n_iter_[0]} iterations)"
    )
    assert W.shape == (64, 10) and b.shape == (10,)
    assert W.dtype == np.float32
    assert ratio <= 1 + 1e-4
    assert agree >= 0.99
    assert agree_default >= 0.99


@pytest.mark.parametrize("seed", [3, 5])
def test_fit_logistic_reaches_the_optimum_at_the_smallest_c(seed):
    # Separated features of 10 near-balanced classes at C=1e-6, the grid's first point: the
    # penalty's curvature 1/(C·n) is ~800 times the bias's, and float32 L-BFGS on W itself
    # stalled with the bias at its start, 2.6e-4 above the optimum: a nearest-mean classifier
    # where the optimum predicts the largest class (the demo's C sweep chose it: top-1 0.07).
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(10, 32))
    means *= 5.5 / np.linalg.norm(means, axis=1, keepdims=True)
    counts = np.array([126, 118, 120, 121, 125, 119, 122, 116, 111, 119])
    y = rng.permutation(np.repeat(np.arange(10), counts))
    x = (means[y] + 0.8 * rng.normal(size=(len(y), 32))).astype(np.float32)
    ref, _ = _sklearn_fit(x, y, 1e-6)
    W, b = linear_probe.fit_logistic(x, y, 1e-6)
    ratio = _objective64(W, b, x, y, 1e-6) / _objective64(ref.coef_.T, ref.intercept_, x, y, 1e-6)
    assert ratio <= 1 + 1e-5, ratio
    assert np.mean(_predict(W, b, x) == ref.predict(x)) >= 0.99


def test_fit_logistic_class_missing_from_train(digits):
    x, y, x_test, _ = digits
    keep = y != 3
    x, y = x[keep], y[keep]
    ref, _ = _sklearn_fit(x, y, 1.0)
    W, b = linear_probe.fit_logistic(x, y, 1.0, num_classes=10, tol=1e-6)
    assert W.shape == (64, 10) and np.all(np.isfinite(W)) and np.all(np.isfinite(b))
    pred = _predict(W, b, x_test)
    assert not np.any(pred == 3)
    assert np.mean(pred == ref.predict(x_test)) >= 0.99
    # The absent class's column only adds (near-zero) mass: the 9-class optimum is reached.
    ours = _objective64(W, b, x, y, 1.0)
    present = [c for c in range(10) if c != 3]
    theirs = _objective64(ref.coef_.T, ref.intercept_, x, np.searchsorted(present, y), 1.0)
    assert ours <= theirs * (1 + 1e-3)


def test_fit_logistic_warm_start_reaches_same_optimum(digits):
    x, y, x_test, _ = digits
    cold = linear_probe.fit_logistic(x, y, 1.0, tol=1e-6)
    init = linear_probe.fit_logistic(x, y, 0.1, tol=1e-6)
    warm = linear_probe.fit_logistic(x, y, 1.0, init=init, tol=1e-6)
    cold_obj, warm_obj = (_objective64(*p, x, y, 1.0) for p in (cold, warm))
    assert abs(warm_obj - cold_obj) <= 1e-5 * cold_obj
    assert np.mean(_predict(*cold, x_test) == _predict(*warm, x_test)) >= 0.99


def test_accuracy(digits):
    x, y, _, _ = digits
    W, b = linear_probe.fit_logistic(x, y, 1.0)
    assert linear_probe.accuracy(W, b, x, y) == pytest.approx(np.mean(_predict(W, b, x) == y))


def test_holdout_split_is_stratified_and_disjoint():
    y = np.repeat(np.arange(4), [10, 5, 1, 20])
    fit, val = linear_probe._holdout_split(y, 0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([fit, val])), np.arange(len(y)))
    assert list(np.bincount(y[val], minlength=4)) == [2, 1, 0, 4]
    again, _ = linear_probe._holdout_split(y, 0.2, seed=0)
    assert np.array_equal(fit, again)


def test_sweep_and_evaluate_on_digits(digits):
    x, y, x_test, y_test = digits
    start = time.perf_counter()
    result = linear_probe.sweep_and_evaluate(
        x, y, x_test, y_test, num_classes=10, val_fraction=0.2, seed=0
    )
    print(f"\nsweep_and_evaluate: {time.perf_counter() - start:.1f} s, {result}")
    assert set(result) == {"top1", "C", "val_top1", "sweep"}
    assert result["C"] in linear_probe.C_GRID
    assert result["sweep"][result["C"]] == result["val_top1"]
    coarse = linear_probe.C_GRID[:: linear_probe.COARSE_STRIDE]
    assert set(coarse) <= set(result["sweep"]) and len(result["sweep"]) <= 15
    assert list(result["sweep"]) == sorted(result["sweep"])
    assert result["val_top1"] > 0.9 and result["top1"] > 0.9


def test_sweep_and_evaluate_with_given_validation(digits):
    x, y, x_test, y_test = (jnp.asarray(a) for a in digits)  # already on the device
    result = linear_probe.sweep_and_evaluate(
        x[:1100], y[:1100], x_test, y_test, num_classes=10, val_x=x[1100:], val_y=y[1100:]
    )
    assert result["C"] in linear_probe.C_GRID and result["top1"] > 0.9
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe.sweep_and_evaluate(x, y, x_test, y_test, num_classes=10)


def _ridge64(x, y, l2_reg, num_classes):
    """big_vision's recipe in float64 numpy, always in the primal form."""
    x = np.asarray(x, np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-5
    z = np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=fewshot.BIAS_CONSTANT)
    t = 2.0 * np.eye(num_classes)[y] - 1.0
    w = np.linalg.solve(z.T @ z + l2_reg * np.eye(z.shape[1]), z.T @ t)
    W = w[:-1] / std[:, None]
    return W, fewshot.BIAS_CONSTANT * w[-1] - mean @ W


@pytest.mark.parametrize("n,dim", [(60, 16), (12, 32)])  # both sides of the n >= dim switch
def test_fit_ridge_matches_float64_solve(n, dim):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = rng.integers(0, 5, size=n)
    x_test = rng.normal(size=(50, dim)).astype(np.float32)
    # float32 against float64: the error grows with cond(Gram) ~ (n · BIAS_CONSTANT²) / l2_reg.
    for l2_reg, rtol in ((1.0, 5e-4), (fewshot.L2_REG, 2e-5)):
        W, b = fewshot.fit_ridge(x, y, num_classes=5, l2_reg=l2_reg)
        W64, b64 = _ridge64(x, y, l2_reg, 5)
        scores64 = x_test @ W64 + b64
        np.testing.assert_allclose(np.asarray(W), W64, atol=rtol * np.abs(W64).max())
        scores = x_test @ np.asarray(W) + np.asarray(b)
        np.testing.assert_allclose(scores, scores64, atol=rtol * np.abs(scores64).max())


def test_draw_shots_exactly_k_per_class():
    y = np.repeat(np.arange(5), [30, 30, 3, 30, 0])
    idx = fewshot.draw_shots(y, 10, seed=1, num_classes=5)
    assert len(set(idx)) == len(idx)
    assert list(np.bincount(y[idx], minlength=5)) == [10, 10, 3, 10, 0]
    assert np.array_equal(idx, fewshot.draw_shots(y, 10, seed=1, num_classes=5))
    assert not np.array_equal(idx, fewshot.draw_shots(y, 10, seed=2, num_classes=5))
    # The same seed draws nested sets: the 5-shot set is in the 10-shot one.
    assert set(fewshot.draw_shots(y, 5, seed=1, num_classes=5)) <= set(idx)


def test_fewshot_accuracies_deterministic(digits):
    x, y, x_test, y_test = digits
    first = fewshot.fewshot_accuracies(x, y, x_test, y_test, shots=(1, 5, 10))
    second = fewshot.fewshot_accuracies(x, y, x_test, y_test, shots=(1, 5, 10))
    print(f"\nfew-shot on digits: {first}")
    assert first == second
    assert set(first) == {"1shot", "5shot", "10shot"}
    assert 0.1 < first["1shot"] < first["10shot"] and first["10shot"] > 0.8
    other = fewshot.fewshot_accuracies(x, y, x_test, y_test, shots=(1,), seeds=(3,))
    assert other["1shot"] != first["1shot"]
