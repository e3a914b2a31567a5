"""What experiments/run.py does: the trainer table, the check of `--config.x` overrides, the dispatch."""

import importlib
import os
import shutil
import sys
import tempfile

from common import distributed
from common.run_utils import EXIT_PREEMPTED, exit_on_user_error

TRAINERS = {
    "rm": "rm.train",
    "ppo": "ppo.train",
    "sft": "sft.train",
    "quickstart": "experiments.quickstart",
    "overoptimization": "experiments.overoptimization",
}


def trainer_module(trainer: str) -> str:
    """Module path for a TRAINERS key or a dotted path; error lists the known keys."""
    if trainer in TRAINERS:
        return TRAINERS[trainer]
    if isinstance(trainer, str) and "." in trainer:
        return trainer
    raise ValueError(
        f"Unknown config.trainer {trainer!r}; known trainers: "
        f"{sorted(TRAINERS)} (or a dotted module path with a train function)."
    )


def _config_spec(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def check_overrides(argv) -> None:
    """Exits (code 2) with one line when a `--config.a.b` override names no field of the config,
    naming the closest keys; does nothing when the config file itself cannot be loaded (absl
    reports that)."""
    from experiments.sweep import SweepError, load_config, resolve_key

    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    spec = _config_spec(argv)
    if not overrides or not spec:
        return
    try:
        config = load_config(spec)
    except Exception:  # noqa: BLE001 - a broken config file: absl's own parsing reports it
        return
    for arg in overrides:
        key = arg[len("--config.") :].split("=", 1)[0]
        try:
            resolve_key(config, key)
        except SweepError as e:
            detail = str(e).split(": ", 1)[-1]
            sys.stderr.write(
                f"FATAL unknown config key {key} in ['{arg.split('=', 1)[0]}']: {detail} "
                "Overrides must name fields that exist in the config file.\n"
            )
            sys.exit(2)


def run_trainer(config, workdir: str, *, dry_run: bool = False, allow_config_change: bool = False) -> int:
    """Runs `config.trainer`'s train(config, workdir); user errors exit 2 with one line (common/run_utils.py).

    dry_run: the trainer loads data and model, prints sizes and exits, in a temporary workdir
    (the real one stays untouched). A run stopped by SIGTERM exits EXIT_PREEMPTED (75).
    """
    with exit_on_user_error("experiments.run"):
        if "trainer" not in config:
            raise ValueError(
                f"The config has no `trainer` field; set it to one of {sorted(TRAINERS)} or a dotted module path."
            )
        if allow_config_change:
            os.environ["RLHF_ALLOW_CONFIG_CHANGE"] = "1"  # read by common.loop.start_run (sub-runs too)
        if dry_run:
            if "runtime" not in config:
                raise ValueError(f"--dry_run: config.trainer={config.trainer!r} has no runtime section to run dry")
            config.runtime.dry_run = True
            workdir = tempfile.mkdtemp(prefix="dry_run_")  # the real workdir stays untouched
        # Before anything touches a device: a multi-process run joins JAX's distributed runtime here.
        distributed.initialize(config)
        module = importlib.import_module(trainer_module(config.trainer))
        if not callable(getattr(module, "train", None)):
            raise AttributeError(f"{module.__name__} has no train(config, workdir) function.")
        from common.tracking import DryRunDone

        try:
            result = module.train(config, workdir)
        except DryRunDone:
            print("dry run: done (nothing trained, nothing written to the workdir)", flush=True)
            return 0
        finally:
            if dry_run:
                shutil.rmtree(workdir, ignore_errors=True)
    if isinstance(result, dict) and "preempted_at" in result:
        sys.exit(EXIT_PREEMPTED)  # saved but unfinished: schedulers and experiments.sweep re-run it
    return 0
