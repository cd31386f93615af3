"""CLIP_benchmark's evaluation sets as an evaluation source (`wds:DIR`, `data.open_source`; this
module gives its fields, `data` makes the `EvalSource`).

CLIP_benchmark publishes its sets as webdataset shards (the hub's `clip-benchmark/wds_*`
repositories): `DIR/test/0.tar ... N-1.tar` with `nshards.txt`, `classnames.txt`,
`zeroshot_classification_templates.txt` (templates with `{c}`) and, for captioned sets,
`dataset_type.txt` saying "retrieval". A sample is an image (`webp`, `png`, `jpg`) with its class
in `cls`, or with its captions, one per line, in `txt`.
"""

from typing import Any

import numpy as np
import tensorflow as tf

from clip_jax.data import webdataset
from clip_jax.infra import paths
from clip_jax.infra.errors import UsageError

TEMPLATES_FILE = "zeroshot_classification_templates.txt"  # CLIP_benchmark's


def find_split(directory: str) -> tuple[str, str]:
    """A CLIP_benchmark dataset directory (or one of its split folders) -> (dataset root, split
    folder); a UsageError when neither holds shards."""
    root = paths.path(directory)
    for split, base in ((root / "test", root), (root, root.parent)):
        if split.is_dir() and ((split / "nshards.txt").exists() or any(split.glob("*.tar"))):
            return str(base), str(split)
    raise UsageError(
        f"wds:{directory}: no shards (want DIR/test/0.tar ... with nshards.txt, CLIP_benchmark's "
        "layout, or a split folder of .tar files)"
    )


def _lines(p) -> list[str]:
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def benchmark_files(root: str) -> dict[str, Any]:
    """What a CLIP_benchmark dataset root says of itself: `type` ("classification", "retrieval"
    or "multilabel"), `classnames` and `templates` (None when absent)."""
    root_path = paths.path(root)
    kind_file = root_path / "dataset_type.txt"
    kind = kind_file.read_text().strip().lower() if kind_file.exists() else "classification"
    names, templates = root_path / "classnames.txt", root_path / TEMPLATES_FILE
    return {
        "type": kind,
        "classnames": _lines(names) if names.exists() else None,
        # CLIP_benchmark formats its templates with {c}; ours hold {}
        "templates": [t.replace("{c}", "{}") for t in _lines(templates)]
        if templates.exists()
        else None,
    }


def shard_paths(split: str) -> list[str]:
    """The shards of a split folder in CLIP_benchmark's order: `0.tar` .. `N-1.tar` by
    `nshards.txt`, else every `.tar` in natural order."""
    split_path = paths.path(split)
    count = split_path / "nshards.txt"
    if count.exists():
        n = int(count.read_text().strip())
        files = [split_path / f"{i}.tar" for i in range(n)]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise UsageError(f"{split}: nshards.txt says {n}, but {missing[0]} is missing")
        return [str(f) for f in files]
    return sorted((str(f) for f in split_path.glob("*.tar")), key=webdataset.natural_key)


def open_benchmark_set(directory: str, separator: str) -> dict[str, Any]:
    """The `wds:DIR` source, a dataset in CLIP_benchmark's layout (see the module), as the fields
    of a `data.EvalSource`; an image's captions are joined by `separator`."""
    root, split = find_split(directory.rstrip("/"))
    info = benchmark_files(root)
    retrieval = info["type"] == "retrieval"
    if info["type"] not in ("classification", "retrieval"):
        raise UsageError(f"wds:{directory}: {info['type']} datasets are not supported")
    if not retrieval and not info["classnames"]:
        raise UsageError(f"wds:{directory}: no classnames.txt in {root}")
    shards = shard_paths(split)

    def samples():
        for shard in shards:
            for key, fields in webdataset.samples(shard):
                captions = ""
                if retrieval:
                    text = webdataset.caption_of(fields).decode("utf-8", "replace")
                    captions = separator.join(c for c in text.splitlines() if c.strip())
                yield {
                    "image": webdataset.image_of(fields),
                    "label": np.int64(webdataset.label_of(fields)),
                    "captions": captions.encode("utf-8"),
                    "image_id": key.encode("utf-8"),
                }

    spec = tf.TensorSpec([], tf.string)
    signature = {"image": spec, "label": tf.TensorSpec([], tf.int64), "captions": spec}

    def records() -> tf.data.Dataset:
        return tf.data.Dataset.from_generator(
            samples, output_signature={**signature, "image_id": spec}
        )

    return dict(
        name=f"wds:{directory}",
        count=lambda: sum(webdataset.count(s) for s in shards),
        records=records,
        classnames=None if retrieval else info["classnames"],
        templates=info["templates"],
        has_labels=not retrieval,
        has_captions=retrieval,
    )
