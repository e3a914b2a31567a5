"""Where a run shows up besides metrics.jsonl: TensorBoard, W&B, provenance.json, a PNG of
the curves, the start-of-run report, and the persistent compilation cache.

Config (configs/common.py logging_config / runtime_config; a config without these sections
gets the defaults):

  logging.tensorboard = True     event files in workdir/tensorboard/ (tensorboardX, no TensorFlow)
  logging.wandb = False          also log to Weights & Biases (imported only when True)
  logging.wandb_project          W&B project
  logging.wandb_mode = 'offline' 'offline' (no network; `wandb sync` later) or 'online'
  runtime.compilation_cache      'auto' (a user cache dir), '' (off) or a folder

Both sinks receive exactly the flat numeric scalars MetricsWriter writes to metrics.jsonl, at
the same steps. On resume the TensorBoard writer purges events after the resumed step, as
metrics.jsonl drops its lines after it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import shlex
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "ml-collections",
    "numpy",
    "transformers",
    "tokenizers",
    "datasets",
    "safetensors",
    "tensorboardX",
    "wandb",
)
LOGGING_DEFAULTS = {"tensorboard": True, "wandb": False, "wandb_project": "rlhf-jax", "wandb_mode": "offline"}
RUNTIME_DEFAULTS = {
    "compilation_cache": "auto",
    "async_checkpointing": False,
    "allow_config_change": False,
    "dry_run": False,
}


def section(config, name: str, defaults: dict) -> dict:
    """config.<name> as a dict over `defaults` (configs written before the section existed get them)."""
    out = dict(defaults)
    if config is not None and name in config:
        out.update({k: v for k, v in dict(config[name]).items()})
    return out


# ----------------------------------------------------------------------------- sinks


def _scalars(flat: dict) -> dict:
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    """Scalars to TensorBoard event files via tensorboardX (no TensorFlow needed)."""

    def __init__(self, logdir: str, *, resume_step: int | None):
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard hides events at steps >= it that were written before (a resumed run
        # re-does those steps), as MetricsWriter drops the lines after the resumed step.
        purge = resume_step + 1 if resume_step is not None and resume_step >= 0 else None
        self._writer = SummaryWriter(logdir=logdir, purge_step=purge, flush_secs=10)

    def write(self, step: int, flat: dict) -> None:
        for key, value in _scalars(flat).items():
            self._writer.add_scalar(key, value, global_step=int(step))

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class WandbSink:
    """Scalars to Weights & Biases (offline by default); one W&B run id per workdir, so resumes append."""

    def __init__(self, workdir: str, *, config_dict: dict, project: str, mode: str):
        if mode not in ("offline", "online"):
            raise ValueError(f"config.logging.wandb_mode={mode!r}; expected 'offline' or 'online'")
        import wandb

        id_path = os.path.join(workdir, "wandb_id.txt")
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = wandb.util.generate_id() if hasattr(wandb, "util") else os.urandom(4).hex()
            with open(id_path, "w") as f:
                f.write(run_id + "\n")
        self._run = wandb.init(
            project=project,
            dir=workdir,
            mode=mode,
            id=run_id,
            resume="allow",
            name=os.path.basename(os.path.abspath(workdir)),
            config=config_dict,
        )

    def write(self, step: int, flat: dict) -> None:
        self._run.log(_scalars(flat), step=int(step))

    def close(self) -> None:
        self._run.finish()


def check_logging(config) -> None:
    """Fails early (before any data is read) on logging settings that cannot work."""
    settings = section(config, "logging", LOGGING_DEFAULTS)
    if settings["wandb"] and importlib.util.find_spec("wandb") is None:
        raise ModuleNotFoundError(
            "config.logging.wandb=True but the wandb package is not installed: "
            "`pip install wandb`, or set --config.logging.wandb=False"
        )
    if settings["tensorboard"] and importlib.util.find_spec("tensorboardX") is None:
        raise ModuleNotFoundError(
            "config.logging.tensorboard=True but tensorboardX is not installed: "
            "`pip install tensorboardX` (requirements.txt), or set --config.logging.tensorboard=False"
        )


def open_metrics(workdir: str, config, *, resume_step: int | None):
    """The run's MetricsWriter (metrics.jsonl) with the TensorBoard / W&B sinks config.logging asks for."""
    import jax

    from common.metrics import MetricsWriter
    from common.resume import config_dict

    sinks = []
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        settings = section(config, "logging", LOGGING_DEFAULTS)
        if settings["tensorboard"]:
            sinks.append(TensorBoardSink(os.path.join(workdir, "tensorboard"), resume_step=resume_step))
        if settings["wandb"]:
            sinks.append(
                WandbSink(
                    workdir,
                    config_dict=config_dict(config),
                    project=settings["wandb_project"],
                    mode=settings["wandb_mode"],
                )
            )
    return MetricsWriter(workdir, resume_step=resume_step, sinks=sinks)


# ----------------------------------------------------------------------------- provenance


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> dict:
    """Git commit and dirty flag, package versions, command line, host, devices and start time."""
    import jax

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    devices = jax.devices()
    return {
        "git": {
            "commit": _git("rev-parse", "HEAD"),
            "dirty": None if status is None else bool(status),
            "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
            "repo": REPO,
        },
        "packages": versions,
        "python": sys.version.split()[0],
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "process": {"index": jax.process_index(), "count": jax.process_count(), "pid": os.getpid()},
        "devices": {
            "platform": jax.default_backend(),
            "count": len(devices),
            "kinds": sorted({d.device_kind for d in devices}),
        },
        "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_provenance(workdir: str) -> dict:
    """Writes workdir/provenance.json for this start; earlier starts stay listed under 'earlier_starts'."""
    record = provenance()
    path = os.path.join(workdir, "provenance.json")
    earlier = []
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
            earlier = old.pop("earlier_starts", []) + [old]
        except (OSError, json.JSONDecodeError):
            earlier = []
    with open(path, "w") as f:
        json.dump(dict(record, earlier_starts=earlier), f, indent=2, sort_keys=True)
    return record


# ----------------------------------------------------------------------------- compilation cache


def setup_compilation_cache(config) -> str | None:
    """Turns on JAX's persistent compilation cache (runtime.compilation_cache); returns its folder.

    'auto': $JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/rlhf-jax/xla (~/.cache/...),
    so a resumed run (and every run with the same shapes) reuses compiled programs.
    """
    import jax

    choice = section(config, "runtime", RUNTIME_DEFAULTS)["compilation_cache"]
    if not choice:
        return None
    if choice == "auto":
        path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "rlhf-jax", "xla"
        )
    else:
        path = os.path.abspath(os.path.expanduser(str(choice)))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    return path


# ----------------------------------------------------------------------------- start-of-run report


class DryRunDone(Exception):
    """Raised by `report_start` in a dry run after printing the sizes: nothing trains."""


def _count(tree) -> tuple[int, int]:
    import jax

    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype")]
    return (
        sum(int(math.prod(x.shape)) for x in leaves),
        sum(int(math.prod(x.shape)) * x.dtype.itemsize for x in leaves),
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def report_start(config, *, trainable, frozen=None, opt_state=None, data_stats: dict, extra_frozen=None) -> dict:
    """Prints the parameter counts, the resident state's memory and a data summary at start.

    trainable / frozen: the trained and the frozen parameter trees (frozen models such as PPO's
    reference and reward model go in `extra_frozen`). The memory estimate is the bytes of
    params + optimizer state + frozen trees held on the devices; activations are not included.
    In a dry run (runtime.dry_run) raises DryRunDone after printing.
    """
    n_train, b_train = _count(trainable)
    n_frozen, b_frozen = _count(frozen or {})
    n_other, b_other = _count(extra_frozen or {})
    _, b_opt = _count(opt_state or {})
    total = n_train + n_frozen
    lines = [
        f"model: {total:,} parameters, {n_train:,} trainable ({100.0 * n_train / max(total, 1):.2f}%)"
        + (f"; frozen models beside it: {n_other:,} parameters" if n_other else ""),
        f"memory (resident state, activations not included): params {_mib(b_train + b_frozen)} + "
        f"optimizer {_mib(b_opt)}"
        + (f" + frozen models {_mib(b_other)}" if b_other else "")
        + f" = {_mib(b_train + b_frozen + b_opt + b_other)}",
    ]
    splits = (
        data_stats if all(isinstance(v, (dict, type(None))) for v in data_stats.values()) else {"train": data_stats}
    )
    for split, stats in splits.items():
        if stats:
            shown = ", ".join(
                f"{k} {v}" for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            )
            lines.append(f"data {split}: {shown}")
    print("\n".join(lines), flush=True)
    summary = {"params_total": total, "params_trainable": n_train, "state_bytes": b_train + b_frozen + b_opt + b_other}
    if section(config, "runtime", RUNTIME_DEFAULTS)["dry_run"]:
        raise DryRunDone(summary)
    return summary


# ----------------------------------------------------------------------------- curves


def plot_training_curves(workdir: str, keys, *, out_name: str = "training_curves.png", title: str = "") -> str | None:
    """One panel per metrics.jsonl key (against step) in workdir/out_name; keys absent are left out."""
    from common.distributed import is_main_process
    from common.metrics import read_metrics

    if not is_main_process() or not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return None
    records = read_metrics(workdir)
    series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(series))
    rows = -(-len(series) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (key, points) in zip(axes.flat, series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(workdir, out_name)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
