"""SigLIP's tokenizers: open_clip's `canonicalize` cleaning, and token for token what open_clip's
`SigLipTokenizer` gives (Hugging Face's T5 and Gemma fast tokenizers over the same sentencepiece
model) for each family's padding and end of text; the pooling agreement check for last-token
pooling.

The sentencepiece models are trained here with each family's special ids and normalisation
(T5's: a unigram model, pad 0, EOS "</s>" 1, unk 2; Gemma's: a byte-fallback BPE, pad 0, EOS
"<eos>" 1, BOS 2, unk 3, no dummy prefix, whitespace and text kept as they are).
"""

import os
import random

import numpy as np
import pytest

from clip_jax.data import digits, tokenizers
from clip_jax.infra.errors import UsageError

AWKWARD = [
    "A photo of a CAT!",
    "  the_dog's   house -- on (grass)  ",
    "naïve café, ＦＵＬＬ width &amp; html &lt;b&gt;",
    "don't stop: it's 'quoted' \"twice\"",
    "",
    "   ",
    "tabs\tand\nnewlines\r\n",
    "émojis 🐈‍⬛ and 中文 and العربية",
    "mojibake: âœ” doesnâ€™t",
    "{} kept? a photo of a {}.",
    "under_score__double and a-b-c/d\\e",
    "1,000,000 dollars; 3.14 pi; 50% off!",
    "big " * 40,
]

WORDS = "a photo of the cat dog on grass red blue big small running jumping house car tree sky"


def corpus(tmp_path):
    rng = random.Random(0)
    words = WORDS.split() + ["café", "naïve", "1", "2", "3"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    return str(path)


def t5_like(tmp_path):
    import sentencepiece as spm

    folder = tmp_path / "t5"
    folder.mkdir()
    spm.SentencePieceTrainer.train(
        input=corpus(tmp_path),
        model_prefix=str(folder / "spiece"),
        vocab_size=60,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    return str(folder / "spiece.model")


def gemma_like(tmp_path):
    import sentencepiece as spm

    folder = tmp_path / "gemma"
    folder.mkdir()
    spm.SentencePieceTrainer.train(
        input=corpus(tmp_path),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=300,
        **digits.GEMMA_STYLE,
    )
    return str(folder / "tokenizer.model")


def test_canonicalize_equals_open_clips():
    oc_tokenizer = pytest.importorskip("open_clip.tokenizer")
    for text in AWKWARD:
        assert tokenizers.canonicalize(text) == oc_tokenizer._clean_canonicalize(text), text
        cleaned = oc_tokenizer.basic_clean(text)
        want = oc_tokenizer.canonicalize_text(cleaned, keep_punctuation_exact_string="{}")
        assert tokenizers.canonicalize(text, keep="{}") == want, text


def test_canonicalize_itself():
    assert tokenizers.canonicalize("  A_Photo, of a CAT!  ") == "a photo of a cat"
    assert tokenizers.canonicalize("a {} of {x}.", keep="{}") == "a {} of x"


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_tokens_equal_open_clips_siglip_tokenizer(tmp_path, family):
    """open_clip's `SigLipTokenizer.__call__` over the Hugging Face tokenizer it builds for the
    family (T5TokenizerFast with extra_ids=0; GemmaTokenizerFast without BOS, with EOS, padded
    right; pad 1 and 0, EOS 1), loaded from the same sentencepiece model."""
    oc_tokenizer = pytest.importorskip("open_clip.tokenizer")
    transformers = pytest.importorskip("transformers")
    path = t5_like(tmp_path) if family == "siglip" else gemma_like(tmp_path)
    if family == "siglip":
        hf = transformers.T5TokenizerFast.from_pretrained(
            os.path.dirname(path), extra_ids=0, legacy=False
        )
    else:
        hf = transformers.GemmaTokenizerFast.from_pretrained(
            os.path.dirname(path),
            padding_side="right",
            add_bos_token=False,
            add_eos_token=True,
            legacy=False,
        )
    hf.pad_token_id = 0 if family == "siglip2" else 1
    hf.eos_token_id = 1
    ref = object.__new__(oc_tokenizer.SigLipTokenizer)  # its __init__ downloads; set its fields
    ref.tokenizer, ref.context_length = hf, 16
    ours = tokenizers.get_tokenizer(f"{family}:{path}", 16)
    want = ref(AWKWARD).numpy()
    got = ours(AWKWARD)
    np.testing.assert_array_equal(got, want)
    long = got[AWKWARD.index("big " * 40)]  # fills the context: truncated, EOS kept last
    assert long[-1] == 1 and long[-2] != ours.pad_token_id
    assert ours.pad_token_id == (1 if family == "siglip" else 0)


def test_padding_truncation_and_end_of_text(tmp_path):
    tok = tokenizers.get_tokenizer(f"siglip2:{gemma_like(tmp_path)}", 8)
    short, full, empty = tok(["a cat", "big " * 20, ""])
    assert (
        short[len(tok.sp.encode("a cat"))] == 1
        and not short[len(tok.sp.encode("a cat")) + 1 :].any()
    )
    assert full[-1] == 1 and (full[:-1] != 0).all()
    assert empty[0] == 1 and not empty[1:].any()
    assert tokenizers.get_tokenizer(f"siglip2:{tok.model_path}").context_length == 64


def test_a_model_whose_eos_is_not_1_is_refused(tmp_path):
    path = tokenizers.train_sentencepiece(corpus(tmp_path), 40, str(tmp_path / "own.model"))
    with pytest.raises(UsageError, match="end-of-sequence id is 3"):
        tokenizers.get_tokenizer(f"siglip:{path}")


def test_pooling_check_knows_last_token_pooling(tmp_path):
    siglip = tokenizers.get_tokenizer(f"siglip:{t5_like(tmp_path)}", 16)
    assert tokenizers.text_pooling(siglip) == {"pool_type": "last", "eot_token_id": None}
    tokenizers.check_pooling(siglip, {"pool_type": "last", "eot_token_id": None}, "siglip")
    with pytest.raises(UsageError, match="pools at the highest token id"):
        tokenizers.check_pooling(siglip, {"pool_type": "argmax", "eot_token_id": None}, "siglip")
    bpe = tokenizers.get_tokenizer("clip_bpe", 16)
    with pytest.raises(UsageError, match="pools at the last position"):
        tokenizers.check_pooling(bpe, {"pool_type": "last", "eot_token_id": None}, "clip_bpe")
