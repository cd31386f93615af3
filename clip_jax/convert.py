"""Export a training run's parameters for `clip_jax.load_pretrained` and open_clip:

    python -m clip_jax.convert export --workdir=DIR --out=FILE.safetensors [--step=N]

The conversion itself is `clip_jax.weights.state_dicts`; the export, `clip_jax.inference.load`.
"""

import sys

from absl import flags

from clip_jax.inference.load import export_run
from clip_jax.infra import cli
from clip_jax.infra.errors import UsageError

USAGE = """Export a training run's parameters for `clip_jax.load_pretrained` and open_clip:

    python -m clip_jax.convert export --workdir=DIR --out=FILE.safetensors [--step=N]
"""


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "The training run's directory.", flag_values=fv)
    flags.DEFINE_string("out", None, "The file to write: .safetensors or .npz.", flag_values=fv)
    flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
    if args != ["export"]:
        raise UsageError(
            f"the command is export, not {' '.join(args) or 'nothing'}: "
            "python -m clip_jax.convert export --workdir=DIR --out=FILE"
        )
    step = export_run(fv.workdir, fv.out, fv.step)
    print(f"wrote step {step} of {fv.workdir} to {fv.out}")
    return 0


def main(argv: list[str]) -> int:
    """`python -m clip_jax.convert export --workdir DIR --out FILE [--step N]` -> status."""
    return cli.run_tool(argv, define_flags, run, USAGE)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
