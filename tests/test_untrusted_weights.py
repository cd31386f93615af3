"""Untrusted weight files: tensors whose shape is wrong but whose size is right are
refused, not scrambled; PyTorch files are read without running their code; broken files are one
clear error line."""

import jax
import numpy as np
import pytest

from clip_jax.inference import load
from clip_jax.infra.errors import UsageError
from clip_jax.models import model_config
from clip_jax.weights import files as weight_files
from clip_jax.weights import state_dicts


def tiny_state_dict(name="tiny"):
    cfg = model_config(name)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), state_dicts.abstract_variables(cfg)
    )
    return state_dicts.to_state_dict(variables, cfg), cfg


# ---------------------------------------------------------------------------------------------
# Shapes, not element counts


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
        state_dicts.from_state_dict(sd, cfg)
    message = str(e.value)
    assert "\n" not in message
    assert f"{key} has shape {sd[key].shape}, the model needs {want}" in message


def test_the_expected_shapes_are_what_export_writes_and_size_one_axes_may_differ():
    for name in ("tiny", "tiny-rn"):
        sd, cfg = tiny_state_dict(name)
        state_dicts.from_state_dict(sd, cfg)  # every exported shape is accepted as it is
    sd, cfg = tiny_state_dict()
    sd["logit_scale"] = sd["logit_scale"].reshape(1)  # [] vs [1]: the same values in order
    sd["visual.class_embedding"] = sd["visual.class_embedding"][None]
    variables = state_dicts.from_state_dict(sd, cfg)
    np.testing.assert_array_equal(variables["params"]["logit_scale"].reshape(1), sd["logit_scale"])


# ---------------------------------------------------------------------------------------------
# PyTorch files are read without running their code

EVIL_SOURCE = '''
import torch


class Evil(torch.nn.Module):
    """A TorchScript module whose __setstate__, run by torch.jit.load, creates a file."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return x * self.weight

    @torch.jit.export
    def __getstate__(self):
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]):
        self.weight = state[0] + torch.from_file("created-by-torchscript", True, 2)
        self.training = state[1]
'''


class Boom:
    """A pickle that runs a shell command when unpickled."""

    def __reduce__(self):
        import os

        return (os.system, ("touch created-by-pickle",))


def small_modules(torch):
    """A module with what a state dict can hold: parameters, a buffer, a tensor attribute that is
    neither, half and int tensors, non-contiguous and offset views, nested and listed submodules."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)
            self.norm = torch.nn.LayerNorm(4)
            self.bn = torch.nn.BatchNorm1d(4)
            self.seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
            self.low = torch.nn.Linear(2, 2).half()
            self.register_buffer("steps", torch.arange(5))
            shared = torch.randn(6, 5)
            self.t = torch.nn.Parameter(shared.t())  # [5, 6], strides (1, 5)
            self.register_buffer("window", shared[2:4, 1:3])  # offset 11, strides (5, 1)
            self.plain = torch.ones(2)  # an attribute, in no state dict

        def forward(self, x):
            return self.seq(self.norm(self.lin(x))) + self.plain.sum()

    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """TorchScript archives (scripted and traced), and three crafted files that run code."""
    torch = pytest.importorskip("torch")
    import importlib
    import pickle
    import sys
    import zipfile

    root = tmp_path_factory.mktemp("archives")
    net = small_modules(torch)
    torch.jit.save(torch.jit.script(net), str(root / "scripted.pt"))
    torch.jit.save(torch.jit.trace(net, torch.randn(2, 3)), str(root / "traced.pt"))

    (root / "evil_module.py").write_text(EVIL_SOURCE)
    sys.path.insert(0, str(root))
    try:
        evil = importlib.import_module("evil_module")
    finally:
        sys.path.remove(str(root))
    torch.jit.save(torch.jit.script(evil.Evil()), str(root / "setstate.pt"))

    # A TorchScript archive (it has constants.pkl) whose data.pkl is a hostile pickle.
    with (
        zipfile.ZipFile(root / "scripted.pt") as src,
        zipfile.ZipFile(root / "pickle.pt", "w") as dst,
    ):
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(
                info,
                pickle.dumps(Boom(), protocol=2) if info.filename.endswith("/data.pkl") else data,
            )
    # An ordinary torch.save file holding the same.
    torch.save({"weight": torch.ones(2), "x": Boom()}, str(root / "state_dict.pt"))
    return root, net


@pytest.mark.parametrize("name", ["scripted.pt", "traced.pt"])
def test_torchscript_archives_are_read_as_data_with_jit_loads_names_and_values(archives, name):
    torch = pytest.importorskip("torch")
    root, _ = archives
    want = torch.jit.load(str(root / name)).state_dict()
    sd, cfg = weight_files.read_state_dict(str(root / name))
    assert cfg is None and list(sd) == list(want)
    for key, value in want.items():
        value = value.float() if value.is_floating_point() else value
        assert sd[key].dtype == value.numpy().dtype, key
        np.testing.assert_array_equal(sd[key], value.numpy(), err_msg=key)
    opted_in, _ = weight_files.read_state_dict(str(root / name), allow_torchscript_code=True)
    assert list(opted_in) == list(sd)


def test_torchscript_needs_no_torch_to_be_read(archives, monkeypatch):
    import sys

    root, _ = archives
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    sd, _ = weight_files.read_state_dict(str(root / "traced.pt"))
    assert "lin.weight" in sd and sd["low.weight"].dtype == np.float32


@pytest.mark.parametrize(
    "name, created, message",
    [
        ("setstate.pt", "created-by-torchscript", "runs its own __setstate__ code"),
        ("pickle.pt", "created-by-pickle", "it needs posix.system, which is not tensor data"),
        ("state_dict.pt", "created-by-pickle", "refused to unpickle it: it needs posix.system"),
    ],
)
def test_files_whose_loading_runs_code_are_refused_and_run_nothing(
    archives, tmp_path, monkeypatch, name, created, message
):
    import clip_jax

    root, _ = archives
    monkeypatch.chdir(tmp_path)  # where the crafted code would create its file
    path = str(root / name)
    for read_fn in (weight_files.read_state_dict, clip_jax.load_pretrained):
        with pytest.raises(UsageError) as e:
            read_fn(path)
        assert message in str(e.value) and path in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / created).exists()
    if name == "setstate.pt":  # the file is truly hostile: the opt-in runs its code
        weight_files.read_state_dict(path, allow_torchscript_code=True)
        assert (tmp_path / created).exists()


def test_damaged_archives_are_refused_with_one_line(archives, tmp_path):
    """Random byte changes in data.pkl and code/: each read succeeds or is one UsageError line,
    never another exception (the file is untrusted input, its damage the user's to fix)."""
    import random
    import zipfile

    root, _ = archives
    with zipfile.ZipFile(root / "scripted.pt") as src:
        entries = {info.filename: src.read(info) for info in src.infolist()}
    targets = sorted(n for n in entries if n.endswith(("/data.pkl", ".py")))
    rng = random.Random(0)
    refused = 0
    for trial in range(300):
        target = rng.choice(targets)
        data = bytearray(entries[target])
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path = tmp_path / f"damaged{trial % 2}.pt"
        with zipfile.ZipFile(path, "w") as dst:
            for name, value in entries.items():
                dst.writestr(name, bytes(data) if name == target else value)
        try:
            weight_files.read_state_dict(str(path))
        except UsageError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            refused += 1
    assert refused > 30


def test_tensors_must_lie_within_their_storage():
    import pickle

    from clip_jax.weights import torch_files

    storage = np.arange(12, dtype=np.float32)
    view = torch_files._rebuild_tensor(storage, 2, (2, 3), (4, 1), False, {})
    np.testing.assert_array_equal(view, [[2, 3, 4], [6, 7, 8]])
    for offset, size, stride in [
        (0, (3, 5), (5, 1)),  # reaches element 14 of 12
        (11, (2,), (1,)),
        (0, (10**6, 10**6), (0, 0)),  # an expanded view: 10^12 elements out of 12
        (0, (2,), (-1,)),
    ]:
        with pytest.raises(pickle.UnpicklingError):
            torch_files._rebuild_tensor(storage, offset, size, stride, False, {})


# ---------------------------------------------------------------------------------------------
# Broken files are one line naming the file and the cause


@pytest.mark.parametrize("keep", [0, 5, 40, 0.5, -1])
def test_a_truncated_safetensors_file_is_one_line(tmp_path, keep):
    cfg = model_config("tiny")
    sd, _ = tiny_state_dict()
    path = tmp_path / "m.safetensors"
    load.save_pretrained(str(path), state_dicts.from_state_dict(sd, cfg), cfg)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    for read_fn in (weight_files.read_state_dict, load.load_pretrained):
        with pytest.raises(UsageError, match="not a readable safetensors file") as e:
            read_fn(str(path))
        assert str(path) in str(e.value) and "truncated" in str(e.value)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["traced.pt", "state_dict.pt"])
def test_a_truncated_pytorch_file_is_one_line(archives, tmp_path, name):
    root, _ = archives
    path = tmp_path / name
    path.write_bytes((root / name).read_bytes()[:300])
    with pytest.raises(UsageError, match="not a readable PyTorch file") as e:
        weight_files.read_state_dict(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UsageError, match="not a PyTorch file"):
        weight_files.read_state_dict(str(path))


def test_a_bad_sentencepiece_model_is_one_line(tmp_path):
    pytest.importorskip("sentencepiece")
    from clip_jax.data import tokenizers

    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00garbage, not a ModelProto")
    folder = tmp_path / "folder.model"
    folder.mkdir()
    for path in (bad, folder):
        with pytest.raises(UsageError, match="not a sentencepiece model") as e:
            tokenizers.get_tokenizer(str(path))
        assert str(path) in str(e.value) and "\n" not in str(e.value)
