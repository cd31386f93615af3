"""Pod fit without a pod: the real train step compiled ahead of time for a TPU slice, on this
machine, with no TPU (libtpu compiles for devices it only describes).

    python -m clip_jax.aot --config=configs/b16.py --topology=v5e:16x16 [--config.KEY=VALUE ...]
        [--search_batch=4] [--mfu=0.4] [--hlo_out=FILE]

The run is built as training builds it (`state.build` on `config.mesh` laid over the slice's
chips) and its train step is compiled for the global batch `config.batch_size`. Printed: memory
per chip against the chip's HBM and a fits / does-not-fit verdict; the largest global batch that
fits (at most `--search_batch` more compiles); XLA's FLOPs per step and the step time at `--mfu`
of the chips' peak; the collectives of the compiled program with their dtypes and bytes; and the
parameters left replicated although the mesh shards parameters. The last line is one JSON object.

Topologies are libtpu's names, chips per axis: `v5e:16x16` (v5e-256), `v6e:16x16`, `v4:8x8x8`
(v4-1024: 512 chips), `v5p:8x8x8`. Needs libtpu: `pip install "clip-jax-train[aot]"`.
"""

import json

import jax
from absl import flags

from clip_jax.infra import cli
from clip_jax.tools.pod_fit import describe, fit_report

_CONFIG = cli.define_config_flag("Config file, e.g. configs/b16.py.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice as GEN:CHIPS, e.g. v5e:16x16, v4:8x8x8, v5p:8x8x8, v6e:16x16."
)
_SEARCH = flags.DEFINE_integer(
    "search_batch",
    4,
    "At most this many more compiles to find the largest batch that fits (0: no search).",
)
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation the step-time estimate assumes.")
_HLO_OUT = flags.DEFINE_string(
    "hlo_out", "", "Also write the compiled program's text (HLO) of the config's batch here."
)
flags.mark_flags_as_required(["config", "topology"])


def main(argv: list[str]) -> None:
    cli.quiet_libraries()
    jax.config.update("jax_platforms", "cpu")  # compiles for the topology; holds no local chip
    # A compile-only executable cannot be read back from XLA's cache: writing it only costs.
    jax.config.update("jax_enable_compilation_cache", False)
    with cli.user_errors():
        cli.no_arguments(argv)
        result = fit_report(
            _CONFIG.value,
            _TOPOLOGY.value,
            search_compiles=_SEARCH.value,
            mfu=_MFU.value,
            hlo_out=_HLO_OUT.value,
        )
    print(describe(result), flush=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    cli.run(main)
