r"""Grid sweeps over `experiments.run`: one sub-workdir per point, resumable, one table.

  python -m experiments.sweep --config configs/rm.py:size=tiny --workdir /tmp/sweep \
      --sweep train.learning_rate=1e-4,3e-4,1e-3 --sweep seed=0,1 \
      --set train.steps=100 [--dry_run] [--quiet]

Each point of the Cartesian product of the `--sweep` axes runs in turn as
`python -m experiments.run --config CONFIG --workdir ROOT/<a.b=1,c=x> --config.a.b=1
--config.c=x [--config.k=v per --set]`, its output streamed to the terminal and
appended to `SUB/sweep.log`. A point that exits 0 gets `SUB/SWEEP_DONE` (holding
0). The same command again skips finished points and re-launches the others,
which resume from their checkpoints; a point whose recorded command
(`SUB/sweep_point.json`) differs is refused (use a new ROOT or delete SUB).

Then `ROOT/summary.csv` and `ROOT/summary.md` get one row per point: the swept
values, `status` ('ok', 'failed (exit N)', 'preempted' (exit 75: SIGTERM, checkpoint saved,
resumed by the next sweep), 'interrupted', 'not run'), `run` (the
sub-workdir) and the final metrics: the last value of each key of
`SUB/metrics.jsonl`, then the keys of `SUB/summary.json` and `SUB/eval_final.json`
(flattened with '/'; they win on a clash); metric columns sorted, missing values
blank. Exit code: 0 all ok, 1 a point failed (after the table), 2 bad arguments,
130 interrupted (SIGTERM is forwarded to the running point so it can checkpoint).

Seeds: `--seeds 0,1,2` (the same as `--sweep seed=0,1,2`) adds a seed axis; then ROOT/summary_seeds.csv
and summary_seeds.md (experiments/sweep_summary.py) give, per point of the other axes, each metric's mean
over the seeds that finished with its 95% t-interval (`--metrics eval/accuracy,eval/ece` picks the
Markdown columns; default: the eval/ metrics).

`--sweep a.b=v1,v2` splits at commas outside brackets and quotes
(`"mesh.shape=(1, 1),(2, 1)"`) and parses values by the existing field's type, as
ml_collections overrides are: unknown keys and bad values fail before anything runs.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import difflib
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags as absl_flags

from experiments.sweep_summary import SEED_KEY, final_metrics, write_seed_summary, write_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DONE_FILE = "SWEEP_DONE"
POINT_FILE = "sweep_point.json"
LOG_FILE = "sweep.log"
from common.run_utils import EXIT_PREEMPTED as PREEMPTED_EXIT  # noqa: E402 (75: SIGTERM after a checkpoint)

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._=,+-]")
_MAX_NAME = 120


class SweepError(ValueError):
    """Bad sweep arguments; raised before any point runs."""


# ----------------------------------------------------------------------------- config and values


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` the way config_flags does: `get_config(arg)` or `get_config()`."""
    path, sep, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise SweepError(f"--config {spec!r}: no such file {path!r}.")
    module_spec = importlib.util.spec_from_file_location("_sweep_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise SweepError(f"--config {spec!r}: {path} has no get_config function.")
    return module.get_config(arg) if sep else module.get_config()


def _leaf_keys(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _suggest(config, node, part: str, where: str) -> str:
    """' Did you mean [...]?' from the section's fields (close spelling, prefix, initials)."""
    if not isinstance(node, ml_collections.ConfigDict):
        return f" {where} is a {type(node).__name__} field, not a section."
    prefix = f"{where}." if where else ""
    names = list(node.keys())
    initials = {n: "".join(w[:1] for w in n.split("_")) for n in names}
    close = [n for n in names if n.startswith(part) or initials[n] == part]
    close += [n for n in difflib.get_close_matches(part, names, n=3, cutoff=0.5) if n not in close]
    if close:
        return f" Did you mean {[prefix + n for n in close[:4]]}?"
    return f" Fields there: {sorted(prefix + n for n in names)}."


def resolve_key(config: ml_collections.ConfigDict, key: str) -> tuple[str, Any]:
    """Checks `a.b` names a leaf field of `config`; returns (key, current value).

    A leading 'config.' (as in `--config.a.b`) is accepted and dropped.
    """
    if key.startswith("config.") and "config" not in config:
        key = key[len("config.") :]
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:depth])
            raise SweepError(
                f"Unknown config key {key!r}: no field {part!r} in "
                f"{where or 'the top level'}.{_suggest(config, node, part, where)}"
            )
        node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
        raise SweepError(
            f"Config key {key!r} is a section, not a field; sweep one of its fields: "
            f"{sorted(_leaf_keys(node, key + '.'))}."
        )
    return key, node


def parse_value(key: str, text: str, current: Any) -> Any:
    """Parses `text` as a value of the type of the field's current value (like config_flags)."""
    try:
        if isinstance(current, bool):  # before int: bool is an int subclass
            return absl_flags.BooleanParser().parse(text)
        if isinstance(current, int):
            return absl_flags.IntegerParser().parse(text)
        if isinstance(current, float):
            return absl_flags.FloatParser().parse(text)
        if isinstance(current, str):
            return text
        if isinstance(current, (tuple, list)):
            value = ast.literal_eval(text)
            if not isinstance(value, (tuple, list)):
                value = (value,)
            return tuple(value)
    except (ValueError, SyntaxError, TypeError, absl_flags.Error) as e:
        raise SweepError(
            f"Config key {key!r}: cannot parse {text!r} as a {type(current).__name__} (current value {current!r}): {e}"
        ) from None
    # None or another type: a Python literal, else the string itself (config_flags' fallback).
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def split_values(text: str) -> list[str]:
    """'1,(2, 3),"a,b"' -> ['1', '(2, 3)', '"a,b"']: commas inside brackets/quotes stay."""
    items, current, depth, quote = [], [], 0, None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    items.append("".join(current).strip())
    if quote or depth:
        raise SweepError(f"Unbalanced brackets or quotes in {text!r}.")
    return items


def parse_assignment(spec: str, *, flag: str) -> tuple[str, str]:
    """'a.b=1,2' -> ('a.b', '1,2'), with an error naming the flag."""
    key, sep, value = spec.partition("=")
    if not sep or not key.strip():
        raise SweepError(
            f"{flag} {spec!r}: expected KEY=VALUE{'S' if flag == '--sweep' else ''}, "
            "e.g. train.learning_rate=1e-4,1e-3."
        )
    return key.strip(), value.strip()


def point_name(assignments: Sequence[tuple[str, str]]) -> str:
    """Filesystem-safe sub-workdir name 'a.b=1,c=x'; a hash keeps altered names unique."""
    raw = ",".join(f"{key}={text}" for key, text in assignments)
    name = _SAFE_NAME.sub("_", raw)
    if name != raw or len(name) > _MAX_NAME:
        digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
        name = f"{name[:_MAX_NAME]}-{digest}"
    return name


# ----------------------------------------------------------------------------- the grid


def build_points(config_spec: str, sweeps: Sequence[str], sets: Sequence[str]) -> list[dict]:
    """Validates every axis and fixed override against the config; returns the grid.

    Each point is a dict: name, values {key: parsed value} (swept keys, in axis
    order) and overrides ['--config.k=text', ...] (swept, then fixed).
    """
    if not sweeps:
        raise SweepError("Give at least one --sweep KEY=V1,V2,...")
    config = load_config(config_spec)
    axes, seen = [], {}
    for spec in sweeps:
        key, text = parse_assignment(spec, flag="--sweep")
        key, current = resolve_key(config, key)
        texts = split_values(text)
        if any(not t for t in texts):
            raise SweepError(f"--sweep {spec!r}: empty value in the list.")
        parsed = [parse_value(key, t, current) for t in texts]
        if len(set(map(repr, parsed))) != len(parsed):
            raise SweepError(f"--sweep {spec!r}: a value is repeated.")
        if key in seen:
            raise SweepError(f"Config key {key!r} is swept twice ({seen[key]!r} and {spec!r}).")
        seen[key] = spec
        axes.append((key, list(zip(texts, parsed))))
    fixed = []
    for spec in sets:
        key, text = parse_assignment(spec, flag="--set")
        key, current = resolve_key(config, key)
        if key in seen:
            raise SweepError(f"Config key {key!r} is both swept ({seen[key]!r}) and set ({spec!r}).")
        seen[key] = spec
        parse_value(key, text, current)
        fixed.append(f"--config.{key}={text}")

    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        assignments = [(key, text) for (key, _), (text, _) in zip(axes, combo)]
        points.append(
            {
                "name": point_name(assignments),
                "values": {key: value for (key, _), (_, value) in zip(axes, combo)},
                "overrides": [f"--config.{k}={t}" for k, t in assignments] + fixed,
            }
        )
    names = [p["name"] for p in points]
    if len(set(names)) != len(names):
        raise SweepError(f"Two grid points share a sub-workdir name: {names}.")
    return points


def _command(config_spec: str, sub: str, overrides: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "experiments.run", "--config", config_spec, "--workdir", sub, *overrides]


def is_done(sub: str) -> bool:
    """True when the point finished: SWEEP_DONE exists and holds exit code 0."""
    try:
        with open(os.path.join(sub, DONE_FILE)) as f:
            return f.read().strip() == "0"
    except FileNotFoundError:
        return False


def _check_same_point(sub: str, record: dict) -> None:
    try:
        with open(os.path.join(sub, POINT_FILE)) as f:
            old = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):  # never started, or torn by a kill
        return
    if old != record:
        raise SweepError(
            f"{sub} was started with a different command:\n  before: {old.get('config')} "
            f"{' '.join(old.get('overrides', []))}\n  now:    {record['config']} "
            f"{' '.join(record['overrides'])}\nUse a new --workdir or delete {sub}."
        )


class _Runner:
    """Runs one point at a time; forwards SIGTERM to it so its trainer can checkpoint."""

    def __init__(self, *, quiet: bool):
        self.quiet = quiet
        self.proc = None
        self.stop_requested = False

    def handle_sigterm(self, signum, frame) -> None:
        del frame
        self.stop_requested = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def _pump(self, proc, log, out) -> None:
        """Copies the child's output to the log (and the terminal) until it closes the pipe."""
        # Chunks, not lines: progress bars redraw with '\r' and would otherwise stall.
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            log.write(chunk)
            log.flush()
            if not self.quiet:
                if out is not None:
                    out.write(chunk)
                    out.flush()
                else:
                    sys.stdout.write(chunk.decode(errors="replace"))

    def run(self, command: Sequence[str], log_path: str) -> int:
        """Runs `command`, appending its output to log_path; returns its exit code."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH", "")]))
        out = getattr(sys.stdout, "buffer", None)
        with open(log_path, "ab") as log:
            stamp = datetime.datetime.now().isoformat(timespec="seconds")
            log.write(f"==== {stamp} {shlex.join(command)}\n".encode())
            log.flush()
            proc = self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            # A thread copies the output, so the main thread can wait (and take Ctrl-C / SIGTERM)
            # while the child's last words still reach the log.
            pump = threading.Thread(target=self._pump, args=(proc, log, out), daemon=True)
            pump.start()
            try:
                return proc.wait()
            finally:
                if proc.poll() is None:  # Ctrl-C: the child got SIGINT too; give it time to stop.
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                pump.join(timeout=30)
                proc.stdout.close()
                self.proc = None


def _run_grid(points: Sequence[dict], config_spec: str, runner: _Runner, statuses: dict) -> None:
    """Runs the unfinished points in order, filling statuses[name]; stops on SIGTERM."""
    for i, point in enumerate(points):
        name, sub = point["name"], point["sub"]
        if runner.stop_requested:
            return
        if is_done(sub):
            print(f"sweep [{i + 1}/{len(points)}] {name}: done, skipped", flush=True)
            continue
        print(f"sweep [{i + 1}/{len(points)}] {name}: running", flush=True)
        statuses[name] = "interrupted"  # until it returns
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, POINT_FILE), "w") as f:
            json.dump(point["record"], f, indent=2)
        code = runner.run(_command(config_spec, sub, point["overrides"]), os.path.join(sub, LOG_FILE))
        if runner.stop_requested:  # The sweep itself got SIGTERM (forwarded to the point).
            return
        if code == PREEMPTED_EXIT:  # the trainer saved a checkpoint on SIGTERM: unfinished, resumes next time
            statuses[name] = "preempted"
            print(
                f"sweep: {name} was preempted (exit {code}) after saving a checkpoint; re-run the sweep to resume it",
                file=sys.stderr,
                flush=True,
            )
        elif code == 0:
            with open(os.path.join(sub, DONE_FILE), "w") as f:
                f.write("0\n")
            statuses[name] = "ok"
        else:
            statuses[name] = f"failed (exit {code})"
            print(f"sweep: {name} failed with exit code {code}; see {sub}/{LOG_FILE}", file=sys.stderr, flush=True)


def collect_rows(points: Sequence[dict], statuses: dict) -> list[dict]:
    """One table row per point: final metrics, then the swept values, status and run name."""
    rows = []
    for point in points:
        status = statuses.get(point["name"]) or ("ok" if is_done(point["sub"]) else "not run")
        row = {}
        if os.path.isdir(point["sub"]):
            try:
                row = final_metrics(point["sub"])
            except ValueError as e:  # One corrupt file must not cost the whole table.
                print(f"sweep: {point['name']}: metrics left blank: {e}", file=sys.stderr)
        row.update(point["values"], status=status, run=point["name"])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- entry point


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    parser.add_argument("--workdir", required=True, help="root folder; one sub-folder per point")
    parser.add_argument(
        "--sweep", action="append", default=[], metavar="KEY=V1,V2", help="a grid axis (repeat for more axes)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=V", help="a fixed override for every point (repeatable)"
    )
    parser.add_argument(
        "--seeds", default="", metavar="0,1,2", help="shorthand for --sweep seed=0,1,2: + a table across seeds"
    )
    parser.add_argument(
        "--metrics", default="", metavar="K1,K2", help="columns of summary_seeds.md (default: the eval/ metrics)"
    )
    parser.add_argument("--dry_run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--quiet", action="store_true", help="log runs to SUB/sweep.log only")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the sweep; returns the process exit code (0 ok, 1 a point failed, 2 bad arguments)."""
    args = _parse_args(argv)
    if args.seeds:
        args.sweep.append(f"{SEED_KEY}={args.seeds}")
    path, sep, arg = args.config.partition(":")
    config_spec = os.path.abspath(path) + sep + arg
    root = os.path.abspath(args.workdir)
    try:
        points = build_points(config_spec, args.sweep, args.set)
        for point in points:
            point["sub"] = os.path.join(root, point["name"])
            point["record"] = {"config": config_spec, "overrides": point["overrides"]}
            _check_same_point(point["sub"], point["record"])
    except SweepError as e:
        print(f"FATAL sweep: {e}", file=sys.stderr)
        return 2

    if args.dry_run:
        for point in points:
            state = "done" if is_done(point["sub"]) else "resume" if os.path.exists(point["sub"]) else "new"
            command = _command(config_spec, point["sub"], point["overrides"])
            print(f"[{state}] {point['name']}\n  {shlex.join(command)}")
        return 0

    os.makedirs(root, exist_ok=True)
    runner = _Runner(quiet=args.quiet)
    previous = signal.signal(signal.SIGTERM, runner.handle_sigterm)
    statuses = {}
    try:
        _run_grid(points, config_spec, runner, statuses)
    except KeyboardInterrupt:
        print("sweep: interrupted; writing the summary of what finished.", file=sys.stderr)
        runner.stop_requested = True
    finally:
        signal.signal(signal.SIGTERM, previous)

    rows = collect_rows(points, statuses)
    fixed = [o[len("--config.") :] for o in points[0]["overrides"][len(points[0]["values"]) :]]
    title = f"Sweep of {args.config}" + (f" with {', '.join(fixed)}" if fixed else "")
    write_summary(root, rows, list(points[0]["values"]), title=title)
    if len({str(p["values"].get(SEED_KEY)) for p in points}) > 1:  # a seed axis: means and intervals
        metrics = [m for m in args.metrics.split(",") if m]
        write_seed_summary(root, rows, list(points[0]["values"]), metrics=metrics)
    failed = [r["run"] for r in rows if r["status"] != "ok"]
    print(f"sweep: {len(rows) - len(failed)}/{len(rows)} points ok; table in {root}/summary.md", flush=True)
    if runner.stop_requested:
        return 130
    if failed:
        print(f"sweep: not ok: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
