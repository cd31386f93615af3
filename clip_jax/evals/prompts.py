"""Zero-shot prompts: the class names of a dataset and the templates that turn one into a caption.

    templates("imagenet")   # the CLIP paper's 80 ImageNet templates, "a bad photo of a {}."...
    classnames("imagenet")  # OpenAI's 1,000 cleaned ImageNet class names, in label order
    class_subset("imagenet_r")  # ImageNet-R's 200 classes, as indices into classnames("imagenet")

Named lists are data (`prompt_data/*.json`: OpenAI's published prompts; see its README for origin,
licence and the datasets stored reordered to the tfds label order). The demo dataset `digits`
comes from `clip_jax.data.digits`. Either function also takes a list of strings, or the path of a
file holding one entry a line, or a `.json` file holding a list of strings. A template is a format
string holding `{}` exactly once, where the class name goes.
"""

import functools
import json
from collections.abc import Sequence

from etils import epath

from clip_jax.data import digits
from clip_jax.infra.errors import UsageError

DATA_DIR = epath.Path(__file__).parent / "prompt_data"


@functools.cache
def _data(file: str) -> dict[str, list[str]]:
    """One of the package's prompt data files: {dataset: [entries]}."""
    return json.loads((DATA_DIR / file).read_text())


def _named_templates() -> dict[str, list[str]]:
    # The demo's training captions that name the digit by word fit its word class names.
    own = [t.replace("{word}", "{}") for t in digits.TEMPLATES if "{digit}" not in t]
    return {**_data("templates.json"), "digits": own}


def _named_classnames() -> dict[str, list[str]]:
    return {**_data("classnames.json"), "digits": list(digits.CLASS_NAMES)}


def _entries(what: str, name_or_list: str | Sequence[str], named: dict[str, list[str]]) -> list:
    """A named list, a list as given, or a file's list (unvalidated)."""
    if not isinstance(name_or_list, str):
        if not isinstance(name_or_list, Sequence):
            raise UsageError(
                f"{what}: expected a name, a list or a file path, got {name_or_list!r}"
            )
        return list(name_or_list)
    if name_or_list in named:
        return list(named[name_or_list])
    path = epath.Path(name_or_list)
    if not path.is_file():
        raise UsageError(
            f"{what}: {name_or_list!r} is neither a known name ({', '.join(sorted(named))}) "
            "nor a file"
        )
    text = path.read_text()
    if path.suffix != ".json":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(entries, list):
        raise UsageError(f"{what}: {path} must hold a JSON list of strings")
    return entries


def _check_strings(what: str, entries: list) -> None:
    if not entries:
        raise UsageError(f"{what}: the list is empty")
    for e in entries:
        if not isinstance(e, str) or not e.strip():
            raise UsageError(f"{what}: every entry must be a non-empty string, got {e!r}")


def templates(name_or_list: str | Sequence[str]) -> list[str]:
    """The zero-shot templates of a dataset, or a user's own, validated.

    Args:
      name_or_list: a dataset name ("imagenet", "cifar10", "digits", each dataset of
        `suites.PAPER`), a list of templates, or the path of a file of them (one a line, or a
        `.json` list).

    Returns:
      The templates, format strings each holding `{}` exactly once and no other brace.
    """
    entries = _entries("templates", name_or_list, _named_templates())
    _check_strings("templates", entries)
    for t in entries:
        if t.count("{}") != 1 or "{" in t.replace("{}", "") or "}" in t.replace("{}", ""):
            raise UsageError(f"templates: {t!r} must hold '{{}}' exactly once and no other brace")
    return entries


def classnames(name_or_list: str | Sequence[str]) -> list[str]:
    """The class names of a dataset in its label order, or a user's own, validated.

    Args:
      name_or_list: a dataset name ("imagenet", "cifar10", "cifar100", "digits", each dataset of
        `suites.PAPER`), a list of names, or the path of a file of them (one a line, or a `.json`
        list).

    Returns:
      The class names; entry i names label i (for a named dataset, label i of its tfds builder).
    """
    entries = _entries("classnames", name_or_list, _named_classnames())
    _check_strings("classnames", entries)
    return entries


def class_subset(name: str) -> list[int]:
    """The classes of an ImageNet subset (whose tfds labels are the 1,000 ImageNet classes).

    Zero-shot on ImageNet-R or ImageNet-A, as in the CLIP paper, scores only these classes.

    Args:
      name: "imagenet_r" or "imagenet_a".

    Returns:
      Ascending indices into `classnames("imagenet")` (= tfds imagenet2012 label ids), [200].
    """
    wnids = _data("wnids.json")
    subsets = sorted(k for k in wnids if k != "imagenet")
    if name not in subsets:
        raise UsageError(f"class_subset: unknown subset {name!r}; known: {', '.join(subsets)}")
    index = {w: i for i, w in enumerate(wnids["imagenet"])}
    return sorted(index[w] for w in wnids[name])
