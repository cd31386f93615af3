"""Losses equal a float64 numpy reference of the full N×N loss, values and gradients, on every
mesh and chunking; and their memory grows as b·N (gathered) or b·chunk (chunked)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax.parallel import sharding
from clip_jax.tools import hlo
from clip_jax.training import losses

N, D = 48, 16


def reference(name, x, y, s, b):
    """Loss and gradients (x, y, s, b) of the full N×N loss, float64, derived by hand."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    n = x.shape[0]
    dots = x @ y.T
    if name == "softmax":
        logits = s * dots

        def softmax(a, axis):
            e = np.exp(a - a.max(axis=axis, keepdims=True))
            return e / e.sum(axis=axis, keepdims=True)

        def lse(a, axis):
            m = a.max(axis=axis)
            return m + np.log(np.exp(a - np.expand_dims(m, axis)).sum(axis=axis))

        pos = np.diagonal(logits)
        loss = ((lse(logits, 1) - pos).mean() + (lse(logits, 0) - pos).mean()) / 2
        eye = np.eye(n)
        g = ((softmax(logits, 1) - eye) + (softmax(logits, 0) - eye)) / (2 * n)
        db = 0.0
    else:
        logits = s * dots + b
        z = 2 * np.eye(n) - 1
        loss = -np.sum(np.log(1 / (1 + np.exp(-z * logits)))) / n
        g = -z / (1 + np.exp(z * logits)) / n
        db = g.sum()
    return loss, s * g @ y, s * g.T @ x, np.sum(g * dots), db


def embeddings(seed, n=N, d=D):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    y = x + 0.8 * y  # correlated pairs, so the loss is not trivial
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return x.astype(np.float32), y.astype(np.float32)


MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
CASES = [
    ("softmax", 0),
    ("softmax", 16),
    ("softmax", 7),
    ("softmax", 100),
    ("sigmoid", 0),
    ("sigmoid", 5),
]


def check(fn, name, seed=0, scale=14.0, bias=-3.0, place=None):
    x, y = embeddings(seed)
    want = reference(name, x, y, scale, bias)
    args = (jnp.asarray(x), jnp.asarray(y), jnp.float32(scale), jnp.float32(bias))
    if place is not None:
        args = place(args)
    value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(*args)
    np.testing.assert_allclose(value, want[0], rtol=1e-6, atol=1e-5)
    for got, expect in zip(grads, want[1:], strict=True):
        expect = np.asarray(expect)
        tol = 1e-5 * max(1.0, float(np.abs(expect).max()))
        assert float(np.abs(np.asarray(got) - expect).max()) <= tol


@pytest.mark.parametrize("name,chunk", CASES)
def test_unsharded_forms_equal_reference(name, chunk):
    check(losses.make_loss_fn(name, None, chunk_size=chunk), name)


@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_plain_functions_equal_reference(name):
    x, y = embeddings(3)
    want = reference(name, x, y, 10.0, -2.0)[0]
    got = losses.LOSSES[name](jnp.asarray(x), jnp.asarray(y), 10.0, jnp.float32(-2.0))
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name,chunk", CASES)
def test_sharded_forms_equal_reference(shape, name, chunk):
    mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape, strict=True)))
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    rep = NamedSharding(mesh, P())

    def place(args):
        x, y, s, b = args
        return jax.device_put(x, rows), jax.device_put(y, rows), jax.device_put(s, rep), b

    fn = losses.make_loss_fn(name, mesh, sharding.BATCH_AXES, chunk_size=chunk)
    check(fn, name, seed=1, place=place)


@pytest.mark.parametrize("name,chunk", [("softmax", 0), ("softmax", 7), ("sigmoid", 5)])
def test_sharded_values_without_gradients_equal_reference(name, chunk):
    # The value alone takes the loss's own forward, not the one that also computes gradients.
    mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    x, y = embeddings(2)
    fn = jax.jit(losses.make_loss_fn(name, mesh, sharding.BATCH_AXES, chunk_size=chunk))
    got = fn(jax.device_put(x, rows), jax.device_put(y, rows), 12.0, jnp.float32(-1.5))
    np.testing.assert_allclose(got, reference(name, x, y, 12.0, -1.5)[0], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_gradients_follow_the_cotangent_and_the_input_dtype(name):
    mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    x, y = embeddings(4)
    fn = losses.make_loss_fn(name, mesh, sharding.BATCH_AXES)
    xb, yb = (jax.device_put(jnp.asarray(a, jnp.bfloat16), rows) for a in (x, y))
    value, vjp = jax.vjp(fn, xb, yb, jnp.float32(9.0), jnp.float32(-2.0))
    grads = vjp(jnp.float32(3.0))
    assert [g.dtype for g in grads[:2]] == [jnp.bfloat16, jnp.bfloat16]
    want = reference(name, np.asarray(xb, np.float64), np.asarray(yb, np.float64), 9.0, -2.0)
    np.testing.assert_allclose(value, want[0], rtol=1e-5)
    for got, expect in zip(grads, want[1:], strict=True):
        expect = 3.0 * np.asarray(expect)
        tol = 1e-2 * max(1.0, float(np.abs(expect).max()))  # bf16 cotangents: 8 mantissa bits
        assert float(np.abs(np.asarray(got, np.float64) - expect).max()) <= tol


@pytest.mark.parametrize("name,chunk", [("softmax", 0), ("softmax", 16), ("sigmoid", 0)])
def test_the_backward_pass_moves_no_embeddings(name, chunk):
    # Each device gets its rows' gradients from the blocks it holds: the compiled value and
    # gradient gather the [N, D] embeddings (and, softmax, the [N] log-sum-exps) and reduce
    # scalars, and nothing else crosses devices; no reduce-scatter of [b, D] gradients.
    mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    fn = losses.make_loss_fn(name, mesh, sharding.BATCH_AXES, chunk_size=chunk)
    x = jax.ShapeDtypeStruct((N, D), jnp.float32, sharding=rows)
    s = jax.ShapeDtypeStruct((), jnp.float32)
    text = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3))).lower(x, x, s, s).compile()
    moved = {}
    for ins in hlo.instructions(text.as_text()):
        kind = ins.opcode.removesuffix("-start")
        if kind in hlo.KINDS:
            moved.setdefault(kind, []).extend(hlo.arrays(ins.shape))
    gathered = moved.pop("all-gather", [])
    assert gathered.count(("f32", (N, D))) == 2, gathered
    assert gathered.count(("f32", (N,))) == (2 if name == "softmax" else 0), gathered
    assert {dims for _, dims in moved.pop("all-reduce", [])} <= {()}, "only scalars are summed"
    assert not moved, moved


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        losses.make_loss_fn("hinge")
    with pytest.raises(ValueError, match="needs a logit_bias"):
        losses.make_loss_fn("sigmoid")(*map(jnp.asarray, embeddings(0)), 10.0, None)


def temp_bytes(name, n, chunk=0, d=64):
    mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    fn = losses.make_loss_fn(name, mesh, sharding.BATCH_AXES, chunk_size=chunk)
    x = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=rows)
    s = jax.ShapeDtypeStruct((), jnp.float32)
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(x, x, s, s).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_gathered_memory_grows_as_b_times_n():
    t1, t2 = temp_bytes("softmax", 2048), temp_bytes("softmax", 4096)
    # b and N both double: b·N grows 4x (N² would too, so also bound the size itself).
    assert 3.0 <= t2 / t1 <= 5.0, (t1, t2)
    n, b = 4096, 4096 // 8
    assert t2 <= 3 * b * n * 4, t2  # a few [b, N] float32 buffers per device
    assert t2 < n * n * 4 / 2, t2  # far from one full [N, N] float32 matrix


def test_chunked_memory_is_a_quarter_of_gathered_or_less():
    gathered, chunked = temp_bytes("softmax", 8192), temp_bytes("softmax", 8192, chunk=256)
    assert chunked <= gathered / 4, (gathered, chunked)
