"""Train CLIP: `python -m clip_jax.main --config=configs/b16.py [--workdir=DIR] [--config.KEY=V]`.

Without `--workdir` the run goes to `runs/<config name>` (the config file's name, plus `_ARG` for
`FILE.py:ARG`); the same command resumes it. `--show_config` prints every config key with its value
and meaning, then exits. A workdir that holds a run of another model, data or batch size is refused
unless `--config_change_ok`.

Multi-host: pass `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`; without them,
TPU pods and SLURM jobs are detected by `jax.distributed.initialize()`, else one process runs.

Exit status: 0 done or saved (SIGTERM); 2 a user's mistake (one `error:` line); 3 the run halted
itself (a non-finite loss, loss spikes: the line names the checkpoint to resume from and the
command); 75 a process of the job was lost (`--heartbeat_timeout_seconds`): rerun the same
command, which resumes from the last checkpoint; 1 a bug (with its traceback).
"""

from absl import flags, logging
from ml_collections import config_flags

from clip_jax.infra import cli

_CONFIG = cli.define_config_flag("Config file, e.g. configs/b16.py (configs/b16.py:smoke: tiny).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints and metrics (default: runs/<config name>)."
)
_SHOW_CONFIG = flags.DEFINE_bool(
    "show_config", False, "Print every config key, its value and its meaning, then exit."
)
_CONFIG_CHANGE_OK = flags.DEFINE_bool(
    "config_change_ok",
    False,
    "Train on in a workdir whose run had another model, data or batch size.",
)
_JOIN = cli.define_distributed_flags()
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    cli.quiet_libraries()
    from clip_jax.training import guard, trainer, validate

    try:
        with cli.user_errors():
            cli.no_arguments(argv)
            if _SHOW_CONFIG.value:
                cli.print_stdout(cli.describe_config(_CONFIG.value, validate.config_meanings()))
                return
            workdir = _WORKDIR.value
            if not workdir:
                config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
                workdir = cli.default_workdir(config_arg)
                logging.info("workdir: %s (the default; --workdir chooses another)", workdir)
            _JOIN()
            trainer.run(_CONFIG.value, workdir, config_change_ok=_CONFIG_CHANGE_OK.value)
    except guard.HaltError as e:  # a non-finite loss or spikes; the line says where to resume
        cli.exit_with_error(str(e), 3)


if __name__ == "__main__":
    cli.run(main)
