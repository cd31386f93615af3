"""Checkpoint import/export: parity with open_clip, exact round trips, architecture inference."""

import json

import jax
import numpy as np
import pytest

from clip_jax import convert
from clip_jax.inference import load
from clip_jax.infra.errors import UsageError
from clip_jax.models import model_config
from clip_jax.weights import files as weight_files
from clip_jax.weights import state_dicts


def init_variables(cfg, seed=0):
    """Random float32 values in the model's variable shapes (no compilation, no zeros)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), state_dicts.abstract_variables(cfg)
    )


def randomize_batch_stats(variables, seed=1):
    """Non-trivial running statistics, so that their mapping is tested too."""
    if "batch_stats" not in variables:
        return variables
    rng = np.random.default_rng(seed)
    stats = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            rng.uniform(0.5, 1.5, x.shape) if path[-1].key == "var" else rng.normal(0, 0.1, x.shape)
        ).astype(np.float32),
        variables["batch_stats"],
    )
    return {**variables, "batch_stats": stats}


def assert_trees_equal(a, b):
    flat_a, flat_b = (
        jax.tree_util.tree_flatten_with_path(a)[0],
        jax.tree_util.tree_flatten_with_path(b)[0],
    )
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
@pytest.mark.parametrize("ext", [".safetensors", ".npz"])
def test_export_import_round_trip_is_bit_exact(tmp_path, name, ext):
    cfg = model_config(name)
    variables = randomize_batch_stats(init_variables(cfg))
    path = str(tmp_path / f"model{ext}")
    load.save_pretrained(path, variables, cfg)
    model, loaded = load.load_pretrained(path)
    assert_trees_equal(variables, loaded)
    # And the file itself: import then export reproduces every tensor bit for bit.
    sd, _ = weight_files.read_state_dict(path)
    again = state_dicts.to_state_dict(loaded, cfg)
    assert sorted(sd) == sorted(again)
    for key in sd:
        np.testing.assert_array_equal(sd[key], again[key], err_msg=key)
    assert model.vision["image_size"] == cfg["vision"]["image_size"]


@pytest.mark.parametrize(
    "name", ["RN50", "RN101", "RN50x4", "ViT-B-32", "ViT-B-16", "ViT-L-14-336"]
)
def test_infer_config_from_shapes(name):
    cfg = model_config(name)
    shapes = state_dicts.to_state_dict(
        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state_dicts.abstract_variables(cfg)), cfg
    )
    inferred = state_dicts.infer_config(shapes)
    assert inferred["embed_dim"] == cfg["embed_dim"]
    for tower in ("vision", "text"):
        for key, value in cfg[tower].items():
            assert inferred[tower][key] == value, (tower, key)


def test_load_pretrained_overrides_and_errors(tmp_path):
    cfg = model_config("tiny")
    variables = init_variables(cfg)
    path = str(tmp_path / "m.safetensors")
    load.save_pretrained(path, variables, cfg)
    model, _ = load.load_pretrained(path, dtype="bfloat16", text=dict(pool_type="argmax"))
    assert model.dtype == "bfloat16" and model.text["heads"] == 2
    with pytest.raises(ValueError, match="unknown model override"):
        load.load_pretrained(path, colour="blue")
    with pytest.raises(UsageError, match="no checkpoint at"):
        load.load_pretrained(str(tmp_path / "absent.safetensors"))
    (tmp_path / "m.txt").write_text("")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load.load_pretrained(str(tmp_path / "m.txt"))


def test_mismatched_checkpoint_names_the_tensors(tmp_path):
    cfg = model_config("tiny")
    sd = state_dicts.to_state_dict(init_variables(cfg), cfg)
    del sd["ln_final.weight"]
    sd["visual.extra"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="missing ln_final.weight"):
        state_dicts.from_state_dict(sd, cfg)
    sd["ln_final.weight"] = np.zeros(32, np.float32)
    with pytest.raises(ValueError, match="unused tensors: visual.extra"):
        state_dicts.from_state_dict(sd, cfg)


def test_openai_layout_without_metadata_defaults_to_quick_gelu(tmp_path):
    from safetensors.numpy import save_file

    cfg = model_config("ViT-B-32")
    cfg["vision"] = {**cfg["vision"], "layers": 1}
    cfg["text"] = {**cfg["text"], "layers": 1}
    sd = state_dicts.to_state_dict(init_variables(cfg), cfg)
    save_file(sd, str(tmp_path / "openai.safetensors"))
    model, _ = load.load_pretrained(str(tmp_path / "openai.safetensors"))
    assert model.quick_gelu and model.vision["patch_size"] == 32 and model.text["layers"] == 1
    model, _ = load.load_pretrained(str(tmp_path / "openai.safetensors"), quick_gelu=False)
    assert not model.quick_gelu


def test_export_errors_are_one_line(tmp_path, capsys):
    assert convert.main(["export", "--workdir", str(tmp_path), "--out", "x.safetensors"]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert convert.main(["--workdir", str(tmp_path), "--out", "x.safetensors"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: the command is export, not nothing: "
        "python -m clip_jax.convert export --workdir=DIR --out=FILE"
    )


def test_metadata_is_json_config(tmp_path):
    from safetensors import safe_open

    cfg = model_config("tiny-rn", dtype="bfloat16")
    load.save_pretrained(str(tmp_path / "m.safetensors"), init_variables(cfg), cfg)
    with safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as f:
        stored = json.loads(f.metadata()[weight_files.CONFIG_KEY])
    assert stored["vision"]["layers"] == [1, 1, 1, 1] and stored["dtype"] == "bfloat16"
