"""Prompt data and suites: counts, label order against the tfds builders, user lists and files."""

import json

import pytest

from clip_jax.data import digits
from clip_jax.evals import prompts, suites

NAMED = sorted(prompts._named_classnames())


def _norm(name: str) -> str:
    return name.lower().replace("_", " ")


@pytest.fixture(scope="module")
def tfds_labels(tmp_path_factory):
    """tfds builder name -> its ClassLabel names, read offline from the builder's code."""
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = str(tmp_path_factory.mktemp("tfds"))  # nothing is downloaded or prepared

    def labels(name: str, key: str = "label") -> list[str]:
        return tfds.builder(name, data_dir=data_dir).info.features[key].names

    return labels


def test_counts():
    assert len(prompts.templates("imagenet")) == 80
    assert len(prompts.classnames("imagenet")) == 1000
    assert len(prompts.classnames("cifar10")) == 10
    assert len(prompts.classnames("cifar100")) == 100
    assert prompts.classnames("digits") == list(digits.CLASS_NAMES)
    assert prompts.templates("imagenet")[0] == "a bad photo of a {}."


@pytest.mark.parametrize("name", NAMED)
def test_every_named_list_is_valid(name):
    names, templates = prompts.classnames(name), prompts.templates(name)
    assert names and all(isinstance(n, str) and n for n in names)
    assert all(t.count("{}") == 1 for t in templates)
    assert templates[0].format(names[0])


def test_lists_and_files(tmp_path):
    own = ["a photo of a {}.", "{} in the wild"]
    assert prompts.templates(own) == own
    assert prompts.templates(tuple(own)) == own
    (tmp_path / "t.txt").write_text("a photo of a {}.\n\n  {} in the wild  \n")
    assert prompts.templates(str(tmp_path / "t.txt")) == own
    (tmp_path / "c.json").write_text(json.dumps(["cat", "dog"]))
    assert prompts.classnames(str(tmp_path / "c.json")) == ["cat", "dog"]
    (tmp_path / "c.txt").write_text("cat\ndog\n")
    assert prompts.classnames(str(tmp_path / "c.txt")) == ["cat", "dog"]
    named = prompts.classnames("cifar10")
    named.append("changed")  # a copy: the package's data stays as it was
    assert len(prompts.classnames("cifar10")) == 10


@pytest.mark.parametrize(
    "bad, match",
    [
        (["a photo of a cat."], "exactly once"),
        (["{} and {}"], "exactly once"),
        (["a photo of a {c}."], "exactly once"),
        (["a {} {0}"], "no other brace"),
        ([], "empty"),
        (["a {}", 3], "non-empty string"),
        ("no_such_dataset", "known name"),
        (42, "expected a name"),
    ],
)
def test_bad_templates(bad, match):
    with pytest.raises(ValueError, match=match):
        prompts.templates(bad)


def test_bad_classnames(tmp_path):
    with pytest.raises(ValueError, match="imagenet"):  # an unknown name lists the known ones
        prompts.classnames("imagenet1k")
    with pytest.raises(ValueError, match="non-empty string"):
        prompts.classnames(["cat", " "])
    (tmp_path / "d.json").write_text(json.dumps({"cifar10": ["cat"]}))
    with pytest.raises(ValueError, match="JSON list"):
        prompts.classnames(str(tmp_path / "d.json"))
    (tmp_path / "e.json").write_text("[cat")
    with pytest.raises(ValueError, match="not valid JSON"):
        prompts.classnames(str(tmp_path / "e.json"))
    (tmp_path / "f.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        prompts.classnames(str(tmp_path / "f.txt"))


def test_class_subsets():
    for name in ("imagenet_r", "imagenet_a"):
        subset = prompts.class_subset(name)
        assert len(subset) == len(set(subset)) == 200
        assert subset == sorted(subset) and subset[0] >= 0 and subset[-1] < 1000
    # Hendrycks et al.'s ImageNet-A map begins 6 -> 0, 11 -> 1, 13 -> 2 (stingray, goldfinch...).
    assert prompts.class_subset("imagenet_a")[:3] == [6, 11, 13]
    with pytest.raises(ValueError, match="imagenet_a"):
        prompts.class_subset("imagenet_o")


def test_suite_entries_resolve():
    paper = suites.suite("paper")
    assert list(paper) == list(suites.PAPER)
    for name, entry in paper.items():
        kind, builder, split = entry["source"].split(":", 2)
        assert kind == "tfds" and builder and split, name
        assert prompts.classnames(entry["classnames"]) and prompts.templates(entry["templates"])
        if "class_subset" in entry:
            assert prompts.class_subset(entry["class_subset"])
    paper["cifar10"]["source"] = "changed"
    assert suites.PAPER["cifar10"]["source"] == "tfds:cifar10:test"
    with pytest.raises(ValueError, match="paper"):
        suites.suite("vtab")


def test_suite_class_counts_match_tfds(tfds_labels):
    for name, entry in suites.PAPER.items():
        builder = entry["source"].split(":")[1]
        labels = tfds_labels(builder, entry.get("label_key", "label"))
        assert len(prompts.classnames(entry["classnames"])) == len(labels), name


def test_label_order_matches_tfds(tfds_labels):
    wnids = json.loads((prompts.DATA_DIR / "wnids.json").read_text())
    for builder in ("imagenet2012", "imagenet_v2/matched-frequency", "imagenet_r", "imagenet_a"):
        assert tfds_labels(builder) == wnids["imagenet"], builder
    # Where tfds names the classes in OpenAI's words, the stored order must be tfds's.
    for builder, ours in [
        ("food101", "food101"),
        ("oxford_iiit_pet", "pets"),
        ("dtd", "dtd"),
        ("cars196", "cars"),
        ("resisc45", "resisc45"),
    ]:
        assert [_norm(n) for n in tfds_labels(builder)] == [
            _norm(n) for n in prompts.classnames(ours)
        ], builder
    sun = [" ".join(n.split("/")[2:]) for n in tfds_labels("sun397/standard-part1-120k")]
    assert [_norm(n) for n in sun] == prompts.classnames("sun397")
    # The reordered lists whose words differ from tfds's: spot checks of the moved classes.
    caltech = dict(zip(tfds_labels("caltech101"), prompts.classnames("caltech101"), strict=True))
    assert caltech["background_google"] == "background"
    assert caltech["faces"] == "off-center face" and caltech["faces_easy"] == "centered face"
    assert caltech["leopards"] == "leopard" and caltech["accordion"] == "accordion"
    eurosat = dict(zip(tfds_labels("eurosat/rgb"), prompts.classnames("eurosat"), strict=True))
    assert eurosat["HerbaceousVegetation"] == "brushland or shrubland"
    assert eurosat["SeaLake"] == "lake or sea" and eurosat["AnnualCrop"] == "annual crop land"
    names = prompts.classnames("flowers102")
    flowers = list(zip(tfds_labels("oxford_flowers102"), names, strict=True))
    assert sum(a != b for a, b in flowers) == 3  # OpenAI renamed three, in place


def test_imagenet_matches_open_clip():
    meta = pytest.importorskip("open_clip.zero_shot_metadata")
    assert prompts.classnames("imagenet") == list(meta.IMAGENET_CLASSNAMES)
    assert prompts.templates("imagenet") == [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES]
