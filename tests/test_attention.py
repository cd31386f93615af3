"""Attention of any sequence length: the towers' lengths (a class token and the patches: 50, 197,
257; 77 text positions, causal) padded to cuDNN's multiple and masked give the unpadded result;
on a GPU the cuDNN kernel gives the XLA path's outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models.layers import CUDNN_SEQ_MULTIPLE, attention

LENGTHS = [(50, False), (197, False), (257, False), (77, True), (64, False)]


def _qkv(length: int, dtype=jnp.float32, heads: int = 3, head_dim: int = 16):
    keys = jax.random.split(jax.random.key(length), 3)
    return [jax.random.normal(k, (2, length, heads, head_dim), dtype) for k in keys]


@pytest.mark.parametrize("length,causal", LENGTHS)
def test_padding_to_the_kernels_multiple_and_masking_changes_nothing(length, causal):
    q, k, v = _qkv(length)

    def run(pad_to):
        def f(q, k, v):
            return attention(q, k, v, causal=causal, implementation="xla", pad_to=pad_to)

        grads = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)
        return f(q, k, v), grads

    plain, plain_grads = run(None)
    padded, padded_grads = run(CUDNN_SEQ_MULTIPLE)
    assert padded.shape == (2, length, 3, 16)
    np.testing.assert_allclose(padded, plain, atol=2e-6)
    for a, b in zip(padded_grads, plain_grads, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU (cuDNN)")
@pytest.mark.parametrize("length,causal", LENGTHS)
def test_the_cudnn_kernel_gives_the_xla_outputs(length, causal):
    q, k, v = _qkv(length, jnp.bfloat16, heads=12, head_dim=64)
    gpu = jax.devices("gpu")[0]
    q, k, v = (jax.device_put(a, gpu) for a in (q, k, v))

    def loss(impl):
        return lambda q, k, v: jnp.sum(
            attention(q, k, v, causal=causal, implementation=impl).astype(jnp.float32) ** 2
        )

    xla = jax.jit(lambda q, k, v: attention(q, k, v, causal=causal, implementation="xla"))
    cudnn = jax.jit(lambda q, k, v: attention(q, k, v, causal=causal, implementation="cudnn"))
    np.testing.assert_allclose(
        np.asarray(cudnn(q, k, v), np.float32), np.asarray(xla(q, k, v), np.float32), atol=2e-2
    )
    g_xla = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    g_cudnn = jax.jit(jax.grad(loss("cudnn"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_cudnn, g_xla, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 3e-2 * max(np.abs(b).max(), 1.0)
