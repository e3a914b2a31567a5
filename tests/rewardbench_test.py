"""RewardBench scoring against section / subset scores computed by hand on small layout files."""

import json
import math

import pytest

from common import data_io
from rm.rewardbench import best_of_k_result, score_rows


def reward_by_rule(prompts, responses):
    """A stand-in reward model: the number of times 'good' occurs in the response."""
    return [r.count("good") for r in responses]


def _rows(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    read, _ = data_io.read_table(str(path))
    return read


def g(n):
    return " ".join(["good"] * n) or "meh"


def test_v1_sections_by_hand(tmp_path):
    pair = lambda subset, c, r: {"prompt": "q", "chosen": g(c), "rejected": g(r), "subset": subset}
    rows = _rows(
        tmp_path / "v1.jsonl",
        [
            pair("alpacaeval-easy", 2, 1),
            pair("alpacaeval-easy", 1, 1),  # a tie is wrong: 0.5
            pair("mt-bench-easy", 3, 0),  # 1.0
            pair("math-prm", 1, 0),
            pair("math-prm", 0, 2),  # 0.5
            pair("hep-python", 1, 0),
            pair("hep-python", 4, 3),  # 1.0
            pair("refusals-dangerous", 0, 1),  # 0.0
            pair("mine", 2, 0),  # outside every section
        ],
    )
    out = score_rows("v1.jsonl", rows, reward_by_rule)
    assert out["version"] == "v1" and out["n_rows"] == 9
    assert out["subsets"] == {
        "alpacaeval-easy": 0.5,
        "mt-bench-easy": 1.0,
        "math-prm": 0.5,
        "hep-python": 1.0,
        "refusals-dangerous": 0.0,
        "mine": 1.0,
    }
    # Leaderboard counts, not row counts: Chat = (0.5 * 100 + 1.0 * 28) / 128; Reasoning =
    # (0.5 * 984 + 1.0 * 164) / 1148 = 4/7; Safety = 0; Chat Hard has no subset here.
    assert out["sections"] == pytest.approx({"Chat": 78 / 128, "Reasoning": 4 / 7, "Safety": 0.0})
    assert out["score"] == pytest.approx((78 / 128 + 4 / 7 + 0.0) / 3)


def test_v2_best_of_4_and_ties_by_hand(tmp_path):
    def row(subset, chosen, rejected, row_id="x", num_correct=None):
        r = {
            "prompt": "q",
            "chosen": [g(n) for n in chosen],
            "rejected": [g(n) for n in rejected],
            "subset": subset,
            "id": row_id,
        }
        if num_correct is not None:
            r["num_correct"] = num_correct
        return r

    rows = _rows(
        tmp_path / "v2.jsonl",
        [
            row("Focus", [3], [1, 2, 0]),  # chosen on top alone: 1
            row("Focus", [2], [2, 1, 0]),  # shares the top with one rejected: 1/2
            row("Focus", [1], [3, 0, 0]),  # 0
            row("Ties", [5], [1, 2], "ref:1", 1),
            row("Ties", [4, 6], [1], "tied:1", 2),
            row("Ties", [2], [3], "ref:2", 1),
            row("Ties", [3, 3], [1], "tied:2", 2),
        ],
    )
    out = score_rows("v2.jsonl", rows, reward_by_rule)
    assert out["version"] == "v2"
    assert out["subsets"]["Focus"] == pytest.approx(0.5)
    # Prompt 1: ref gap 5-2=3 (right), tied gap 4-1=3 (right), spread 6-4=2.
    # Prompt 2: ref gap 2-3=-1 (wrong), tied gap 3-1=2 (right), spread 0.
    # acc_ref 0.5, acc_tied 1; gap_tied > spread: 1.0; min(gap_ref, gap_tied) > spread: [3>2, -1>0] = 0.5;
    # margin terms tanh(3/2 - 1) and tanh(-1/0 - 1) = tanh(-inf) = -1.
    ties = 0.3 * 1.0 + 0.3 * 0.5 + 0.2 * 1.0 + 0.2 * 0.5 + 0.01 * (math.tanh(0.5) - 1.0) / 2
    assert out["subsets"]["Ties"] == pytest.approx(ties, abs=1e-12)
    assert out["score"] == pytest.approx((0.5 + ties) / 2)


def test_best_of_k_and_bad_layout():
    assert best_of_k_result([1.0, 1.0, 1.0, 1.0]) == 0.25
    assert best_of_k_result([0.0, 1.0, 0.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match=r"row 0 \(0-based\).*'prompt'"):
        score_rows("f.jsonl", [{"chosen": "a", "rejected": "b"}], reward_by_rule)
    with pytest.raises(ValueError, match=r"row 0 \(0-based\): key 'rejected'"):
        score_rows("f.jsonl", [{"prompt": "p", "chosen": ["a"], "rejected": [], "subset": "s"}], reward_by_rule)
