"""Tokenizers: the CLIP BPE equals open_clip's token for token; sentencepiece training and use."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest

from clip_jax.data import tokenizers
from clip_jax.infra.errors import UsageError

# Ids from open_clip 3.3's tokenizer (up to and including the end token).
GOLDEN = {
    "a photo of a cat.": [49406, 320, 1125, 539, 320, 2368, 269, 49407],
    "": [49406, 49407],
    "Don't we'll THEY'RE": [49406, 847, 713, 649, 1342, 889, 982, 49407],
    "café naïve 日本語 😀": [49406, 15304, 1097, 35689, 563, 39121, 44353, 34002, 508, 7334, 49407],
    "Fish &amp;amp; chips": [49406, 2759, 261, 8855, 49407],
    "The year 2024, 3.14!": [
        49406,
        518,
        935,
        273,
        271,
        273,
        275,
        267,
        274,
        269,
        272,
        275,
        256,
        49407,
    ],
    "HeLLo   \t World\n": [49406, 3306, 1002, 49407],
}


@pytest.fixture(scope="module")
def bpe():
    return tokenizers.ClipBpeTokenizer()


def test_golden_ids(bpe):
    got = bpe.tokenize(list(GOLDEN))
    assert got.dtype == np.int32 and got.shape == (len(GOLDEN), 77)
    for row, ids in zip(got, GOLDEN.values(), strict=True):
        assert row[: len(ids)].tolist() == ids
        assert not row[len(ids) :].any()
    assert bpe.vocab_size == 49408 and bpe.eot_token_id == 49407 and bpe.sot_token_id == 49406


def test_truncation_keeps_the_end_token(bpe):
    row = bpe.tokenize(" ".join(["horse"] * 100))[0]
    assert row[0] == 49406 and row[-1] == 49407 and (row[1:-1] == 4558).all()
    short = tokenizers.ClipBpeTokenizer(context_length=5).tokenize(["a photo of a cat"])[0]
    assert short.tolist() == [49406, 320, 1125, 539, 49407]


def test_decode_round_trips_plain_text(bpe):
    assert bpe.decode(bpe.tokenize("a photo of a cat.")[0]) == "a photo of a cat ."


def test_plain_ascii_skips_ftfy_and_is_cleaned_the_same():
    import html

    import ftfy

    from clip_jax.data import captions

    rng = random.Random(1)
    plain = [chr(c) for c in range(32, 127)]
    texts = ["".join(rng.choice(plain) for _ in range(rng.randint(0, 80))) for _ in range(3000)]
    texts += ["a & b", "&amp;lt;", "tab\there", "line\r\nbreak", "\x1b[31mred", "del\x7f", " x "]
    for text in texts:
        want = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        assert captions.basic_clean(text) == want, repr(text)


def corpus():
    texts = [
        *GOLDEN,
        "cafÃ© mojibake",
        "“curly” ‘quotes’ ＦＵＬＬＷＩＤＴＨ",
        "e\u0301 combining marks",
        "مرحبا بالعالم",
        "tabs\tand\nnewlines\u00a0nbsp",
        "<start_of_text> literal <end_of_text>",
        "&lt;b&gt;bold&lt;/b&gt;",
        "emoji 👍🏽🎉 and ZWJ 👨‍👩‍👧",
        "numbers 1,000,000 and 0.5%",
        "I'M SHOUTING, aren't I?",
        "   ",
        "a" * 300,
        " ".join(["photo"] * 200),
    ]
    rng = random.Random(0)
    ranges = [
        (32, 126),
        (160, 0x2FF),
        (0x370, 0x3FF),
        (0x4E00, 0x4FFF),
        (0x1F300, 0x1F6FF),
        (0x600, 0x6FF),
        (0x900, 0x97F),
        (0x3040, 0x30FF),
    ]
    for _ in range(250):
        chars = [chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 60))]
        texts.append("".join(c if rng.random() > 0.15 else " " for c in chars))
    return texts


@pytest.mark.parametrize("context_length", [77, 16])
def test_equals_open_clip_on_a_varied_corpus(context_length):
    open_clip = pytest.importorskip("open_clip")
    texts = corpus()
    ours = tokenizers.ClipBpeTokenizer(context_length).tokenize(texts)
    ref = open_clip.get_tokenizer("ViT-B-32")(texts, context_length=context_length).numpy()
    mismatched = [t for t, a, b in zip(texts, ours, ref, strict=True) if (a != b).any()]
    assert not mismatched, mismatched[:5]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    rng = random.Random(0)
    words = ["a", "photo", "of", "the", "dog", "cat", "red", "blue", "car", "on", "beach", "sky"]
    path = tmp_path_factory.mktemp("spm") / "captions.txt"
    path.write_text(
        "\n".join(" ".join(rng.choices(words, k=rng.randint(2, 9))) for _ in range(400))
    )
    out = str(path.parent / "spm.model")
    return tokenizers.train_sentencepiece(str(path), 30, out)


def test_sentencepiece_tokenize(spm_model):
    tok = tokenizers.get_tokenizer(spm_model, context_length=8)
    assert isinstance(tok, tokenizers.SentencePieceTokenizer) and tok.pool_type == "eot"
    ids = tok.tokenize(["a red car", "the dog on the beach under a blue sky " * 3])
    assert ids.dtype == np.int32 and ids.shape == (2, 8)
    assert tok.pad_token_id == 0 and tok.eot_token_id == 3
    n = int((ids[0] != 0).sum())
    assert ids[0, n - 1] == 3 and not ids[0, n:].any()  # EOS last, then padding
    assert ids[1, -1] == 3 and (ids[1] != 0).all()  # truncated, EOS kept


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "clip_jax.data.tokenizers", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))},
    )


def test_cli_trains_and_encodes(tmp_path):
    captions = tmp_path / "c.txt"
    captions.write_text("\n".join(f"a photo of item {i} on a table" for i in range(300)))
    out = tmp_path / "m.model"
    result = run_cli("train", "--input", str(captions), "--vocab_size", "30", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.exists() and "wrote" in result.stdout
    result = run_cli("encode", "--tokenizer", "clip_bpe", "a photo of a cat.")
    assert result.returncode == 0 and "49406 320 1125 539 320 2368 269 49407" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["train", "--input", "/nonexistent.txt", "--vocab_size", "50", "--out", "x.model"],
            "no caption file",
        ),
        (["encode", "--tokenizer", "nope", "hi"], "unknown tokenizer 'nope'"),
    ],
)
def test_cli_errors_are_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr


def test_vocabulary_too_large_is_clear(tmp_path):
    captions = tmp_path / "c.txt"
    captions.write_text("tiny text\n" * 10)
    with pytest.raises(ValueError, match="sentencepiece training failed"):
        tokenizers.train_sentencepiece(str(captions), 5000, str(tmp_path / "m.model"))


def test_get_tokenizer_errors():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tokenizers.get_tokenizer("gpt2")
    with pytest.raises(UsageError, match="no sentencepiece model"):
        tokenizers.get_tokenizer("/missing/spm.model")
