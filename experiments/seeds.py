"""Several seeds of one experiment: per-seed configs and workdirs, and tables of means with 95% intervals.

Across seeds the interval is Student-t (common.stats.t_interval: mean +- t_{0.975, n-1} s / sqrt(n));
with one seed it is undefined (nan), and a single-seed accuracy is reported with its bootstrap interval
over pairs instead (eval/accuracy_ci_low/high of the RM trainer).
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np

from common.stats import t_interval


def seed_list(config) -> list[int]:
    """config.seeds when given (e.g. (0, 1, 2)), else [config.seed]."""
    seeds = [int(s) for s in (config.get("seeds") or ())]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"config.seeds={tuple(seeds)} repeats a seed; expected distinct seeds")
    return seeds or [int(config.seed)]


def seed_configs(config, workdir: str) -> list[tuple[int, object, str]]:
    """[(seed, config with that seed and no seeds list, its workdir)]: the workdir itself for one seed
    (the single-seed layout is unchanged), workdir/seed_<s> for each of several."""
    seeds = seed_list(config)
    out = []
    for seed in seeds:
        c = copy.deepcopy(config)
        c.seed, c.seeds = seed, ()
        out.append((seed, c, workdir if len(seeds) == 1 else os.path.join(workdir, f"seed_{seed}")))
    return out


def interval(values) -> dict:
    """{'mean', 'low', 'high', 'n', 'values'} over the finite values (t-interval; nan bounds for n < 2)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0, "values": list(values)}
    ci = t_interval(np.asarray(finite))
    return {
        "mean": ci["mean"],
        "low": ci["low"],
        "high": ci["high"],
        "n": ci["n"],
        "values": [float(v) for v in values],
    }


def format_interval(record: dict, digits: int = 3) -> str:
    """'0.643 (0.587, 0.697)' or '0.643' when the interval is undefined (one seed)."""
    mean, low, high = record["mean"], record["low"], record["high"]
    if not math.isfinite(mean):
        return "n/a"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({low:.{digits}f}, {high:.{digits}f})"


def table_markdown(rows: dict, *, header=("quantity", "mean (95% CI across seeds)", "per seed")) -> str:
    """Markdown table of {name: interval record}."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, record in rows.items():
        per_seed = ", ".join(f"{v:.3f}" if math.isfinite(v) else "nan" for v in record["values"])
        lines.append(f"| {name} | {format_interval(record)} | {per_seed} |")
    return "\n".join(lines) + "\n"


def mean_curve(curves: list[dict], keys) -> dict:
    """Point-wise mean of per-seed curves ({key: [values]}) over their common length."""
    length = min(len(c[keys[0]]) for c in curves)
    return {k: [float(np.mean([c[k][i] for c in curves])) for i in range(length)] for k in keys}
