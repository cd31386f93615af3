"""The linear-probe batch job (CLIP paper, appendix A.3) on a training run or a weight file:

    python -m clip_jax.linear_probe --workdir=DIR [--step=N] --dataset=tfds:cifar10
    python -m clip_jax.linear_probe --pretrained=FILE --dataset=imagefolder:DIR [--features=post]
    python -m clip_jax.linear_probe --pretrained=FILE --train=tfrecord:A* --test=tfrecord:B*

Image features (before the projection by default, as the paper probed its ViTs) are extracted
over all devices and hosts and cached on disk per split (`--cache_dir`), so a preempted job
resumes where it stopped; then L-BFGS logistic regression with scikit-learn's objective, C chosen
on a validation split held out from train (or `--val_split`), refit on train+val, test top-1.
`--fewshot=1,5,10,25` adds k-shot ridge classifiers on the same features.

Datasets: `tfds:NAME[/CONFIG]` (splits `--train_split`, `--test_split`), `imagefolder:DIR`
(DIR/train and DIR/test, one subfolder per class), or explicit `--train` and `--test` sources.
"""

import json
import os

from absl import flags

from clip_jax.evals.evaluator import FEATURES
from clip_jax.evals.linear_probe import LinearProbe
from clip_jax.inference import jobs
from clip_jax.infra import cli
from clip_jax.infra.errors import UsageError

_CONFIG = cli.define_config_flag("Config (mesh, tokenizer); optional.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_STEP = flags.DEFINE_integer("step", None, "The run's checkpoint step (default: the latest).")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "A weight file (OpenAI, OpenCLIP, ours).")
_DATASET = flags.DEFINE_string("dataset", "", "tfds:NAME[/CONFIG] or imagefolder:DIR.")
_TRAIN = flags.DEFINE_string("train", "", "Training source (instead of --dataset).")
_TEST = flags.DEFINE_string("test", "", "Test source (instead of --dataset).")
_TRAIN_SPLIT = flags.DEFINE_string("train_split", "train", "tfds split to train on.")
_TEST_SPLIT = flags.DEFINE_string("test_split", "test", "tfds split to test on.")
_VAL_SPLIT = flags.DEFINE_string("val_split", "", "tfds validation split ('': held out).")
_PROBE = LinearProbe.keys()  # the flags' defaults are an eval entry's
_FEATURES = flags.DEFINE_enum(
    "features", _PROBE["features"].default, list(FEATURES), "Before/after the projection."
)
_VAL_FRACTION = flags.DEFINE_float(
    "val_fraction", _PROBE["val_fraction"].default, "Share of train held out to choose C."
)
_FEWSHOT = flags.DEFINE_string("fewshot", "", "k-shot probes too, e.g. 1,5,10,25.")
_BATCH = flags.DEFINE_integer(
    "batch_size", _PROBE["batch_size"].default, "Global batch for feature extraction."
)
_DATA_DIR = flags.DEFINE_string("data_dir", "", "tfds data_dir.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", "", "Feature cache (default: beside the model).")
_OUTPUT = flags.DEFINE_string("output", "", "Where to write the JSON results.")
_JOIN = cli.define_distributed_flags()


def probe_name(dataset: str) -> str:
    """What results call the dataset: the tfds name, the image folder's name, or "probe"."""
    kind, _, rest = dataset.partition(":")
    if kind == "tfds":
        return rest.split("/")[0]
    return os.path.basename(rest.rstrip("/")) or "probe"


def main(argv: list[str]) -> None:
    cli.quiet_libraries()
    with cli.user_errors():
        cli.no_arguments(argv)
        _JOIN()
        srcs = jobs.sources(
            _DATASET.value,
            _TRAIN.value,
            _TEST.value,
            (_TRAIN_SPLIT.value, _TEST_SPLIT.value, _VAL_SPLIT.value),
        )
        entry = dict(
            type="linear_probe",
            name=probe_name(_DATASET.value),
            **srcs,
            features=_FEATURES.value,
            val_fraction=_VAL_FRACTION.value,
            batch_size=_BATCH.value,
            data_dir=_DATA_DIR.value,
        )
        try:
            shots = tuple(int(k) for k in _FEWSHOT.value.split(",") if k.strip())
        except ValueError:
            raise UsageError(
                f"--fewshot={_FEWSHOT.value!r}: give shot counts like 1,5,10"
            ) from None
        records = jobs.probe(
            _CONFIG.value,
            workdir=_WORKDIR.value,
            step=_STEP.value,
            pretrained=_PRETRAINED.value,
            entry=entry,
            fewshot=shots,
            cache_dir=_CACHE_DIR.value,
        )
    import jax

    if jax.process_index() == 0:
        if _OUTPUT.value:
            jobs.write_results(_OUTPUT.value, records, records[0]["model"])
        print(jobs.format_table(records))
        print(json.dumps(records), flush=True)


if __name__ == "__main__":
    cli.run(main)
