"""Three train steps of the tiny model on a mesh of the devices in their order and on one of the
same devices shuffled, so that each process's devices hold separate ranges of the batch rows
(as a pod's mesh builder may order them); prints one JSON line per process.

    python -m tests.shuffled_devices [--orders=ordered,shuffled]
        [--coordinator_address=H:P --num_processes=N --process_id=I]
"""

import argparse
import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from clip_jax.data import pipeline
from clip_jax.parallel import sharding
from clip_jax.training import state as state_lib
from clip_jax.training import trainer as train
from tests.conftest import tiny_config

STEPS = 3


def interleaved(devices: list) -> list:
    """The devices with those of each process spread out: 0, 4, 1, 5, ... for 2 x 4 devices."""
    half = len(devices) // 2
    return [d for pair in zip(devices[:half], devices[half:], strict=True) for d in pair]


def run(config, devices: list) -> dict:
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    shard = sharding.data_shard(mesh, config.batch_size)
    source = pipeline.make_source(
        config.train_data,
        seed=config.seed,
        image_size=config.model.vision.image_size,
        context_length=config.model.text.context_length,
        vocab_size=config.model.text.vocab_size,
        process_index=shard.index,
        process_count=shard.count,
    )
    spec = state_lib.build(config, mesh)
    step_fn, _ = state_lib.compile_train_step(spec, config.batch_size)
    state = state_lib.init(spec, config.seed)
    batches = train.prefetch_to_devices(
        source.batches(config.batch_size, shard.rows), mesh, config.batch_size
    )
    losses = []
    for _ in range(STEPS):
        batch, _ = next(batches)
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    # The last global batch, gathered whole: each row must be the example of its global index.
    text = multihost_utils.process_allgather(batch["text"], tiled=True)
    expected = source.examples(np.arange(config.batch_size) + (STEPS - 1) * config.batch_size)
    rows = shard.rows
    return {
        "losses": losses,
        "rows_contiguous": bool((np.diff(rows) == 1).all()),
        "batch_in_place": bool(np.array_equal(np.asarray(text), expected["text"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--orders", default="ordered,shuffled")
    args = parser.parse_args()
    if args.num_processes > 1:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    config = tiny_config(**{"mesh.data": 4, "mesh.fsdp": 2})
    devices = sorted(jax.devices(), key=lambda d: d.id)
    orders = {"ordered": devices, "shuffled": interleaved(devices)}
    out = {name: run(config, orders[name]) for name in args.orders.split(",")}
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
