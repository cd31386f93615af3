"""A training run's directory as a whole: the config it was trained with (`config.json`, and the
one saved with each checkpoint), the check that a workdir holds the same run, and the model and
variables of one of its checkpoints.

    runs.check_same_run(config, workdir)   # a UsageError if workdir trained another run
    config = runs.read_run_config(workdir, step)
    model, variables, step = runs.load_run(workdir, step=None)
"""

import json
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from clip_jax.infra import paths
from clip_jax.infra.errors import UsageError
from clip_jax.models.clip import CLIP
from clip_jax.parallel import sharding
from clip_jax.training import checkpoint, state
from clip_jax.weights.state_dicts import merge_config

CONFIG_FILE = "config.json"  # what the trainer writes into the workdir

# Keys that make a workdir's checkpoints another run's: the model's shapes, the data and the
# batch. Compute-only model keys, the schedule, logging and evals may change on a resume.
RUN_KEYS = ("model.", "batch_size", "train_data.source", "train_data.tokenizer", "loss.name")
# Patch dropout too: FLIP's last phase trains on without it (0), on the same parameters.
COMPUTE_KEYS = ("model.dtype", "model.remat_policy", "model.attn_impl", "model.patch_dropout")


def check_same_run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses (a UsageError) a workdir whose config.json trained another model, data or batch
    size than `config`: its checkpoints belong to another run. A model key that the saved config
    lacks (written before the key existed) stands for the module's default, which is what that
    run used: a run from before `model.scan_layers` resumed with it set is another run."""
    path = paths.path(workdir) / CONFIG_FILE
    if not path.exists():
        return
    old, new = (
        _flat({**c, "model": state.model_kwargs(c["model"])} if "model" in c else c)
        for c in (_read_config_file(path), json.loads(config.to_json_best_effort()))
    )
    changed = [
        f"{k}: {old[k]!r} -> {new[k]!r}"
        for k in sorted(old.keys() & new.keys())
        if k.startswith(RUN_KEYS) and not k.startswith(COMPUTE_KEYS) and old[k] != new[k]
    ]
    if changed:
        raise UsageError(
            f"{workdir} holds a run of another config ({'; '.join(changed[:3])}"
            f"{'; ...' if len(changed) > 3 else ''}): give another --workdir, or pass "
            "--config_change_ok to train on in this one"
        )


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_run_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config a run was trained with: the one saved with the checkpoint at `step` when it
    has one, else `workdir/config.json` (the latest accepted config of the run)."""
    if step is not None:
        ckpt = checkpoint.Checkpointer(workdir, async_save=False, create=False)
        try:
            saved = ckpt.config(step)
        finally:
            ckpt.close()
        if saved is not None:
            return _saved_config(saved)
    path = paths.path(workdir) / CONFIG_FILE
    if not path.exists():
        raise UsageError(f"{path} is missing: is {workdir} a clip_jax run directory?")
    return _saved_config(_read_config_file(path))


# Keys that a run's saved config lacks when it was written before they existed, with what such
# runs did (the rules only lay parameters out: a run restores the same under today's).
# A model's missing keys are its modules' defaults: `complete_config`.
ADDED_KEYS = {"mesh.rules": sharding.DEFAULT_RULES, "mesh.allow_split_physical_axes": False}


def _saved_config(saved: dict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(saved)
    for key, value in ADDED_KEYS.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        if leaf not in node:
            node[leaf] = value
    return config


def _read_config_file(path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not a run's config ({e}): restore it, or remove it") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} is not a run's config (no JSON object): restore it, or remove it")
    return config


def write_run_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Makes `config` the run's `workdir/config.json` (once it has been accepted)."""
    paths.write_text(paths.path(workdir) / CONFIG_FILE, config.to_json_best_effort(indent=2))


def load_run(
    workdir: str, step: int | None = None, mesh: Mesh | None = None, **overrides: Any
) -> tuple[CLIP, dict[str, Any], int]:
    """A training run's model and variables at `step` (the latest checkpoint by default).

    Args:
      workdir: the run's directory.
      step: the checkpoint step; None for the latest.
      mesh: where to put the variables, laid out as training lays them out; None: this process's
        first device.
      overrides: model fields to change (`dtype="bfloat16"`), as `state_dicts.merge_config` takes.
    Returns:
      (model, variables, step).
    """
    if mesh is None:
        mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.local_devices()[:1])
    config_file = paths.path(workdir) / CONFIG_FILE
    if not config_file.exists():
        raise UsageError(f"{config_file} is missing: is {workdir} a clip_jax run directory?")
    ckpt = checkpoint.Checkpointer(workdir, async_save=False, create=False)
    try:
        available = ckpt.all_steps()
        if not available:
            raise UsageError(f"no checkpoint in {ckpt.directory}")
        step = max(available) if step is None else int(step)
        if step not in available:
            raise UsageError(
                f"no checkpoint at step {step} in {ckpt.directory}; there are {sorted(available)}"
            )
        saved = ckpt.config(step)  # the config that wrote this step, whatever came later
        config = _saved_config(saved) if saved else read_run_config(workdir)
        spec = state.build(config, mesh)
        restored, _ = ckpt.restore(step, spec.abstract_with_shardings())
    finally:
        ckpt.close()
    cfg = merge_config(spec.model_config, overrides)
    return CLIP(**cfg), state.variables_of(restored), step
