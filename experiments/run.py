"""Entry point for every experiment: picks the trainer named by `config.trainer`.

  python -m experiments.run --config configs/rm.py:size=tiny --workdir /tmp/rm \
      --config.train.learning_rate=1e-5
  python -m experiments.run --config configs/rm.py:size=tiny --config.train.steps=5 --print_config
  python -m experiments.run --config configs/rm.py:size=tiny --workdir W ... --dry_run

`config.trainer` is a key of experiments.cli.TRAINERS or a dotted module path; the module's
`train(config, workdir)` runs. Overrides must name existing config fields (a typo gets the
closest keys). Re-running the same command with the same workdir resumes from its newest
intact checkpoint; a changed config stops it unless --allow_config_change (common/resume.py).
--print_config prints the resolved config and exits; --dry_run loads data and model, prints
sizes, parameter counts and memory, and exits without touching the workdir.
Exit codes (common/run_utils.py): 0 done, 1 unexpected error (traceback), 2 a user error (one
line; --debug or RLHF_DEBUG=1 shows the traceback), 3 NaN/Inf loss, 75 stopped by SIGTERM after
saving a checkpoint (not finished: re-run to resume).
Multi-process runs: start the same command once per process with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (or config.distributed.*); see common/distributed.py.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.cli import check_overrides, run_trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with an argument: configs/NAME.py[:ARG].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config.json, metrics.jsonl, checkpoints/.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config (after overrides) and exit.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run",
    False,
    "Load data and model, print sizes, parameter counts and memory, then exit (nothing is written to the workdir).",
)
_ALLOW = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume even though the config or the training data changed (recorded in config_history.jsonl).",
)
_DEBUG = flags.DEFINE_bool("debug", False, "Show Python tracebacks for user errors too (= RLHF_DEBUG=1).")
flags.mark_flags_as_required(["config"])


def _parse_flags(argv):
    """absl's parsing, after a check that every `--config.x` override names a field (one line)."""
    check_overrides(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"FATAL flags error: {e}\nPass --helpshort to see the flags.")


def main(argv):
    logging.set_verbosity(logging.WARNING)  # Orbax logs every manager at INFO.
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _DEBUG.value:
        os.environ["RLHF_DEBUG"] = "1"
    if _PRINT_CONFIG.value:
        print(_CONFIG.value, end="")
        return 0
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (the run directory).")
    return run_trainer(_CONFIG.value, _WORKDIR.value, dry_run=_DRY_RUN.value, allow_config_change=_ALLOW.value)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
