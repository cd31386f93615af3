"""Hardening of weight import (issue 11): tensors whose shape is wrong but whose size is right are
refused, not scrambled; PyTorch files are read without running their code; broken files are one
clear error line."""

import jax
import numpy as np
import pytest

from clip_jax import convert
from clip_jax.errors import UsageError
from clip_jax.models import model_config


def tiny_state_dict(name="tiny"):
    cfg = model_config(name)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), convert.abstract_variables(cfg)
    )
    return convert.to_state_dict(variables, cfg), cfg


# ---------------------------------------------------------------------------------------------
# Item 9: shapes, not element counts


@pytest.mark.parametrize(
    "key, stored",
    [
        ("transformer.resblocks.0.mlp.c_fc.weight", lambda w: w.T),  # [in, out], not [out, in]
        ("visual.conv1.weight", lambda w: np.transpose(w, (2, 3, 1, 0))),  # HWIO instead of OIHW
        ("visual.positional_embedding", lambda w: w.reshape(w.shape[1], w.shape[0])),
    ],
)
def test_a_tensor_of_the_right_size_but_the_wrong_shape_is_refused(key, stored):
    sd, cfg = tiny_state_dict()
    want = sd[key].shape
    sd[key] = np.ascontiguousarray(stored(sd[key]))
    assert sd[key].size == np.prod(want) and sd[key].shape != want
    with pytest.raises(UsageError) as e:
        convert.from_state_dict(sd, cfg)
    message = str(e.value)
    assert "\n" not in message
    assert f"{key} has shape {sd[key].shape}, the model needs {want}" in message


def test_the_expected_shapes_are_what_export_writes_and_size_one_axes_may_differ():
    for name in ("tiny", "tiny-rn"):
        sd, cfg = tiny_state_dict(name)
        convert.from_state_dict(sd, cfg)  # every exported shape is accepted as it is
    sd, cfg = tiny_state_dict()
    sd["logit_scale"] = sd["logit_scale"].reshape(1)  # [] vs [1]: the same values in order
    sd["visual.class_embedding"] = sd["visual.class_embedding"][None]
    variables = convert.from_state_dict(sd, cfg)
    np.testing.assert_array_equal(variables["params"]["logit_scale"].reshape(1), sd["logit_scale"])
