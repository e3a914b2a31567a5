"""Helpers of experiments/run.py: the trainer table and the check of `--config.x` overrides."""

import sys

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
