"""Every config builds its model (shapes only, no weights) with the published size and recipe."""

import jax
import numpy as np
import pytest

from clip_jax.convert import abstract_variables
from clip_jax.models import CLIP
from tests.conftest import load_config

PUBLISHED_M = {
    "rn50": 102.01,
    "rn101": 119.69,
    "rn50x4": 178.30,
    "b32": 151.28,
    "b16": 149.62,
    "l14": 427.62,
    "l14_336": 427.94,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_config_builds_published_model(name):
    c = load_config(name)
    variables = abstract_variables(c.model.to_dict())
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    assert count / 1e6 == pytest.approx(PUBLISHED_M[name], abs=0.01)
    assert isinstance(CLIP(**c.model), CLIP)  # config keys mirror the module's fields
    assert c.batch_size == 32768
    assert c.optim.weight_decay == 0.2 and c.optim.b1 == 0.9
    resnet = name.startswith("rn")
    assert (c.optim.b2, c.optim.eps) == ((0.999, 1e-8) if resnet else (0.98, 1e-6))
    assert c.model.dtype == "bfloat16"


@pytest.mark.parametrize("name", [*sorted(PUBLISHED_M), "tiny"])
def test_smoke_argument_shrinks_the_run(name):
    c = load_config(name, "smoke")
    assert c.batch_size <= 8 and c.total_steps <= 3
    assert c.model.to_dict() == {**load_config(name).model.to_dict(), "dtype": "float32"}


def test_unknown_argument_is_clear():
    with pytest.raises(ValueError, match="unknown config argument 'huge'"):
        load_config("b16", "huge")
