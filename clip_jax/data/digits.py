"""The demo dataset: the 1,797 real 8x8 handwritten digits that ship inside scikit-learn, as
captioned TFRecord shards (no download).

    python -m clip_jax.data.digits --output DIR [--image_size 64]

Each digit is inverted (dark ink on white), upsampled (bicubic) to `image_size`, made RGB and
stored as JPEG, with a caption drawn from varied templates ("a handwritten seven", "the digit 7",
...). A fixed permutation splits 1,497 training and 300 test examples: `DIR/train-*.tfrecord`
and `DIR/test-*.tfrecord` in img2dataset's layout (`jpg`, `txt`, `key`, plus the int64 `label`),
and `DIR/classnames.txt`, the class names in label order. Train with
`--config.train_data.source='tfrecord:DIR/train-*.tfrecord'`.

The sources `digits:train` and `digits:test` (of training and of evals) need no such step: they
read shards that `cached_shards` writes on first use into the cache (`clip_jax.infra.cache`:
`$CLIP_JAX_CACHE/digits/`, else `~/.cache/clip_jax/digits/`), once, at 32 px (the input pipeline
resizes to the model's resolution).

The SigLIP demo's tokenizer, `siglip2:digits`, is a sentencepiece model with SigLIP 2's special
ids (pad 0, EOS 1, BOS 2, unk 3; a byte-fallback BPE, as Gemma's), trained on the training
captions' templates: `cached_tokenizer` writes it into the same cache on first use.

scikit-learn is an optional dependency: `pip install 'clip-jax-train[demo]'`.
"""

import fcntl
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import flags, logging
from PIL import Image

from clip_jax.data.captions import canonicalize
from clip_jax.data.prepare import ShardWriter, UsageError, make_example
from clip_jax.infra import cache, cli

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "a photo of the number {word}",
    "a handwritten digit {digit}",
    "the number {word}, written by hand",
    "a scan of a handwritten {digit}",
    "a small blurry picture of the digit {word}",
    "a {word} written in ink",
    "an image of the numeral {digit}",
    "a hand-drawn {word}",
)
TEST_SIZE = 300
SPLIT_SEED = 0
SHARD_SIZE = 1000
JPEG_QUALITY = 95
SPLITS = ("train", "test")
CACHE_IMAGE_SIZE = 32
CACHE_VERSION = 1  # bump when the rendering, the captions or the split change: a new folder
TOKENIZER_VERSION = 1  # bump when the tokenizer's training changes
TOKENIZER_VOCAB = 400  # 256 byte pieces, 4 special ones, merges up to whole caption words
# sentencepiece trainer options for a BPE model with Gemma's (SigLIP 2's) ids and normalisation:
# byte fallback, digits split, no dummy prefix, text kept as it is; pad 0, EOS 1, BOS 2, UNK 3.
GEMMA_STYLE = dict(
    hard_vocab_limit=False,
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    pad_id=0,
    eos_id=1,
    bos_id=2,
    unk_id=3,
    pad_piece="<pad>",
    eos_piece="<eos>",
    bos_piece="<bos>",
    unk_piece="<unk>",
    minloglevel=2,
)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images uint8 [1797, 8, 8] (0 = ink-free, 16 = full ink) and
    labels int64 [1797]."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise UsageError(
            "the digits demo needs scikit-learn: pip install 'clip-jax-train[demo]'"
        ) from None
    digits = sklearn_digits()
    return digits.images.astype(np.uint8), digits.target.astype(np.int64)


def render(digit: np.ndarray, image_size: int) -> bytes:
    """An 8x8 digit (values 0..16) -> JPEG bytes, dark on white, RGB [image_size, image_size]."""
    grey = 255 - np.round(digit.astype(np.float32) * (255 / 16)).astype(np.uint8)
    image = Image.fromarray(grey, "L").resize((image_size, image_size), Image.BICUBIC)
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def caption(label: int, rng: np.random.Generator) -> str:
    """A caption naming `label`, from a random template."""
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return template.format(word=CLASS_NAMES[label], digit=label)


def split_indices(n: int, test_size: int = TEST_SIZE) -> dict[str, np.ndarray]:
    """A fixed permutation of range(n) cut into train and test (each sorted)."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    return {"train": np.sort(order[test_size:]), "test": np.sort(order[:test_size])}


def write_digits(output: str, image_size: int = 64, shard_size: int = SHARD_SIZE) -> dict[str, int]:
    """Writes the train and test shards and classnames.txt; returns examples per split."""
    if image_size < 8:
        raise UsageError(f"--image_size {image_size}: use at least 8 (the digits are 8x8)")
    images, labels = load_digits()
    import tensorflow as tf

    tf.io.gfile.makedirs(output)
    counts = {}
    for k, (split, indices) in enumerate(split_indices(len(labels)).items()):
        rng = np.random.default_rng([SPLIT_SEED, k + 1])  # the captions' templates
        with ShardWriter(output, split, shard_size) as writer:
            for i in indices:
                label = int(labels[i])
                jpeg = render(images[i], image_size)
                writer.write(make_example(jpeg, caption(label, rng), f"{i:04d}", label=label))
        counts[split] = writer.count
    with tf.io.gfile.GFile(os.path.join(output, "classnames.txt"), "w") as f:
        f.write("\n".join(CLASS_NAMES) + "\n")
    return counts


def cached_shards(split: str, directory: str = "") -> str:
    """The glob of the cached shards of `split`, what the `digits:SPLIT` sources read; the cache
    is written first when it is missing (once, whatever the number of processes asking).

    Args:
      split: "train" (1,497 digits) or "test" (300).
      directory: where the shards live; by default `cache.cache_dir("digits", "v1-32px")`.

    Returns:
      `DIRECTORY/SPLIT-*.tfrecord`.
    """
    if split not in SPLITS:
        raise UsageError(f"digits:{split}: no such split; use digits:train or digits:test")
    directory = directory or cache.cache_dir("digits", f"v{CACHE_VERSION}-{CACHE_IMAGE_SIZE}px")
    if not os.path.isdir(directory):
        _write_once(directory, lambda tmp: write_digits(tmp, CACHE_IMAGE_SIZE), "the digits")
    return os.path.join(directory, f"{split}-*.tfrecord")


def cached_tokenizer(directory: str = "") -> str:
    """The path of the SigLIP demo's sentencepiece model (see the module), written first when it
    is missing, as the shards are."""
    directory = directory or cache.cache_dir("digits", f"siglip2-tokenizer-v{TOKENIZER_VERSION}")
    if not os.path.isdir(directory):
        _write_once(directory, write_tokenizer, "the digits tokenizer")
    return os.path.join(directory, "tokenizer.model")


def write_tokenizer(output: str) -> str:
    """Trains the demo's tokenizer on every training caption a template can make (canonicalized,
    as the tokenizer sees them); returns the model's path."""
    import sentencepiece

    os.makedirs(output, exist_ok=True)
    lines = sorted(
        {
            canonicalize(t.format(word=word, digit=digit))
            for t in TEMPLATES
            for digit, word in enumerate(CLASS_NAMES)
        }
    )
    text = os.path.join(output, "captions.txt")
    with open(text, "w") as f:
        f.write("\n".join(lines) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=text,
        model_prefix=os.path.join(output, "tokenizer"),
        vocab_size=TOKENIZER_VOCAB,
        num_threads=1,
        **GEMMA_STYLE,
    )
    return os.path.join(output, "tokenizer.model")


def _write_once(directory: str, write: Callable[[str], Any], what: str) -> None:
    """Writes into a temporary folder renamed into place, under a file lock: readers never see a
    partial cache, and processes that ask at once write it once."""
    parent = os.path.dirname(os.path.abspath(directory))
    cache.make_dir(parent, "the cache folder")
    with open(os.path.abspath(directory) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if os.path.isdir(directory):  # written by another process while this one waited
            return
        logging.info("writing %s of the demo to %s (once)", what, directory)
        tmp = tempfile.mkdtemp(prefix=".digits-", dir=parent)
        try:
            write(tmp)
            try:
                os.rename(tmp, directory)
            except OSError:
                if not os.path.isdir(directory):  # not a writer that got there first: a bug
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("output", None, "The folder to write the shards to.", flag_values=fv)
    flags.DEFINE_integer("image_size", 64, "Side of the stored images in pixels.", flag_values=fv)
    flags.mark_flag_as_required("output", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
    if args:
        raise UsageError(f"unexpected arguments: {' '.join(args)} (flags start with --)")
    counts = write_digits(fv.output, fv.image_size)
    print(f"wrote {counts['train']} train and {counts['test']} test digits to {fv.output}")
    return 0


def main(argv: list[str]) -> int:
    """`python -m clip_jax.data.digits --output DIR [--image_size 64]` -> exit status."""
    return cli.run_tool(argv, define_flags, run, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
