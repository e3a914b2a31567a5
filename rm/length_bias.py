"""Length bias of a reward model: does it pay for tokens rather than quality?

Two diagnostics on an eval set (Singhal et al. 2023, "A long way to go"):

* correlation of reward with response length over all 2N responses (chosen and rejected
  together), Pearson and Spearman;
* accuracy on pairs binned by the length difference len(chosen) - len(rejected): a model
  that mostly reads length is right when chosen is longer and wrong when it is shorter.

Lengths are response tokens (the prompt excluded; EOS included), as the data loader packs
them. Pure NumPy on rewards already computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.stats import pearson, spearman

# Bin edges on len(chosen) - len(rejected): shorter (< 0), same (= 0), longer (> 0).
DEFAULT_DIFF_EDGES = (-0.5, 0.5)


def _bin_name(low: float, high: float) -> str:
    if low == -np.inf:
        return f"diff<{high:g}"
    if high == np.inf:
        return f"diff>={low:g}"
    return f"{low:g}<=diff<{high:g}"


def length_bias_metrics(
    chosen_rewards,
    rejected_rewards,
    chosen_lengths,
    rejected_lengths,
    *,
    diff_edges: Sequence[float] = DEFAULT_DIFF_EDGES,
) -> dict:
    """Reward-length correlations and accuracy binned by length difference.

    Args:
      chosen_rewards, rejected_rewards: [N] rewards.
      chosen_lengths, rejected_lengths: [N] response lengths (tokens).
      diff_edges: increasing inner edges on len(chosen) - len(rejected); the bins are
        (-inf, e0), [e0, e1), ..., [e_last, inf). The default gives shorter / same / longer.

    Returns:
      dict of floats/ints:
        'length/pearson', 'length/spearman'  reward vs length over the 2N responses
                                             (nan if rewards or lengths are constant),
        'length/chosen_longer_fraction'      mean(len_c > len_r),
        'length/bin/<name>/accuracy', 'length/bin/<name>/n'   per non-empty bin,
      with <name> 'diff<-0.5' (chosen shorter), '-0.5<=diff<0.5' (same), 'diff>=0.5' (longer)
      for the default edges.
    """
    arrays = [
        np.asarray(a, np.float64).reshape(-1)
        for a in (chosen_rewards, rejected_rewards, chosen_lengths, rejected_lengths)
    ]
    n = arrays[0].size
    if n == 0 or any(a.size != n for a in arrays):
        raise ValueError(
            f"rm/length_bias.py: need four arrays of the same non-zero length, got {[a.size for a in arrays]}"
        )
    chosen, rejected, len_c, len_r = arrays
    edges = np.asarray(diff_edges, np.float64)
    if edges.ndim != 1 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"rm/length_bias.py: diff_edges must be increasing, got {list(diff_edges)}")
    rewards = np.concatenate([chosen, rejected])  # [2N]
    lengths = np.concatenate([len_c, len_r])  # [2N]
    out = {
        "length/pearson": pearson(rewards, lengths),
        "length/spearman": spearman(rewards, lengths),
        "length/chosen_longer_fraction": float(np.mean(len_c > len_r)),
    }
    diff = len_c - len_r  # [N]
    correct = chosen > rejected  # [N]
    bounds = np.concatenate([[-np.inf], edges, [np.inf]])
    for low, high in zip(bounds[:-1], bounds[1:]):
        in_bin = (diff >= low) & (diff < high)
        if np.any(in_bin):
            name = _bin_name(low, high)
            out[f"length/bin/{name}/accuracy"] = float(np.mean(correct[in_bin]))
            out[f"length/bin/{name}/n"] = int(np.sum(in_bin))
    return out


def response_lengths(data) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) response lengths [N] of a rm.data.PreferenceData (mask sum minus prompt)."""
    prompt = np.asarray(data.prompt_lengths, np.int64)
    return (np.asarray(data.chosen_mask).sum(1) - prompt, np.asarray(data.rejected_mask).sum(1) - prompt)
