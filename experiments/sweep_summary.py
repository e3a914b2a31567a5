"""The tables of experiments/sweep.py: final metrics per point (summary.csv / .md) and, when the sweep
has a `seed` axis, means with 95% t-intervals across seeds per point of the other axes (summary_seeds.*)."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from typing import Any

FINAL_FILES = ("summary.json", "eval_final.json")  # later files win on a key clash
SEED_KEY = "seed"


def _flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat


def final_metrics(sub: str) -> dict:
    """Last value of each key of SUB/metrics.jsonl, then the keys of its final JSON files."""
    from common.metrics import read_metrics  # Local: imports JAX, only needed here.

    result = {}
    if os.path.exists(os.path.join(sub, "metrics.jsonl")):
        for record in read_metrics(sub):
            result.update({k: v for k, v in _flatten(record).items() if v is not None})
    for name in FINAL_FILES:
        path = os.path.join(sub, name)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    record = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e}).") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}.")
            result.update(_flatten(record))
    return result


def _md_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isfinite(value):
        value = f"{value:.4g}"  # The CSV keeps full precision; the Markdown is for reading.
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_summary(root: str, rows: Sequence[dict], sweep_keys: Sequence[str], *, title: str = "") -> list[str]:
    """Writes ROOT/summary.csv and ROOT/summary.md; returns the column order.

    Columns: swept keys (axis order), status, run, then every metric key sorted.
    """
    leading = [*sweep_keys, "status", "run"]
    metric_keys = sorted({k for row in rows for k in row} - set(leading))
    columns = leading + metric_keys
    with open(os.path.join(root, "summary.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    lines = [f"# {title}", ""] if title else []
    lines.append("| " + " | ".join(_md_cell(c) for c in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(row.get(c)) for c in columns) + " |")
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return columns


def _numeric(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def seed_rows(rows: Sequence[dict], sweep_keys: Sequence[str], *, metrics: Sequence[str] = ()) -> list[dict]:
    """Rows of the seed table: one per value of the non-seed axes, over that point's 'ok' seeds; each metric
    (the numeric ones, or `metrics`) gets <key> (mean), <key>/low, <key>/high (95% t; blank for one seed)."""
    from experiments.seeds import interval

    others = [k for k in sweep_keys if k != SEED_KEY]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("status") == "ok":
            groups.setdefault(tuple(row.get(k) for k in others), []).append(row)
    leading = set(sweep_keys) | {"status", "run"}
    out = []
    for values, members in groups.items():
        keys = metrics or sorted(
            {k for r in members for k, v in r.items() if k not in leading and _numeric(v) is not None}
        )
        record = dict(zip(others, values), seeds=",".join(str(r.get(SEED_KEY)) for r in members))
        for key in keys:
            got = [_numeric(r.get(key)) for r in members]
            ci = interval([g for g in got if g is not None])
            record[key], record[f"{key}/low"], record[f"{key}/high"] = ci["mean"], ci["low"], ci["high"]
            record[f"{key}/n"] = ci["n"]
        out.append(record)
    return out


def write_seed_summary(root: str, rows: Sequence[dict], sweep_keys: Sequence[str], *, metrics: Sequence[str] = ()):
    """ROOT/summary_seeds.csv (every numeric metric: mean, low, high, n) and summary_seeds.md (`metrics`, or
    the eval/ and summary metrics, as 'mean (low, high)')."""
    from experiments.seeds import format_interval

    table = seed_rows(rows, sweep_keys, metrics=metrics)
    if not table:
        return []
    others = [k for k in sweep_keys if k != SEED_KEY]
    columns = others + ["seeds"] + sorted({k for r in table for k in r} - set(others) - {"seeds"})
    with open(os.path.join(root, "summary_seeds.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in table:
            writer.writerow(["" if r.get(c) is None else r[c] for c in columns])
    shown = list(metrics) or sorted(
        k for k in {k for r in table for k in r} if "/" in k and not k.endswith(("/low", "/high", "/n"))
        and (k.startswith("eval/") and k.count("/") == 1)
    )[:12]  # fmt: skip
    lines = ["Means with 95% t-intervals across seeds", "", "| " + " | ".join(others + ["seeds"] + shown) + " |"]
    lines.append("|" + "---|" * (len(others) + 1 + len(shown)))
    for r in table:
        cells = [_md_cell(r.get(k)) for k in others + ["seeds"]]
        for key in shown:
            if key in r:
                cells.append(format_interval({"mean": r[key], "low": r[f"{key}/low"], "high": r[f"{key}/high"]}, 4))
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(root, "summary_seeds.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return table
