"""Evaluation suites: named sets of zero-shot classification datasets, as plain data.

Each entry of a suite names one dataset and holds:
- `source`: "tfds:NAME[/CONFIG]:SPLIT", the split the paper evaluates on (a tfds split string, so
  slices such as `train[80%:]` work);
- `classnames`, `templates`: names for `prompts.classnames` and `prompts.templates`; the class
  names are in the tfds builder's label order;
- `class_subset` (only ImageNet-R and ImageNet-A): a name for `prompts.class_subset`. Their tfds
  labels are the 1,000 ImageNet classes; the paper scores only the dataset's 200 classes, so an
  evaluator keeps those logits and maps label `classes[i]` to `i` (one that ignores the key scores
  all 1,000 classes: valid, but harder than the paper's task);
- `image_key` and `label_key` where they are not the default "image" and "label" (none today).

`PAPER` holds the datasets of the CLIP paper's zero-shot evaluation (Radford et al. 2021; the 27
of its Table 9) that TensorFlow Datasets provides, and the ImageNet distribution shifts of its
Figure 13, each with OpenAI's published prompts. Left out:
- not in tfds: Birdsnap, Country211, FGVC Aircraft, GTSRB, FER2013, Hateful Memes, Rendered
  SST2, Kinetics700, ObjectNet;
- in tfds but not as the paper's classification task: KITTI (closest-vehicle distance), CLEVR
  (object counts), PASCAL VOC 2007 (per-object crops), UCF101 (videos, the paper used one frame);
- SVHN (`svhn_cropped`): not in the paper's table, and OpenAI published no prompts for it.

EuroSAT and RESISC45 have a single tfds split; the paper drew its own test sets, so these use the
last 20% of tfds's train split (VTAB's test split) and are close to, not equal to, the paper's.
"""

import re

from clip_jax.infra import paths
from clip_jax.infra.errors import UsageError

PAPER = {
    "imagenet": {
        "source": "tfds:imagenet2012:validation",
        "classnames": "imagenet",
        "templates": "imagenet",
    },
    "imagenet_v2": {
        "source": "tfds:imagenet_v2/matched-frequency:test",
        "classnames": "imagenet",
        "templates": "imagenet",
    },
    "imagenet_sketch": {
        "source": "tfds:imagenet_sketch:test",
        "classnames": "imagenet",
        "templates": "imagenet",
    },
    "imagenet_r": {
        "source": "tfds:imagenet_r:test",
        "classnames": "imagenet",
        "templates": "imagenet",
        "class_subset": "imagenet_r",
    },
    "imagenet_a": {
        "source": "tfds:imagenet_a:test",
        "classnames": "imagenet",
        "templates": "imagenet",
        "class_subset": "imagenet_a",
    },
    "food101": {
        "source": "tfds:food101:validation",  # tfds's name for the 25,250-image test set
        "classnames": "food101",
        "templates": "food101",
    },
    "cifar10": {"source": "tfds:cifar10:test", "classnames": "cifar10", "templates": "cifar10"},
    "cifar100": {"source": "tfds:cifar100:test", "classnames": "cifar100", "templates": "cifar100"},
    "sun397": {
        # The standard partition 1: 50 test images a class, the paper's 19,850.
        "source": "tfds:sun397/standard-part1-120k:test",
        "classnames": "sun397",
        "templates": "sun397",
    },
    "cars": {"source": "tfds:cars196:test", "classnames": "cars", "templates": "cars"},
    "dtd": {"source": "tfds:dtd:test", "classnames": "dtd", "templates": "dtd"},
    "pets": {"source": "tfds:oxford_iiit_pet:test", "classnames": "pets", "templates": "pets"},
    "caltech101": {
        "source": "tfds:caltech101:test",
        "classnames": "caltech101",
        "templates": "caltech101",
    },
    "flowers102": {
        "source": "tfds:oxford_flowers102:test",
        "classnames": "flowers102",
        "templates": "flowers102",
    },
    "mnist": {"source": "tfds:mnist:test", "classnames": "mnist", "templates": "mnist"},
    "stl10": {"source": "tfds:stl10:test", "classnames": "stl10", "templates": "stl10"},
    "eurosat": {
        "source": "tfds:eurosat/rgb:train[80%:]",
        "classnames": "eurosat",
        "templates": "eurosat",
    },
    "resisc45": {
        "source": "tfds:resisc45:train[80%:]",
        "classnames": "resisc45",
        "templates": "resisc45",
    },
    "pcam": {"source": "tfds:patch_camelyon:test", "classnames": "pcam", "templates": "pcam"},
}

SUITES = {"paper": PAPER}

# CLIP_benchmark's webdataset evaluation sets (its benchmark/webdatasets.txt, MIT licence), in its
# order: the names its records carry. On the Hugging Face hub each is the repository
# clip-benchmark/wds_{name without "wds/", "/" -> "-"}.
CLIP_BENCHMARK = (
    "wds/mscoco_captions",
    "wds/flickr8k",
    "wds/flickr30k",
    "wds/imagenet1k",
    "wds/imagenetv2",
    "wds/imagenet_sketch",
    "wds/imagenet-a",
    "wds/imagenet-r",
    "wds/imagenet-o",
    "wds/objectnet",
    "wds/fer2013",
    "wds/voc2007",
    "wds/sun397",
    "wds/cars",
    "wds/fgvc_aircraft",
    "wds/mnist",
    "wds/stl10",
    "wds/gtsrb",
    "wds/country211",
    "wds/renderedsst2",
    "wds/vtab/caltech101",
    "wds/vtab/cifar10",
    "wds/vtab/cifar100",
    "wds/vtab/clevr_count_all",
    "wds/vtab/clevr_closest_object_distance",
    "wds/vtab/diabetic_retinopathy",
    "wds/vtab/dmlab",
    "wds/vtab/dsprites_label_orientation",
    "wds/vtab/dsprites_label_x_position",
    "wds/vtab/dsprites_label_y_position",
    "wds/vtab/dtd",
    "wds/vtab/eurosat",
    "wds/vtab/kitti_closest_vehicle_distance",
    "wds/vtab/flowers",
    "wds/vtab/pets",
    "wds/vtab/pcam",
    "wds/vtab/resisc45",
    "wds/vtab/smallnorb_label_azimuth",
    "wds/vtab/smallnorb_label_elevation",
    "wds/vtab/svhn",
)
# Our metric names -> CLIP_benchmark's, per task (its text retrieval finds an image's captions).
BENCHMARK_METRICS = {
    "zeroshot_classification": {
        "top1": "acc1",
        "top5": "acc5",
        "mean_per_class_recall": "mean_per_class_recall",
    },
    "zeroshot_retrieval": {
        **{f"image_to_text_r@{k}": f"text_retrieval_recall@{k}" for k in (1, 5, 10)},
        **{f"text_to_image_r@{k}": f"image_retrieval_recall@{k}" for k in (1, 5, 10)},
    },
}


def benchmark_folder(name: str) -> str:
    """A CLIP_benchmark name -> its folder name ("wds/vtab/cifar10" -> "vtab-cifar10")."""
    return name.removeprefix("wds/").replace("/", "-")


def _holds_shards(directory) -> bool:
    test = directory / "test"
    return test.is_dir() and ((test / "nshards.txt").exists() or any(test.glob("*.tar")))


def clip_benchmark(data_dir: str) -> tuple[dict[str, dict], dict[str, str], list[str]]:
    """The CLIP_benchmark datasets found under `data_dir`, as eval entries, and the names of those
    not found.

    A dataset is a folder holding `test/` shards in CLIP_benchmark's layout
    (`benchmark_data.find_split`), found as `data_dir/wds_vtab-cifar10` (the hub's repository
    name), `data_dir/vtab-cifar10` or `data_dir/vtab/cifar10`; any other folder of `data_dir` in
    that layout is evaluated too, under `wds/<folder>`. Classification sets get zero-shot
    classification with their own class names and templates; sets whose `dataset_type.txt` says
    "retrieval" get retrieval.

    Returns:
      ({eval name: entry}, {eval name: the name CLIP_benchmark's records carry}, [the
      CLIP_benchmark names not found]).
    """
    root = paths.path(data_dir)
    if not root.is_dir():
        raise UsageError(f"--data_dir={data_dir}: no such directory (CLIP_benchmark's datasets)")
    found: dict[str, tuple[str, object]] = {}
    for name in CLIP_BENCHMARK:
        folder = benchmark_folder(name)
        for candidate in (f"wds_{folder}", folder, name.removeprefix("wds/"), name):
            if _holds_shards(root / candidate):
                found[name] = (folder, root / candidate)
                break
    known = {str(d) for _, d in found.values()}
    for d in sorted(root.iterdir()):
        if d.is_dir() and str(d) not in known and _holds_shards(d):
            folder = d.name.removeprefix("wds_")
            found[f"wds/{folder}"] = (folder, d)
    entries, names = {}, {}
    for name, (folder, d) in found.items():
        kind_file = d / "dataset_type.txt"
        kind = kind_file.read_text().strip().lower() if kind_file.exists() else ""
        if kind == "retrieval":
            entry = {"type": "retrieval", "ks": (1, 5, 10), "max_captions": 10}
        elif kind in ("", "classification"):
            templates = (d / "zeroshot_classification_templates.txt").exists()
            entry = {"type": "zeroshot", "templates": "dataset" if templates else "imagenet"}
        else:
            continue  # multilabel: not a task clip_jax evaluates; listed as missing
        entries[folder], names[folder] = {**entry, "source": f"wds:{d}"}, name
    missing = [n for n in CLIP_BENCHMARK if n not in names.values()]
    return entries, names, missing


def suite(name: str) -> dict[str, dict[str, str]]:
    """A suite by name: {dataset: entry}, in the suite's order.

    Args:
      name: a key of `SUITES` ("paper").

    Returns:
      A copy of the suite, safe to change.
    """
    if name not in SUITES:
        raise UsageError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    return {dataset: dict(entry) for dataset, entry in SUITES[name].items()}


WNID = re.compile(r"n\d{8}")  # tfds's ImageNet label names are WordNet ids


def classnames_for(source_name: str) -> str:
    """The prompt data's class-name list for a tfds dataset of the paper suite ("" if none): its
    own label names can be ids (ImageNet's wnids) or abbreviations."""
    kind, _, rest = source_name.partition(":")
    if kind != "tfds":
        return ""
    dataset = rest.partition(":")[0].split("/")[0]
    for entry in PAPER.values():
        if entry["source"].split(":")[1].split("/")[0] == dataset:
            return entry["classnames"]
    return ""
