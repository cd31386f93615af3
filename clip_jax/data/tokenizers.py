"""Tokenizers behind one interface: `tokenize(list[str]) -> int32 [B, context_length]`.

- `ClipBpeTokenizer`: OpenAI's byte-level BPE (49,408 tokens), token for token what open_clip's
  tokenizer gives: the same text cleaning (ftfy, HTML unescaping, whitespace, lower case), the same
  pre-tokenising pattern, start and end tokens, zero padding, and truncation that keeps the end
  token last. Its merges file ships in this package.
- `SentencePieceTokenizer`: a sentencepiece model; ids then EOS, truncated so that EOS stays.
- `SigLIPTokenizer`: SigLIP's and SigLIP 2's text pipeline as open_clip runs it: big_vision's
  `canonicalize` cleaning (lower case, punctuation removed), a sentencepiece model given as a
  file (`siglip:PATH`, T5's English 32k or mC4's 250k; `siglip2:PATH`, Gemma's 256k), EOS after
  the ids, padded to the full context, pooled at the last position.

    python -m clip_jax.data.tokenizers train --input captions.txt --vocab_size 8000 --out spm.model
    python -m clip_jax.data.tokenizers encode --tokenizer clip_bpe "a photo of a cat"
"""

import functools
import gzip
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from absl import flags

from clip_jax.data.captions import basic_clean, canonicalize
from clip_jax.infra import cli, hub, paths
from clip_jax.infra.errors import UsageError

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2  # OpenAI's vocabulary: 256 bytes x 2, merges, 2 special tokens
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")


class Tokenizer(Protocol):
    context_length: int
    vocab_size: int
    eot_token_id: int
    pad_token_id: int
    pool_type: str  # how the text tower finds the end token: "argmax", "eot" or "last"

    def tokenize(self, texts: Sequence[str] | str) -> np.ndarray: ...


def text_pooling(tokenizer: Tokenizer) -> dict[str, Any]:
    """The text tower's `pool_type` and `eot_token_id` that find where `tokenizer` ends each
    caption: the highest id for the CLIP BPE (OpenAI's argmax), the last position for SigLIP's
    tokenizers (which pad every caption to the context), else the first end token."""
    if tokenizer.pool_type in ("argmax", "last"):
        return {"pool_type": tokenizer.pool_type, "eot_token_id": None}
    return {"pool_type": "eot", "eot_token_id": int(tokenizer.eot_token_id)}


def check_pooling(
    tokenizer: Tokenizer, text: Mapping[str, Any], tokenizer_name: str, fix: str | None = None
) -> None:
    """A UsageError unless a text tower configured by `text` (`model.text`: `pool_type`,
    `eot_token_id`) pools at the token that ends `tokenizer`'s captions; `fix` is what the error
    tells the user to do (by default: the pooling settings that match the tokenizer)."""
    eot, pool, pool_eot = tokenizer.eot_token_id, text["pool_type"], text.get("eot_token_id")
    pools_at = {
        "last": "the last position",
        "argmax": "the highest token id of each caption",
    }.get(pool, f"the first token {pool_eot}")
    if tokenizer.pool_type == "last" or pool == "last":
        # Only a tokenizer that fills the whole context (SigLIP's) has a fixed last position
        # that sees the caption; a tower pooling there with zero-padded captions reads padding.
        ok = tokenizer.pool_type == pool == "last"
    elif pool == "argmax":
        ok = eot == tokenizer.vocab_size - 1  # the end token outranks every other id
    else:
        ok = pool_eot == eot
    if not ok:
        want = text_pooling(tokenizer)
        fix = fix or (
            f"set model.text.pool_type={want['pool_type']!r} and model.text.eot_token_id="
            f"{want['eot_token_id']!r}"
        )
        raise UsageError(
            f"tokenizer {tokenizer_name} ends each caption with token {eot} (of "
            f"{tokenizer.vocab_size}), but the text tower pools at {pools_at}: {fix}"
        )


def pack(rows: Sequence[Sequence[int]], context_length: int, eot: int, pad: int = 0) -> np.ndarray:
    """Id lists -> int32 [B, context_length]: truncated with `eot` kept last, padded with `pad`."""
    out = np.full((len(rows), context_length), pad, np.int32)
    for i, ids in enumerate(rows):
        ids = list(ids)
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = eot
        out[i, : len(ids)] = ids
    return out


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible map of the 256 byte values to printable unicode characters: printable
    Latin-1 bytes map to themselves, the others to code points from 256 on."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order (printable bytes first) is the vocabulary's order


def clean_text(text: str) -> str:
    """open_clip's 'lower' cleaning: `basic_clean`, whitespace collapsed, lower case."""
    return " ".join(basic_clean(text).split()).lower()


class ClipBpeTokenizer:
    """OpenAI's CLIP BPE; `tokenize` gives [SOT, ids..., EOT, 0, ...] per text."""

    pool_type = "argmax"  # the end token 49407 is the highest id
    pad_token_id = 0

    def __init__(self, context_length: int = 77, merges_path: str | None = None):
        import regex

        self.context_length = context_length
        path = merges_path or BPE_PATH
        if not os.path.exists(path):
            raise UsageError(f"no BPE merges file at {path}")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += list(SPECIAL_TOKENS)
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.vocab_size = len(vocab)
        self.sot_token_id, self.eot_token_id = (self.encoder[t] for t in SPECIAL_TOKENS)
        self._cache = {t: t for t in SPECIAL_TOKENS}  # special tokens pass through whole
        specials = "|".join(SPECIAL_TOKENS)
        self._pattern = regex.compile(
            specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def bpe(self, word: str) -> str:
        """One pre-token (as byte symbols) -> its BPE pieces joined by spaces (cached)."""
        if word in self._cache:
            return self._cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:], strict=False))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = out = " ".join(parts)
        return out

    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids, without start or end tokens."""
        ids = []
        for token in self._pattern.findall(clean_text(text)):
            symbols = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(symbols).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text (for inspection), special tokens and padding dropped."""
        special = {self.sot_token_id, self.eot_token_id, self.pad_token_id}
        text = "".join(self.decoder[int(i)] for i in ids if int(i) not in special)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def tokenize(self, texts: Sequence[str] | str) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else texts
        rows = [[self.sot_token_id, *self.encode(t), self.eot_token_id] for t in texts]
        return pack(rows, self.context_length, self.eot_token_id)

    __call__ = tokenize


class SentencePieceTokenizer:
    """A sentencepiece model: [BOS?] ids EOS, truncated so that EOS stays, padded."""

    pool_type = "eot"

    def __init__(self, model_path: str, context_length: int = 77, add_bos: bool = False):
        import sentencepiece

        model = paths.path(model_path)
        if not model.exists():
            raise UsageError(f"no sentencepiece model at {model_path}")
        try:  # read through the path layer: the model may sit beside a gs:// run
            proto = model.read_bytes()
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except IsADirectoryError:
            raise UsageError(
                f"{model_path}: not a sentencepiece model (a folder); give the .model file that "
                "`python -m clip_jax.data.tokenizers train` (or sentencepiece) wrote"
            ) from None
        except RuntimeError as e:  # sentencepiece's one error type: an unparsable model
            reason = str(e).replace(f" from {model_path}", "")
            raise UsageError(
                f"{model_path}: not a sentencepiece model ({reason}); give the .model file that "
                "`python -m clip_jax.data.tokenizers train` (or sentencepiece) wrote"
            ) from None
        self.context_length, self.add_bos = context_length, add_bos
        self.vocab_size = self.sp.get_piece_size()
        self.eot_token_id = self.sp.eos_id()
        if self.eot_token_id < 0:
            raise UsageError(f"{model_path} has no end-of-sequence id; train it with eos_id >= 0")
        self.pad_token_id = max(self.sp.pad_id(), 0)
        if add_bos and self.sp.bos_id() < 0:
            raise UsageError(f"{model_path} has no beginning-of-sequence id for add_bos")

    def tokenize(self, texts: Sequence[str] | str) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        prefix = [self.sp.bos_id()] if self.add_bos else []
        rows = [[*prefix, *ids, self.eot_token_id] for ids in self.sp.encode(texts)]
        return pack(rows, self.context_length, self.eot_token_id, self.pad_token_id)

    __call__ = tokenize


# SigLIP's tokenizer families: (pad id, what the vocabulary is). EOS is 1 in both; T5's English
# and mC4 vocabularies pad with EOS (open_clip sets pad_token_id=1), Gemma's with its <pad>, 0.
SIGLIP_FAMILIES = {
    "siglip": (1, "T5's English 32k (c4_en) or mC4's 250k sentencepiece model"),
    "siglip2": (0, "Gemma's 256k sentencepiece model"),
}
SIGLIP_EOS = 1


class SigLIPTokenizer:
    """SigLIP's captions as open_clip tokenizes them (its `SigLipTokenizer`, and the Hugging Face
    tokenizers its SigLIP configs name): `canonicalize`d text, the ids (no BOS), EOS (id 1);
    truncated so that EOS stays last; padded to `context_length` with the family's pad id. The
    text tower pools at the last position, which therefore always exists.

    `model` is a sentencepiece model file, or a Hugging Face tokenizer: a `tokenizer.json` file,
    or `hf-hub:REPO` for the `tokenizer.json` of a Hub repository (fetched by huggingface_hub
    into its cache; what open_clip's SigLIP configs load through `transformers`). A Hugging Face
    tokenizer normalises and splits as its file says; its own special tokens are left out and EOS
    appended here, as open_clip's settings for both families (T5: EOS appended; Gemma:
    `add_bos_token=False`, `add_eos_token=True`) make it."""

    pool_type = "last"

    def __init__(self, model: str, context_length: int = 64, family: str = "siglip2"):
        if family not in SIGLIP_FAMILIES:
            raise UsageError(f"unknown SigLIP tokenizer {family!r}; use {sorted(SIGLIP_FAMILIES)}")
        self.model_path, self.context_length, self.family = model, context_length, family
        self.pad_token_id = SIGLIP_FAMILIES[family][0]
        self.eot_token_id = SIGLIP_EOS
        self.sp = self.hf = None
        if model.startswith("hf-hub:") or model.endswith(".json"):
            self.hf = _hf_tokenizer(model)
            self.vocab_size = self.hf.get_vocab_size()
            eos_piece = self.hf.id_to_token(SIGLIP_EOS)
            if eos_piece not in ("</s>", "<eos>"):
                raise UsageError(
                    f"{model}: id 1 is {eos_piece!r}, not an end of sequence; SigLIP's tokenizers "
                    f"end with id 1: give {SIGLIP_FAMILIES[family][1]}"
                )
            return
        self.sp = SentencePieceTokenizer(model, context_length).sp
        self.vocab_size = self.sp.get_piece_size()
        if self.sp.eos_id() != SIGLIP_EOS:
            eos = self.sp.id_to_piece(SIGLIP_EOS) if self.vocab_size > SIGLIP_EOS else None
            raise UsageError(
                f"{model}: its end-of-sequence id is {self.sp.eos_id()} ({eos!r} is id 1); "
                f"SigLIP's tokenizers end with id 1: give {SIGLIP_FAMILIES[family][1]}"
            )

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The ids of canonicalized texts, without special tokens."""
        texts = [canonicalize(t) for t in texts]
        if self.hf is not None:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        return self.sp.encode(texts)

    def tokenize(self, texts: Sequence[str] | str) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [[*ids, SIGLIP_EOS] for ids in self.encode(texts)]
        return pack(rows, self.context_length, SIGLIP_EOS, self.pad_token_id)

    __call__ = tokenize


def _hf_tokenizer(model: str) -> Any:
    """A `tokenizers.Tokenizer` from a tokenizer.json file or `hf-hub:REPO` (its tokenizer.json,
    through huggingface_hub: its cache, token, endpoint and offline mode), without its padding and
    truncation (`pack` does both)."""
    try:
        import tokenizers
    except ImportError:
        raise UsageError(
            f"{model} is a Hugging Face tokenizer: pip install tokenizers to read it"
        ) from None
    path = model
    if model.startswith("hf-hub:"):
        repo = model.removeprefix("hf-hub:").strip("/")
        try:
            path = hub.cached(repo, "tokenizer.json") or hub.download(repo, "tokenizer.json")
        except hub.fetch_errors() as e:
            raise UsageError(
                f"could not fetch {repo}'s tokenizer.json: {hub.first_line(e)}"
            ) from None
    if not paths.path(path).exists():
        raise UsageError(f"no tokenizer file at {path}")
    try:
        tokenizer = tokenizers.Tokenizer.from_str(paths.path(path).read_text())
    except Exception as e:  # the library's one error type for a file it cannot parse
        raise UsageError(f"{model}: not a Hugging Face tokenizer.json ({e})") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def get_tokenizer(name_or_path: str = "clip_bpe", context_length: int | None = None) -> Tokenizer:
    """'clip_bpe' (or 'openai') -> the CLIP BPE; a '.model' path -> sentencepiece;
    'siglip:MODEL' / 'siglip2:MODEL' -> SigLIP's / SigLIP 2's tokenizer (`SigLIPTokenizer`; MODEL
    a sentencepiece file, a tokenizer.json or hf-hub:REPO; 'siglip2:digits' is the SigLIP demo's,
    `data.digits.cached_tokenizer`);
    a training run's directory -> the tokenizer that run trained with, at its
    model's context length.

    `context_length` defaults to 77 (64 for SigLIP's), or to the run's for a run directory.
    """
    family, _, model_path = name_or_path.partition(":")
    if family in SIGLIP_FAMILIES and model_path:
        if name_or_path == "siglip2:digits":  # the SigLIP demo's, trained on first use
            from clip_jax.data import digits

            model_path = digits.cached_tokenizer()
        return SigLIPTokenizer(model_path, context_length or 64, family)
    run_config = paths.path(name_or_path) / "config.json"
    if name_or_path not in ("clip_bpe", "openai") and run_config.exists():
        config = json.loads(run_config.read_text())
        length = context_length or config["model"]["text"]["context_length"]
        return get_tokenizer(config["train_data"]["tokenizer"], length)
    context_length = context_length or 77
    if name_or_path in ("clip_bpe", "openai"):
        return ClipBpeTokenizer(context_length)
    if name_or_path.endswith(".model"):
        return SentencePieceTokenizer(name_or_path, context_length)
    raise UsageError(
        f"unknown tokenizer {name_or_path!r}: use 'clip_bpe', the path of a sentencepiece .model, "
        "or siglip:PATH / siglip2:PATH"
    )


def train_sentencepiece(
    input_path: str, vocab_size: int, out_path: str, model_type: str = "unigram"
) -> str:
    """Trains a sentencepiece model on a text file of captions (one per line); pad is id 0.

    Returns the path of the `.model` written (its `.vocab` lies beside it).
    """
    import sentencepiece

    if not os.path.exists(input_path):
        raise UsageError(f"no caption file at {input_path}")
    if not out_path.endswith(".model"):
        raise UsageError(f"--out must end in .model, got {out_path}")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    try:
        sentencepiece.SentencePieceTrainer.train(
            input=input_path,
            model_prefix=out_path[: -len(".model")],
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            character_coverage=0.9995,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. a vocabulary larger than the text supports
        reason = str(e).strip().splitlines()[-1].rpartition("] ")[2]
        raise UsageError(f"sentencepiece training failed: {reason}") from e
    return out_path


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("input", None, "train: a text file, one caption per line.", flag_values=fv)
    flags.DEFINE_integer("vocab_size", None, "train: the vocabulary size.", flag_values=fv)
    flags.DEFINE_string("out", None, "train: the .model file to write.", flag_values=fv)
    flags.DEFINE_enum(
        "model_type", "unigram", ["unigram", "bpe"], "train: sentencepiece's model.", flag_values=fv
    )
    flags.DEFINE_string(
        "tokenizer", "clip_bpe", "encode: clip_bpe or a .model path.", flag_values=fv
    )
    flags.DEFINE_integer("context_length", 77, "encode: tokens per text.", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
    command, texts = (args[0], args[1:]) if args else ("", [])
    if command == "train" and not texts:
        missing = [f"--{n}" for n in ("input", "vocab_size", "out") if fv[n].value is None]
        if missing:
            raise UsageError(f"train needs {', '.join(missing)}")
        out = train_sentencepiece(fv.input, fv.vocab_size, fv.out, fv.model_type)
        print(f"wrote {out} (vocabulary {fv.vocab_size}, {fv.model_type})")
    elif command == "encode" and texts:
        tokenizer = get_tokenizer(fv.tokenizer, fv.context_length)
        for text, ids in zip(texts, tokenizer.tokenize(texts), strict=True):
            print(f"{text!r}: {' '.join(str(i) for i in ids[ids != 0])}")
    else:
        raise UsageError(
            "use `train --input FILE --vocab_size N --out FILE.model` or `encode TEXT ...`"
        )
    return 0


def main(argv: Sequence[str]) -> int:
    """`python -m clip_jax.data.tokenizers train|encode ...` -> exit status."""
    return cli.run_tool(argv, define_flags, run, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
