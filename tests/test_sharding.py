"""The mesh from config, logical rules -> shardings, batch rows per process."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from clip_jax.infra.errors import UsageError
from clip_jax.models import CLIP, model_config
from clip_jax.parallel import sharding
from clip_jax.training import state
from clip_jax.training import trainer as train
from tests.conftest import read_losses, run_processes, run_python, tiny_config


def test_mesh_takes_the_rest_and_rejects_mismatches():
    mesh = sharding.make_mesh(dict(data=-1, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="= 12 devices, but there are 8"):
        sharding.make_mesh(dict(data=3, fsdp=2, tensor=2))
    with pytest.raises(ValueError, match="does not divide 8 devices"):
        sharding.make_mesh(dict(data=-1, fsdp=3, tensor=1))
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh(dict(data=-1, fsdp=-1, tensor=1))


def tiny_param_shardings(mesh, name="tiny"):
    model = CLIP(**model_config(name))
    boxed = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), int))
    )
    return sharding.logical_to_sharding(boxed["params"], mesh, sharding.DEFAULT_RULES)


def test_rules_shard_width_over_fsdp_and_heads_over_tensor():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    shardings = tiny_param_shardings(mesh)
    block = shardings["visual"]["transformer"]["resblocks_0"]
    assert block["attn"]["qkv"]["kernel"].spec == P("fsdp", None, "tensor", None)
    assert block["attn"]["out"]["kernel"].spec == P("tensor", None, "fsdp")
    assert block["mlp"]["c_fc"]["kernel"].spec == P("fsdp", "tensor")
    assert block["ln_1"]["scale"].spec == P(None)
    assert shardings["text_tower"]["token_embedding"]["embedding"].spec == P("tensor", "fsdp")
    assert shardings["logit_scale"].spec == P()


def test_dimensions_the_mesh_does_not_divide_are_replicated(caplog):
    mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
    with caplog.at_level("WARNING"):
        conv = tiny_param_shardings(mesh, "tiny-rn")["visual"]["stem1"]["conv"]["kernel"]
    assert conv.spec == P(None, None, None, None)  # 4 output channels on 8 devices
    said = [r.getMessage() for r in caplog.records if "replicated instead of split" in r.message]
    assert len(said) == 1 and "visual/stem1/conv/kernel (size 4, not over fsdp=8)" in said[0]
    # and the model initialises directly in that layout
    model = CLIP(**model_config("tiny-rn"))
    params_sh = tiny_param_shardings(mesh, "tiny-rn")
    init = jax.jit(
        lambda: nn.unbox(
            model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), int))
        )["params"],
        out_shardings=params_sh,
    )
    params = init()
    assert params["visual"]["stem1"]["conv"]["kernel"].sharding.spec == P(None, None, None, None)
    q_proj = params["visual"]["attnpool"]["q_proj"]["kernel"]
    assert q_proj.sharding.spec == P("fsdp", "tensor", None)


def test_optimizer_state_follows_params():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    params_sh = tiny_param_shardings(mesh)
    abstract = jax.eval_shape(
        lambda: CLIP(**model_config("tiny")).init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), int)
        )
    )
    opt = jax.eval_shape(optax.adamw(1e-3).init, nn.unbox(abstract["params"]))
    opt_sh = sharding.like_params(opt, params_sh, mesh)
    mu = opt_sh[0].mu["visual"]["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"]
    assert mu.spec == P("fsdp", "tensor")
    assert opt_sh[0].count.spec == P()


def test_local_rows_single_process_is_everything():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    np.testing.assert_array_equal(sharding.local_rows(mesh, 16), np.arange(16))
    with pytest.raises(ValueError, match=r"does not divide over the 4 batch shards"):
        sharding.local_rows(mesh, 6)


def _shuffled_results(outputs) -> list[dict]:
    results = []
    for code, out in outputs:
        assert code == 0, out[-3000:]
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line.removeprefix("RESULT ")))
    return results


@pytest.fixture(scope="module")
def one_process_shuffled():
    out = run_python(["-m", "tests.shuffled_devices"], timeout=600)
    return _shuffled_results([(out.returncode, out.stdout + out.stderr)])[0]


def test_a_shuffled_device_order_trains_the_same_on_8_devices(one_process_shuffled):
    got = one_process_shuffled
    assert got["shuffled"]["batch_in_place"] and got["ordered"]["batch_in_place"]
    np.testing.assert_allclose(got["shuffled"]["losses"], got["ordered"]["losses"], atol=1e-6)


def test_a_shuffled_device_order_trains_the_same_on_2_processes(one_process_shuffled):
    results = _shuffled_results(run_processes("tests.shuffled_devices", ["--orders=shuffled"]))
    for got in results:
        assert not got["shuffled"]["rows_contiguous"]  # the layout that used to be refused
        assert got["shuffled"]["batch_in_place"]
        np.testing.assert_allclose(
            got["shuffled"]["losses"], one_process_shuffled["ordered"]["losses"], atol=1e-6
        )


def test_rules_come_from_the_config_and_are_checked():
    rules = dict(sharding.check_rules([list(r) for r in sharding.DEFAULT_RULES]))  # JSON's lists
    assert rules["act_batch"] == ("data", "fsdp") and rules["embed"] == "fsdp"
    with pytest.raises(UsageError, match="maps no mesh axes to act_mlp, mlp"):
        sharding.check_rules([r for r in sharding.DEFAULT_RULES if r[0] not in ("mlp", "act_mlp")])
    with pytest.raises(UsageError, match="is not \\(logical axis, mesh axes\\)"):
        sharding.check_rules([*sharding.DEFAULT_RULES, ("embed", "model")])
    with pytest.raises(UsageError, match="act_batch must map to"):
        sharding.check_rules([*sharding.DEFAULT_RULES[:5], ("act_batch", "data")])


# Tensor parallelism over the width instead of the heads and MLP units, FSDP over the MLP units.
OTHER = {"embed": "tensor", "mlp": "fsdp", "heads": None, "act_mlp": "fsdp", "act_heads": None}
OTHER_RULES = tuple((name, OTHER.get(name, axes)) for name, axes in sharding.DEFAULT_RULES)


def test_the_tiny_model_trains_the_same_under_two_rule_sets(tmp_path):
    losses, layouts = [], []
    for k, rules in enumerate((sharding.DEFAULT_RULES, OTHER_RULES)):
        config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
        config.mesh.rules = rules
        train.run(config, str(tmp_path / str(k)))
        losses.append(read_losses(str(tmp_path / str(k))))
        spec = state.build(config, sharding.make_mesh(config.mesh))
        fc = spec.shardings.params["text_tower"]["transformer"]["resblocks_0"]["mlp"]["c_fc"]
        layouts.append(fc["kernel"].spec)
    assert layouts == [P("fsdp", "tensor"), P("tensor", "fsdp")]
    assert sorted(losses[0]) == sorted(losses[1]) == list(range(1, 7))
    for step, loss in losses[0].items():
        assert abs(losses[1][step] - loss) <= 1e-5, (step, losses[1][step], loss)
