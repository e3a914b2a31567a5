"""common.loop.run_train_loop with LoopHooks (how PPO runs it): per-step hook, last-step lines,
extra checkpointed state, the loop's own final save, and NaN checks on the named keys."""

import json
import os

import numpy as np
import pytest

from common.checkpoint import CheckpointManager
from common.loop import LoopHooks, run_train_loop
from common.metrics import MetricsWriter


def _run(tmp_path, *, total, losses, log_every=2, save_every=3):
    workdir = str(tmp_path)
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=save_every, max_to_keep=10)
    writer = MetricsWriter(workdir, resume_step=-1)
    seen, counter = [], {"updates": 0}

    def step_fn(state, numbered):
        step, _ = numbered
        return {"w": state["w"] + 1.0}, {"objective/score": float(losses[step]), "lr": 0.1 * step}

    def on_step(step, state, metrics):
        seen.append((step, float(state["w"][0]), metrics["objective/score"]))
        counter["updates"] += 1

    loop = run_train_loop(
        step_fn=step_fn,
        state={"w": np.zeros(2, np.float32)},
        batches=((s, None) for s in range(total)),
        start_step=0,
        total_steps=total,
        ckpt=ckpt,
        metrics_writer=writer,
        workdir=workdir,
        log_every=log_every,
        eval_every=0,
        run_eval=lambda step, state: None,
        desc="test",
        progress_keys={"score": "objective/score"},
        extra={"data": "id"},
        hooks=LoopHooks(
            on_step=on_step,
            checkpoint_extra=lambda: {"updates": counter["updates"]},
            metrics_prefix="",
            reduce="last",
            finite_keys=("objective/score",),
            save_last=True,
        ),
    )
    writer.close()
    return loop, seen, ckpt, workdir


def test_hooks_run_every_step_and_lines_hold_the_last_step(tmp_path):
    loop, seen, ckpt, workdir = _run(tmp_path, total=5, losses=[10.0, 11.0, 12.0, 13.0, 14.0])
    assert [s for s, _, _ in seen] == [1, 2, 3, 4, 5]  # on_step after every step, with the new state
    assert [w for _, w, _ in seen] == [1.0, 2.0, 3.0, 4.0, 5.0]
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    # log_every=2: steps 2, 4 and the last, each the values of that step (not a group mean), no prefix;
    # step 3 is a save step but not a log step, so it writes no line.
    assert [(line["step"], line["objective/score"]) for line in lines] == [(2, 11.0), (4, 13.0), (5, 14.0)]
    assert loop.step == 5 and not loop.preempted and loop.last_metrics["objective/score"] == 14.0
    # save_every=3 saves step 3; the loop saves the last step itself, with the hook's extra state.
    assert ckpt.all_steps() == [3, 5]
    assert ckpt.read_extra(3) == {"data": "id", "updates": 3, "step": 3}
    assert ckpt.read_extra(5) == {"data": "id", "updates": 5, "step": 5}
    ckpt.close()


def test_a_nan_in_a_finite_key_stops_before_the_hook_and_the_save(tmp_path):
    with pytest.raises(FloatingPointError, match=r"objective/score is nan at step 3.*last good checkpoint \(step 2\)"):
        _run(tmp_path, total=5, losses=[1.0, 2.0, float("nan"), 4.0, 5.0], save_every=2)
    ckpt = CheckpointManager(os.path.join(str(tmp_path), "checkpoints"), save_every=1)
    assert ckpt.latest_step() == 2  # step 3 was never saved
    ckpt.close()
