"""Zero-shot classifiers and metrics: `build_classifier` equals open_clip's
`build_zero_shot_classifier` on the same weights (skipped without torch / open_clip) and a numpy
prompt ensemble on a tiny model; `classification_metrics` equals a float64 reference.

The class names are awkward on purpose (punctuation, accents, digits, odd whitespace, one name past
the 77-token context so that truncation keeps the end token), and the prompts are batched unevenly.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_jax
from clip_jax.evals import extract, zeroshot
from clip_jax.parallel import sharding

LONG_NAME = " ".join(["the", "very", "long", "and", "winding", "road"] * 20)  # 120 words
CLASSNAMES = [
    "great white shark",
    "jack-o'-lantern",
    "Black & Tan Coonhound",
    "yield sign (traffic)",
    "café au lait",
    "Škoda",
    "crème brûlée",
    "Boeing 747-400",
    "7-Eleven",
    "R2-D2",
    "  sea\tanemone ",
    LONG_NAME,
]
TEMPLATES = [
    "a photo of a {}.",
    "{}",
    "a blurry photo of the {}, taken at night",
    "itap of my {}!",
    "a 3D render of {} — low poly.",
]
MAX_ABS_ERR = 1e-5  # ours vs open_clip
MAX_MESH_ERR = 1e-6  # 8-device vs 1-device mesh


def one_device_mesh():
    return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


# --- parity with open_clip ----------------------------------------------------------------------


def perturbed(model, torch):
    """Every float weight moved off its init (as test_openclip_parity does), so that no mapping
    hides behind ones or zeros."""
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if not t.is_floating_point() or key == "logit_scale":
                continue
            if key.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            else:
                t.add_(torch.randn_like(t) * 0.02)
    return model.eval()


def check_against_open_clip(ref, tmp_path, open_clip, prompts_per_batch):
    """`ref` (an open_clip CLIP) -> safetensors -> load_pretrained; our classifier on the default
    8-device mesh and on 1 device equals open_clip's, and each other."""
    from safetensors.torch import save_file

    path = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    model, variables = clip_jax.load_pretrained(path, quick_gelu=True)
    want = open_clip.build_zero_shot_classifier(
        ref,
        tokenizer=open_clip.get_tokenizer("ViT-B-32-quickgelu"),
        classnames=CLASSNAMES,
        templates=TEMPLATES,
        num_classes_per_batch=5,
        device="cpu",
        use_tqdm=False,
    ).numpy()  # [E, C]
    tokenizer = clip_jax.get_tokenizer("clip_bpe")
    assert len(tokenizer.encode(LONG_NAME)) > tokenizer.context_length
    got = {}
    for name, mesh in (("8 devices", None), ("1 device", one_device_mesh())):
        got[name] = zeroshot.build_classifier(
            model,
            variables,
            tokenizer,
            CLASSNAMES,
            TEMPLATES,
            mesh=mesh,
            prompts_per_batch=prompts_per_batch,
        )
        assert got[name].shape == want.shape == (ref.text_projection.shape[1], len(CLASSNAMES))
        assert got[name].dtype == np.float32
        err = np.abs(got[name] - want).max()
        assert err <= MAX_ABS_ERR, f"{name}: max |ours - open_clip| = {err:.3g}"
    err = np.abs(got["8 devices"] - got["1 device"]).max()
    assert err <= MAX_MESH_ERR, f"max |8 devices - 1 device| = {err:.3g}"


def test_classifier_matches_open_clip_vit_b_32(tmp_path):
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    ref = perturbed(open_clip.create_model("ViT-B-32-quickgelu", pretrained=None), torch)
    # 35 prompts a step -> 7 classes of 5 prompts, then 5 classes: uneven, with padded rows
    check_against_open_clip(ref, tmp_path, open_clip, prompts_per_batch=35)


@pytest.mark.parametrize("ppb", [7, zeroshot.PROMPTS_PER_BATCH])
def test_classifier_matches_open_clip_small(tmp_path, ppb):
    """One class a step (7), and the default (every class in one step padded to 1024 rows), on a
    small text tower with the real vocabulary and context (ViT-B-32's 1024 rows take minutes)."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(1)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=2)
    vision = CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=32)
    ref = perturbed(open_clip.model.CLIP(64, vision, text, quick_gelu=True), torch)
    check_against_open_clip(ref, tmp_path, open_clip, prompts_per_batch=ppb)


# --- always run: a tiny clip_jax model ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """The tiny model with random variables (from shapes: compiling `model.init` takes seconds)."""
    model = clip_jax.create_model("tiny")
    images, tokens = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images, tokens))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        return 1 + 0.1 * noise if path[-1].key == "scale" else 0.1 * noise

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    return model, variables, clip_jax.get_tokenizer("clip_bpe", context_length=16)


@pytest.fixture(scope="module")
def tiny_ensemble(tiny):
    """normalise -> mean over templates -> renormalise, in float64 numpy: [E, C]."""
    model, variables, tokenizer = tiny
    texts = [t.format(c) for c in CLASSNAMES for t in TEMPLATES]
    emb = np.asarray(
        jax.jit(lambda v, t: model.apply(v, t, method="encode_text"))(variables, tokenizer(texts)),
        np.float64,
    )  # [C * T, E]
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    mean = emb.reshape(len(CLASSNAMES), len(TEMPLATES), -1).mean(axis=1)  # [C, E]
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).T


# 1 prompt a step is fewer than the templates (still one class a step); 35 -> 7 classes, then 5
@pytest.mark.parametrize("ppb", [1, 7, 35, zeroshot.PROMPTS_PER_BATCH])
@pytest.mark.parametrize("devices", ["all", "one"])
def test_classifier_is_the_prompt_ensemble(tiny, tiny_ensemble, ppb, devices):
    model, variables, tokenizer = tiny
    mesh = None if devices == "all" else one_device_mesh()
    got = zeroshot.build_classifier(
        model, variables, tokenizer, CLASSNAMES, TEMPLATES, mesh=mesh, prompts_per_batch=ppb
    )
    assert got.shape == tiny_ensemble.shape == (32, len(CLASSNAMES))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, tiny_ensemble, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got.astype(np.float64), axis=0), 1.0, atol=1e-6)


def test_classifier_needs_names_and_templates(tiny):
    model, variables, tokenizer = tiny
    with pytest.raises(ValueError, match="class name"):
        zeroshot.build_classifier(model, variables, tokenizer, [], TEMPLATES)
    with pytest.raises(ValueError, match="template"):
        zeroshot.build_classifier(model, variables, tokenizer, CLASSNAMES, [])


def test_predict_fn_ranks_classes(tiny):
    model, variables, tokenizer = tiny
    classifier = zeroshot.build_classifier(model, variables, tokenizer, CLASSNAMES[:4], TEMPLATES)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    predict_fn = zeroshot.make_predict_fn(model, num_classes=classifier.shape[1])
    top = jax.jit(predict_fn)(variables, {"image": images}, jnp.asarray(classifier))["top"]
    encode = jax.jit(lambda v, x: model.apply(v, extract.normalize(x), method="encode_image"))
    emb = np.asarray(encode(variables, images), np.float64)  # [B, E]
    logits = emb / np.linalg.norm(emb, axis=-1, keepdims=True) @ classifier  # [B, C]
    assert top.shape == (6, 4)  # k = min(5, classes)
    np.testing.assert_array_equal(top, np.argsort(-logits, axis=1))


# --- always run: metrics ------------------------------------------------------------------------


def metrics_reference(top, labels, num_classes):
    """Float64 loops: top-1, top-5, and recall averaged over the classes present in `labels`."""
    hit1 = [int(t[0] == y) for t, y in zip(top, labels, strict=True)]
    hit5 = [int(y in t[:5]) for t, y in zip(top, labels, strict=True)]
    recalls = []
    for c in range(num_classes):
        rows = [h for h, y in zip(hit1, labels, strict=True) if y == c]
        if rows:
            recalls.append(np.mean(rows, dtype=np.float64))
    return {
        "top1": np.mean(hit1, dtype=np.float64),
        "top5": np.mean(hit5, dtype=np.float64),
        "mean_per_class_recall": np.mean(recalls, dtype=np.float64),
    }


def predictions(num_classes, k, n, seed=0, absent=()):
    """Labels (skewed, some classes absent) and the top-k of noisy logits that favour them."""
    rng = np.random.default_rng(seed)
    present = np.setdiff1d(np.arange(num_classes), absent)
    labels = rng.choice(present, size=n, p=rng.dirichlet(np.ones(len(present))))
    logits = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[labels]
    return np.argsort(-logits, axis=1)[:, :k].astype(np.int32), labels.astype(np.int64)


CASES = [
    dict(num_classes=10, k=5, n=200),
    dict(num_classes=10, k=5, n=97, absent=(0, 3, 9)),
    dict(num_classes=37, k=5, n=500, absent=(5,)),
    dict(num_classes=3, k=3, n=50),  # fewer than 5 classes: top-5 is every class
    dict(num_classes=1, k=1, n=5),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"C{c['num_classes']}-n{c['n']}")
def test_metrics_match_reference(case):
    top, labels = predictions(
        case["num_classes"], case["k"], case["n"], absent=case.get("absent", ())
    )
    got = zeroshot.classification_metrics(top, labels, case["num_classes"])
    want = metrics_reference(top, labels, case["num_classes"])
    assert set(got) == set(want)
    for key in want:
        assert isinstance(got[key], float), key
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    if case["num_classes"] <= 5:
        assert got["top5"] == 1.0


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"C{c['num_classes']}-n{c['n']}")
def test_mean_per_class_recall_is_balanced_accuracy(case):
    metrics = pytest.importorskip("sklearn.metrics")
    top, labels = predictions(
        case["num_classes"], case["k"], case["n"], absent=case.get("absent", ())
    )
    got = zeroshot.classification_metrics(top, labels, case["num_classes"])
    # sklearn warns when a prediction is a class absent from the labels; that is the point here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        want = metrics.balanced_accuracy_score(labels, top[:, 0])
    assert got["mean_per_class_recall"] == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("bad", [-1, 10, 11])
def test_metrics_reject_labels_out_of_range(bad):
    top, labels = predictions(10, 5, 20)
    labels[7] = bad
    with pytest.raises(ValueError, match="class names"):
        zeroshot.classification_metrics(top, labels, 10)


def test_metrics_reject_empty():
    with pytest.raises(ValueError, match="no usable example"):
        zeroshot.classification_metrics(np.zeros((0, 5), np.int32), np.zeros((0,), np.int64), 10)
