"""The text tower pools where the tokenizer ends a caption: checked against the tokenizer when
training starts and when a model is evaluated, saved with the run, kept through export and
import."""

import io
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import clip_jax
from clip_jax.data import prepare, tokenizers
from clip_jax.evals import registry
from clip_jax.inference import jobs, load
from clip_jax.infra.errors import UsageError
from clip_jax.training import runs
from clip_jax.training import trainer as train
from tests.conftest import tiny_config

CAPTIONS = [
    f"a {c} {s} on a {b} ground"
    for c in ("red", "green", "blue", "white")
    for s in ("circle", "square", "star", "line")
    for b in ("dark", "light")
]


@pytest.fixture(scope="module")
def sentencepiece_run(tmp_path_factory):
    """A few tiny steps on captioned shards, tokenized by a sentencepiece model."""
    root = tmp_path_factory.mktemp("sp")
    text = root / "captions.txt"
    text.write_text("\n".join(CAPTIONS * 4) + "\n")
    model = tokenizers.train_sentencepiece(str(text), 28, str(root / "sp.model"))
    rng = np.random.default_rng(0)
    with prepare.ShardWriter(str(root), "part", shard_size=32) as writer:
        for i in range(64):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            data = io.BytesIO()
            Image.fromarray(pixels).save(data, "JPEG")
            writer.write(prepare.make_example(data.getvalue(), CAPTIONS[i % len(CAPTIONS)], str(i)))
    config = tiny_config(
        **{
            "total_steps": 3,
            "train_data.source": f"tfrecord:{root}/part-*.tfrecord",
            "train_data.tokenizer": model,
            "model.text.pool_type": "eot",
            "model.text.eot_token_id": tokenizers.get_tokenizer(model, 16).eot_token_id,
        }
    )
    workdir = str(root / "run")
    train.run(config, workdir)
    return config, workdir, model


def test_a_sentencepiece_run_pools_at_its_end_token(sentencepiece_run):
    config, workdir, model_path = sentencepiece_run
    sp = tokenizers.get_tokenizer(model_path, 16)
    assert sp.eot_token_id != sp.vocab_size - 1  # the highest id would pool elsewhere
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)["model"]["text"]
    assert (saved["pool_type"], saved["eot_token_id"]) == ("eot", sp.eot_token_id)

    model, variables, _ = runs.load_run(workdir)
    tokens = sp.tokenize(CAPTIONS[:6])
    pooled = model.bind(variables).text_tower.pool_index(jax.numpy.asarray(tokens))
    np.testing.assert_array_equal(pooled, [list(row).index(sp.eot_token_id) for row in tokens])
    assert (np.asarray(pooled) != tokens.argmax(-1)).any()

    # Only the tokens up to the end token shape the embedding (the tower is causal).
    after = tokens.copy()
    for row, end in zip(after, np.asarray(pooled), strict=True):
        row[end + 1 :] = 5
    encode = jax.jit(lambda v, t: model.apply(v, t, method="encode_text"))
    np.testing.assert_allclose(encode(variables, after), encode(variables, tokens), atol=1e-6)


def test_export_and_import_keep_the_pooling(sentencepiece_run, tmp_path):
    _, workdir, model_path = sentencepiece_run
    sp = tokenizers.get_tokenizer(model_path, 16)
    model, _ = clip_jax.load_pretrained(workdir)
    assert model.text["pool_type"] == "eot" and model.text["eot_token_id"] == sp.eot_token_id
    subject = jobs.prepare(None, workdir, None, None)
    assert subject.tokenizer.eot_token_id == sp.eot_token_id


def test_a_pooling_that_misses_the_end_token_is_refused(sentencepiece_run, tmp_path):
    config, _, model_path = sentencepiece_run
    wrong = tiny_config(
        **{
            "train_data.source": config.train_data.source,
            "train_data.tokenizer": model_path,
        }
    )
    assert wrong.model.text.pool_type == "argmax"  # the default, the CLIP BPE's
    with pytest.raises(UsageError, match=r"ends each caption with token 3 .*pool_type='eot'"):
        train.run(wrong, str(tmp_path / "argmax"))
    wrong.model.text.pool_type = "eot"
    wrong.model.text.eot_token_id = 2
    with pytest.raises(UsageError, match="pools at the first token 2"):
        train.run(wrong, str(tmp_path / "eot2"))


def test_evaluating_a_model_with_another_tokenizer_is_refused(sentencepiece_run, tmp_path):
    _, workdir, model_path = sentencepiece_run
    model, _ = clip_jax.load_pretrained(workdir)
    tokenizers.check_pooling(tokenizers.get_tokenizer(model_path, 16), model.text, "sp")
    with pytest.raises(UsageError, match=r"clip_bpe ends each caption with token 49407"):
        tokenizers.check_pooling(tokenizers.get_tokenizer("clip_bpe", 16), model.text, "clip_bpe")

    # A weight file exported from the run, evaluated with the default tokenizer (the CLIP BPE):
    # the evals that embed text refuse it; a linear probe, which embeds none, takes it.
    exported = str(tmp_path / "sp.safetensors")
    load.export_run(workdir, exported)
    subject = jobs.prepare(None, None, None, exported)
    assert subject.tokenizer.eot_token_id == 49407
    entry = {"type": "zeroshot", "source": "digits:test"}
    with pytest.raises(UsageError, match="but the text tower pools at the first token 3: evaluate"):
        registry.make_evaluator(
            "zs", entry, subject.model, subject.tokenizer, subject.mesh, subject.rules
        )


def test_synthetic_data_runs_any_pooling(sentencepiece_run, tmp_path):
    """Smoke runs (`configs/X.py:smoke`) train on synthetic ids, which no tokenizer made."""
    config, _, _ = sentencepiece_run
    smoke = tiny_config(
        **{
            "total_steps": 2,
            "train_data.source": "synthetic",
            "train_data.tokenizer": config.train_data.tokenizer,
            "model.text.pool_type": "eot",
            "model.text.eot_token_id": config.model.text.eot_token_id,
        }
    )
    assert train.run(smoke, str(tmp_path / "smoke"))["loss"] > 0


def test_the_clip_bpe_pools_at_the_highest_id():
    bpe = tokenizers.get_tokenizer("clip_bpe", 16)
    assert tokenizers.text_pooling(bpe) == {"pool_type": "argmax", "eot_token_id": None}
    tokenizers.check_pooling(bpe, {"pool_type": "argmax", "eot_token_id": None}, "clip_bpe")
    tokenizers.check_pooling(bpe, {"pool_type": "eot", "eot_token_id": 49407}, "clip_bpe")
