"""Caption templates: the sentences that turn a class name into a training caption.

`CAPTION_TEMPLATES` give label-only training datasets (a tfds dataset with a ClassLabel and no
text) varied captions; each template holds `{}` once, where the class name goes. (The zero-shot
evaluation prompts are `clip_jax.evals.prompts`.)

`canonicalize` is big_vision's caption cleaning, which SigLIP's tokenizers apply.
"""

import html
import string

from clip_jax.infra.errors import UsageError

CAPTION_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
    "a low resolution photo of a {}.",
    "a blurry photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
    "the {}.",
    "itap of a {}.",
)


def split_templates(templates: tuple[str, ...] | list[str]) -> tuple[list[str], list[str]]:
    """Templates -> (prefixes, suffixes): the text before and after their one `{}`.

    Args:
      templates: caption templates, each holding `{}` exactly once.

    Returns:
      (prefixes, suffixes), one of each per template, in order.
    """
    if not templates:
        raise UsageError("caption templates: the list is empty")
    prefixes, suffixes = [], []
    for t in templates:
        if t.count("{}") != 1:
            raise UsageError(f"caption template {t!r} must hold '{{}}' exactly once")
        before, after = t.split("{}")
        prefixes.append(before)
        suffixes.append(after)
    return prefixes, suffixes


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def basic_clean(text: str) -> str:
    """open_clip's basic cleaning of every caption: mojibake fixed (ftfy), HTML unescaped twice,
    stripped.

    Printable ASCII without "&" is stripped only: neither ftfy (whose fixes concern non-ASCII
    characters, control characters, line breaks and HTML entities) nor unescaping changes it, and
    ftfy costs half of a common caption's tokenizing, holding Python's lock."""
    if text.isascii() and text.isprintable() and "&" not in text:
        return text.strip()
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def canonicalize(text: str, keep: str | None = None) -> str:
    """big_vision's `canonicalize` as open_clip applies it to SigLIP's captions: open_clip's
    basic cleaning (ftfy, HTML unescaped twice, stripped), then underscores as spaces, ASCII
    punctuation removed (outside each occurrence of `keep`, e.g. "{}"), lower case, whitespace
    collapsed."""
    text = basic_clean(text).replace("_", " ")
    if keep:
        text = keep.join(part.translate(_PUNCTUATION) for part in text.split(keep))
    else:
        text = text.translate(_PUNCTUATION)
    return " ".join(text.lower().split()).strip()
