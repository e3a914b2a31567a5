"""Packed batches: several sequences per row of `max_length` tokens, with segment ids, so
padding no longer costs FLOPs (`data.packing = True` in the RM and SFT trainers).

A step's batch is the same set of examples as unpacked (rm/data.py's (seed, step) order); its
sequences are placed by first-fit-decreasing into rows of capacity L (longest first, ties by
position in the batch: deterministic, so resume is bit-identical). Each row carries
`segment_ids` (0 padding, 1, 2, ... per sequence) and `positions` restarting at 0 in every
segment; models/attention.py keeps attention inside a segment. Shapes are static: the number of
rows and of segments per row are fixed for the run (`plan_layout`: the maximum over every
training step, computed once from the data before training), so nothing recompiles.

Reward-model pairs: chosen and rejected are separate segments (possibly in different rows).
The batch is split into G groups of consecutive pairs (G = micro-batches x data shards, so a
group never straddles a micro-batch or a device); leaves have a leading [G] axis, and each pair
points at its two segments by flat slot `row * K + k` inside its group, where `read_at[row, k]`
is the index of segment k's last token (the reward is read there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PackLayout:
    """Static shape of packed batches: `groups` x `rows` rows of `length` tokens, at most
    `max_segments` sequences per row."""

    groups: int
    rows: int
    length: int
    max_segments: int
    row_buckets: tuple[int, ...] = ()  # allowed row counts, ascending, the last == rows; () = (rows,)

    def rows_for(self, need: int) -> int:
        """The smallest row bucket holding `need` rows (ValueError above `rows`)."""
        if need > self.rows:
            raise ValueError(f"packing: {need} rows needed, the layout has {self.rows}")
        return next(r for r in (self.row_buckets or (self.rows,)) if r >= need)


def choose_row_buckets(needs: Sequence[int], *, count: int, top: int | None = None) -> tuple[int, ...]:
    """At most `count` row counts (ascending, the largest = `top` or max(needs)) minimising the total
    rows over steps when every step takes the smallest bucket >= its need (exact dynamic programme
    over the distinct needs; deterministic)."""
    if count < 1:
        raise ValueError(f"packing: row_buckets must be >= 1, got {count}")
    top = max(needs) if top is None else top
    values, counts = np.unique(np.minimum(np.asarray(needs, np.int64), top), return_counts=True)
    values, counts = values.tolist(), counts.tolist()
    if values[-1] != top:
        values, counts = values + [top], counts + [0]
    m, k = len(values), min(count, len(values))
    prefix = np.concatenate([[0], np.cumsum(counts)]).tolist()  # steps with need <= values[i - 1]
    inf = float("inf")
    # best[j][i]: least total rows covering values[:i] with j buckets, the last one values[i - 1].
    best = [[inf] * (m + 1) for _ in range(k + 1)]
    back = [[-1] * (m + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for j in range(1, k + 1):
        for i in range(1, m + 1):
            for start in range(i):  # values[start:i] all take bucket values[i - 1]
                cost = best[j - 1][start] + values[i - 1] * (prefix[i] - prefix[start])
                if cost < best[j][i]:
                    best[j][i], back[j][i] = cost, start
    j = min(range(1, k + 1), key=lambda jj: (best[jj][m], jj))  # fewest buckets among the cheapest
    chosen, i = [], m
    while i > 0:
        chosen.append(values[i - 1])
        i, j = back[j][i], j - 1
    return tuple(sorted(chosen))


def first_fit_decreasing(lengths: Sequence[int], *, capacity: int, max_segments: int | None = None):
    """Bins for `lengths`: first-fit-decreasing into bins of `capacity` tokens (<= max_segments items).

    Items are taken longest first (ties: lower index first), each into the first bin with room.
    Returns (bin_of [N] int, offset_of [N] int: where the item starts in its bin, number of bins).
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(
            f"first_fit_decreasing: lengths must be in [1, {capacity}], got {lengths.min()}..{lengths.max()}"
        )
    order = np.lexsort((np.arange(lengths.size), -lengths)).tolist()  # longest first, stable
    limit = lengths.size if max_segments is None else max_segments
    sizes = lengths.tolist()
    used, count = [], []  # tokens and items per bin (plain lists: a few dozen bins, faster than numpy)
    bin_of = np.zeros(lengths.size, np.int64)
    offset_of = np.zeros(lengths.size, np.int64)
    for i in order:
        size = sizes[i]
        b = next((j for j, u in enumerate(used) if u + size <= capacity and count[j] < limit), len(used))
        if b == len(used):
            used.append(0)
            count.append(0)
        bin_of[i], offset_of[i] = b, used[b]
        used[b] += size
        count[b] += 1
    return bin_of, offset_of, len(used)


def _row_tokens(n_rows, length, pieces, pad_id):
    """input_ids, segment_ids, positions [n_rows, length] from pieces (row, offset, segment, ids)."""
    ids = np.full((n_rows, length), pad_id, np.int32)
    segment_ids = np.zeros((n_rows, length), np.int32)
    positions = np.zeros((n_rows, length), np.int32)
    for row, offset, segment, tokens in pieces:
        n = len(tokens)
        ids[row, offset : offset + n] = tokens
        segment_ids[row, offset : offset + n] = segment
        positions[row, offset : offset + n] = np.arange(n)
    return ids, segment_ids, positions


def _segment_numbers(bin_of, offset_of):
    """1-based segment number of every item inside its bin, in order of offsets."""
    order = np.lexsort((offset_of, bin_of))
    numbers = np.zeros(len(bin_of), np.int64)
    previous, k = -1, 0
    for i in order:
        k = k + 1 if bin_of[i] == previous else 1
        previous = bin_of[i]
        numbers[i] = k
    return numbers


def padded_width(lengths: np.ndarray, *, max_length: int, bucket: int) -> int:
    """Width of the unpacked batch (its longest sequence rounded up to `bucket`; max_length when 0)."""
    if bucket <= 0:
        return max_length
    return min(max_length, -(-int(np.max(lengths)) // bucket) * bucket)


# ----------------------------------------------------------------------------- reward-model pairs


def _pair_lengths(batch: dict) -> tuple[np.ndarray, np.ndarray]:
    return batch["chosen_mask"].sum(1).astype(np.int64), batch["rejected_mask"].sum(1).astype(np.int64)


def _group_items(chosen_lengths, rejected_lengths, groups):
    """Per group: the lengths of its sequences, chosen then rejected of each of its pairs."""
    pairs = len(chosen_lengths) // groups
    return [
        np.concatenate([chosen_lengths[g * pairs : (g + 1) * pairs], rejected_lengths[g * pairs : (g + 1) * pairs]])
        for g in range(groups)
    ]


def plan_pair_layout(
    chosen_lengths: np.ndarray,
    rejected_lengths: np.ndarray,
    batch_indices: Callable[[int], np.ndarray],
    *,
    steps: range,
    groups: int,
    length: int,
    rows: int = 0,
    max_segments: int = 0,
    row_buckets: int = 1,
) -> PackLayout:
    """The static layout for packed preference batches of every step in `steps`.

    chosen_lengths / rejected_lengths [N]: real tokens of every example; batch_indices(step):
    the example indices of a step's batch (rm/data.py's order). rows / max_segments 0: the
    maximum any step needs (computed here); given, they are checked and a ValueError names the
    first step that does not fit. row_buckets: how many row counts steps may take (1: every
    step has `rows` rows; see choose_row_buckets).
    """
    need_rows, need_segments, step_needs = 1, 1, []
    for step in steps:
        indices = batch_indices(step)
        if len(indices) % groups:
            raise ValueError(f"packing: batch_size {len(indices)} must be divisible by {groups} packing groups")
        step_needs.append(1)  # rows of this step: the most any of its groups needs
        for items in _group_items(chosen_lengths[indices], rejected_lengths[indices], groups):
            bin_of, offset_of, n_bins = first_fit_decreasing(items, capacity=length, max_segments=max_segments or None)
            segments = int(np.bincount(bin_of).max())
            if rows and n_bins > rows:
                raise ValueError(
                    f"packing: step {step} needs {n_bins} rows per group but data.pack_rows={rows}; "
                    f"raise it or set 0 (the maximum over the run)"
                )
            need_rows, need_segments = max(need_rows, n_bins), max(need_segments, segments)
            step_needs[-1] = max(step_needs[-1], n_bins)
    rows = rows or need_rows
    return PackLayout(
        groups=groups,
        rows=rows,
        length=length,
        max_segments=max_segments or need_segments,
        row_buckets=choose_row_buckets(step_needs or [rows], count=row_buckets, top=rows),
    )


def pack_pairs(batch: dict, layout: PackLayout, *, pad_id: int, bucket: int = 0) -> dict:
    """A padded preference batch (rm/data.py train_batches) -> the same pairs packed.

    Returns numpy arrays with leading [G] (G = layout.groups, P = pairs per group, R rows,
    L length, K max segments):
      input_ids, segment_ids, positions [G, R, L] int32 (R: the smallest of layout.row_buckets the
      step's sequences fit in); read_at [G, R, K] int32 (last token of
      each segment, 0 where unused); chosen_slot, rejected_slot [G, P] int32 (row * K + k);
      margin [G, P] float32 (and label [G, P] when the batch has labels); padded_tokens [G]
      float32 (what the unpacked, bucketed batch would hold, for the pad-fraction metrics).
    """
    g_count, length, k_count = layout.groups, layout.length, layout.max_segments
    chosen_lengths, rejected_lengths = _pair_lengths(batch)
    pairs = len(chosen_lengths) // g_count
    width = padded_width(np.concatenate([chosen_lengths, rejected_lengths]), max_length=length, bucket=bucket)
    groups = _group_items(chosen_lengths, rejected_lengths, g_count)
    bins = [first_fit_decreasing(items, capacity=length, max_segments=k_count) for items in groups]
    for g, (_, _, n_bins) in enumerate(bins):
        if n_bins > layout.rows:
            raise ValueError(f"pack_pairs: group {g} needs {n_bins} rows, the layout has {layout.rows}")
    r_count = layout.rows_for(max(n_bins for _, _, n_bins in bins))  # this step's row bucket
    out = {k: np.zeros((g_count, r_count, length), np.int32) for k in ("input_ids", "segment_ids", "positions")}
    out["read_at"] = np.zeros((g_count, r_count, k_count), np.int32)
    out["chosen_slot"] = np.zeros((g_count, pairs), np.int32)
    out["rejected_slot"] = np.zeros((g_count, pairs), np.int32)
    for g, (items, (bin_of, offset_of, _)) in enumerate(zip(groups, bins)):
        segment = _segment_numbers(bin_of, offset_of)  # 1-based
        pieces = []
        for i in range(2 * pairs):
            side, pair = ("chosen", i) if i < pairs else ("rejected", i - pairs)
            row = g * pairs + pair
            tokens = batch[f"{side}_ids"][row, : items[i]]
            pieces.append((bin_of[i], offset_of[i], segment[i], tokens))
            out["read_at"][g, bin_of[i], segment[i] - 1] = offset_of[i] + items[i] - 1
            out[f"{side}_slot"][g, pair] = bin_of[i] * k_count + segment[i] - 1
        out["input_ids"][g], out["segment_ids"][g], out["positions"][g] = _row_tokens(r_count, length, pieces, pad_id)
    out["margin"] = np.asarray(batch["margin"], np.float32).reshape(g_count, pairs)
    if "label" in batch:
        out["label"] = np.asarray(batch["label"], np.float32).reshape(g_count, pairs)
    out["padded_tokens"] = np.full((g_count,), 2.0 * pairs * width, np.float32)
    return out


# ----------------------------------------------------------------------------- SFT sequences


def plan_sequence_layout(
    lengths: np.ndarray,
    batch_indices: Callable[[int], np.ndarray],
    *,
    steps: range,
    length: int,
    row_multiple: int = 1,
    rows: int = 0,
    row_buckets: int = 1,
) -> PackLayout:
    """Static layout for packed SFT batches (one group; rows a multiple of `row_multiple`, the
    micro-batches x data shards the rows are split over). rows 0: the maximum over `steps`.
    row_buckets: how many row counts steps may take (see choose_row_buckets)."""
    needs = []
    for step in steps:
        _, _, n_bins = first_fit_decreasing(lengths[batch_indices(step)], capacity=length)
        if rows and n_bins > rows:
            raise ValueError(f"packing: step {step} needs {n_bins} rows but data.pack_rows={rows}; raise it or set 0")
        needs.append(-(-n_bins // row_multiple) * row_multiple)
    top = -(-(rows or max(needs, default=1)) // row_multiple) * row_multiple
    buckets = choose_row_buckets(needs or [top], count=row_buckets, top=top)
    return PackLayout(groups=1, rows=top, length=length, max_segments=0, row_buckets=buckets)


def pack_sequences(batch: dict, layout: PackLayout, *, pad_id: int, bucket: int = 0) -> dict:
    """A padded SFT batch (input_ids, attention_mask, loss_mask [B, L]) -> packed rows [R, L]
    (R: the smallest of layout.row_buckets the batch fits in).

    loss_mask is carried per token; the first token of every sequence is never a target, so the
    next-token loss never crosses from one segment into the next. Also padded_tokens [R] float32
    (the unpacked batch's size spread over the rows, for the pad-fraction metrics).
    """
    lengths = batch["attention_mask"].sum(1).astype(np.int64)
    bin_of, offset_of, n_bins = first_fit_decreasing(lengths, capacity=layout.length)
    if n_bins > layout.rows:
        raise ValueError(f"pack_sequences: the batch needs {n_bins} rows, the layout has {layout.rows}")
    n_rows = layout.rows_for(n_bins)  # this step's row bucket (a multiple of the planned row_multiple)
    segment = _segment_numbers(bin_of, offset_of)
    pieces = [(bin_of[i], offset_of[i], segment[i], batch["input_ids"][i, : lengths[i]]) for i in range(len(lengths))]
    ids, segment_ids, positions = _row_tokens(n_rows, layout.length, pieces, pad_id)
    loss_mask = np.zeros_like(ids)
    for i in range(len(lengths)):
        loss_mask[bin_of[i], offset_of[i] : offset_of[i] + lengths[i]] = batch["loss_mask"][i, : lengths[i]]
    width = padded_width(lengths, max_length=layout.length, bucket=bucket)
    padded = np.full((n_rows,), len(lengths) * width / n_rows, np.float32)
    return {
        "input_ids": ids,
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": loss_mask,
        "padded_tokens": padded,
    }
