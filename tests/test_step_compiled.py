"""What the train step's speed on a CPU rests on, as compiled (docs/performance.md).

- The update is applied in place: no copy of the parameters or optimizer moments in the step's
  entry computation (a select between the new state and the old made XLA copy all of them).
- Dense layers multiply matrices: a kernel [*in, *out] is used as [prod(in), prod(out)] where its
  layout allows, with the same values and gradients as the einsum it stands for, and not where a
  merged dimension is split over the mesh (the heads of `qkv` under tensor parallelism).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from clip_jax.parallel import fsdp, sharding
from clip_jax.training import state as state_lib
from tests.conftest import tiny_config


def _entry(hlo: str) -> str:
    return re.search(r"\nENTRY .*?\n}", hlo, re.S).group(0)


@pytest.mark.parametrize(
    "devices,mesh", [(1, {}), (8, {"mesh.data": 2, "mesh.fsdp": 4})], ids=["1dev", "fsdp4"]
)
def test_the_update_copies_no_state(devices, mesh):
    config = tiny_config(**mesh)
    spec = state_lib.build(config, sharding.config_mesh(config.mesh, jax.devices()[:devices]))
    hlo = state_lib.lower_train_step(spec, config.batch_size).compile().as_text()
    state_arrays = len(jax.tree.leaves(spec.abstract))
    copies = _entry(hlo).count(" copy(")
    assert copies < 8, f"{copies} copies in the step for {state_arrays} state arrays"


@pytest.mark.parametrize(
    "in_shape,out_shape", [((8,), (3, 2, 4)), ((2, 4), (8,)), ((2, 3, 2), (5,)), ((8,), (6,))]
)
def test_a_dense_product_as_matrices_is_the_einsum(in_shape, out_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, *in_shape)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((*in_shape, *out_shape)), jnp.float32)
    n_in = len(in_shape)
    letters = "abcdefg"
    ins, outs = letters[:n_in], letters[n_in : n_in + len(out_shape)]
    spec = f"xy{ins},{ins}{outs}->xy{outs}"

    def ours(x, k):
        return fsdp.fsdp_dot(x, k, n_in, jnp.float32, None)

    def reference(x, k):
        return jnp.einsum(spec, x, k, precision="highest")

    np.testing.assert_allclose(ours(x, kernel), reference(x, kernel), rtol=1e-5, atol=1e-5)
    dy = jnp.asarray(rng.standard_normal((3, 5, *out_shape)), jnp.float32)
    g_ours = jax.vjp(ours, x, kernel)[1](dy)
    g_ref = jax.vjp(reference, x, kernel)[1](dy)
    for a, b in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_kernel_is_merged_only_where_its_layout_allows():
    def layout(*used):
        return fsdp.KernelLayout(PartitionSpec(*used), PartitionSpec(*used), None)

    assert fsdp._as_matrices(None, 1, 4)
    assert fsdp._as_matrices(layout("fsdp", None, None, None), 1, 4)  # first of its group
    assert fsdp._as_matrices(layout(None, "mlp"), 1, 2)  # 2-D: nothing merged
    assert fsdp._as_matrices(layout("tensor", None, None), 2, 3)  # out: heads lead [H, K]
    assert not fsdp._as_matrices(layout(None, None, "tensor", None), 1, 4)  # qkv's heads
    assert not fsdp._as_matrices(layout(None, "tensor", None), 2, 3)  # head_dim split
