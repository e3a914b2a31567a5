"""Preference data (TRL's formats) -> fixed-shape, right-padded token arrays and batches.

Row layouts, recognised per file from its columns (extra columns are ignored), with
optional 'margin' (number; Llama 2 style), 'subset' (string; RewardBench) and 'label' (or
'probability': number in [0, 1], the probability that chosen is preferred: soft labels, 0.5 a
tie), optional per row: missing or null in a row means margin 0.0, subset '' (overall accuracy
only) and label 1.0:
  explicit prompt   {'prompt': str, 'chosen': str, 'rejected': str}
  implicit prompt   {'chosen': str, 'rejected': str}       (full texts, as in HH-RLHF)
  conversational    {'chosen': [{role, content}, ...], 'rejected': [...], 'prompt'?: [...]}

Every sequence is prompt_ids + response_ids; the response ends with EOS (appended unless
already there) and no other special token is added (chat templates bring their own).
The prompt is: explicit, tokenised on its own; implicit, the common token prefix of the
two full texts (leaving a response token on each side); conversational, the prompt
messages (or the common message prefix) rendered with add_generation_prompt=True, the
response being the rest of the rendered conversation (templates whose prompt is not a
text prefix of the conversation fall back to the implicit rule on the rendered texts).

Over-long pairs keep the responses: the prompt, shared by chosen and rejected so both
are scored in the same context, is cut from the left; a response longer than max_length
alone keeps its first max_length tokens. Batches depend only on (seed, step): one
permutation per epoch, np.random.default_rng((seed, epoch)), so resuming needs the step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np

from common import data_io

PAIR_KEYS = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "margin")


def expect_response(row, key):
    """The string in row[key], which may be empty: with an explicit prompt, an empty response is
    a policy that answered with EOS alone, a real outcome a reward model must rank. Else RowIssue."""
    value = row.get(key)
    if value is None:
        raise data_io.RowIssue(
            key, "missing", f"expected a string (may be empty after a prompt), got {data_io.describe(value)}"
        )
    if not isinstance(value, str):
        raise data_io.RowIssue(key, "wrong_type", f"expected a string, got {data_io.describe(value)}")
    return value


# ----------------------------------------------------------------------------- preference rows


@dataclasses.dataclass
class PreferenceData:
    """N preference pairs as right-padded int32 arrays [N, max_length]; masks are the truth."""

    chosen_ids: np.ndarray  # [N, L] int32, pad id after the sequence
    chosen_mask: np.ndarray  # [N, L] int32, 1 on real tokens (EOS included)
    rejected_ids: np.ndarray  # [N, L] int32
    rejected_mask: np.ndarray  # [N, L] int32
    margin: np.ndarray  # [N] float32, 0 where the data has none
    has_margin: bool  # whether any file had a 'margin' column
    subset: Optional[list]  # [N] str or None (no 'subset' column anywhere)
    prompt_lengths: np.ndarray  # [N] int32, prompt tokens kept (shared by chosen and rejected)
    stats: dict
    label: Optional[np.ndarray] = None  # [N] float32 P(chosen preferred), 1.0 where a row has none
    has_label: bool = False  # whether any file had a 'label' / 'probability' column

    def __len__(self):
        return int(self.chosen_ids.shape[0])

    def select(self, indices):
        """A PreferenceData holding only the given rows (e.g. a held-out split)."""
        indices = np.asarray(indices, dtype=np.int64)
        subset = None if self.subset is None else [self.subset[i] for i in indices]
        arrays = {k: getattr(self, k)[indices] for k in PAIR_KEYS + ("prompt_lengths",)}
        label = None if self.label is None else self.label[indices]
        return PreferenceData(
            **arrays,
            has_margin=self.has_margin,
            subset=subset,
            stats=dict(self.stats, pairs=len(indices)),
            label=label,
            has_label=self.has_label,
        )

    def batch_keys(self):
        """Keys of a batch: PAIR_KEYS, plus 'label' when the data has labels."""
        return PAIR_KEYS + ("label",) if self.label is not None else PAIR_KEYS


def _detect_format(file, rows, columns):
    """'explicit' | 'implicit' | 'conversational' from the columns and the first chosen value."""
    data_io.check_has_rows(file, rows)
    if "chosen" not in columns or "rejected" not in columns:
        raise ValueError(
            f"{file}: columns {sorted(columns)} are not a known preference layout; expected "
            f"'chosen' and 'rejected' (full texts: implicit prompt), plus 'prompt' (explicit "
            f"prompt), as strings or lists of {{role, content}} messages (conversational), "
            f"with optional 'margin' (number), 'subset' (string) and 'label' / 'probability' (number in [0, 1])"
        )
    first = next((r["chosen"] for r in data_io.readable_rows(rows) if r.get("chosen") is not None), None)
    if isinstance(first, (list, tuple)):
        return "conversational"
    return "explicit" if "prompt" in columns else "implicit"


def _parse_text_pair(row, *, explicit):
    prompt = data_io.expect_text(row, "prompt") if explicit else None
    expect = expect_response if explicit else data_io.expect_text  # implicit rows are full texts: never empty
    chosen, rejected = expect(row, "chosen"), expect(row, "rejected")
    if chosen == rejected:
        raise data_io.RowIssue("chosen", "identical", "identical to 'rejected'")
    return ("split", prompt, chosen, rejected) if explicit else ("joint", chosen, rejected)


def _parse_conversation(row, *, tokenizer, has_prompt):
    prompt = data_io.expect_messages(row, "prompt") if has_prompt else []
    chosen, rejected = data_io.expect_messages(row, "chosen"), data_io.expect_messages(row, "rejected")
    if chosen == rejected:
        raise data_io.RowIssue("chosen", "identical", "identical to 'rejected'")
    chosen, rejected = prompt + chosen, prompt + rejected
    if not has_prompt:  # the prompt is the common message prefix, leaving a message on each side
        k = min(data_io.common_prefix_length(chosen, rejected), len(chosen) - 1, len(rejected) - 1)
        prompt = chosen[:k]
    full_chosen = data_io.render_chat(tokenizer, chosen, add_generation_prompt=False)
    full_rejected = data_io.render_chat(tokenizer, rejected, add_generation_prompt=False)
    if not prompt:
        return ("split", "", full_chosen, full_rejected)
    # The generation prompt (e.g. '<|assistant|>\n') belongs to the prompt when it renders as
    # a prefix of both conversations; otherwise try without it, then split on tokens.
    for generation_prompt in (True, False):
        text = data_io.render_chat(tokenizer, prompt, add_generation_prompt=generation_prompt)
        if full_chosen.startswith(text) and full_rejected.startswith(text):
            return ("split", text, full_chosen[len(text) :], full_rejected[len(text) :])
    return ("joint", full_chosen, full_rejected)


LABEL_KEYS = ("label", "probability")


def _parse_label(row, label_key):
    """The row's label in [0, 1] (P(chosen preferred)); missing or null means 1.0."""
    value = row.get(label_key) if label_key else None
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise data_io.RowIssue(label_key, "wrong_type", f"expected a number in [0, 1], got {data_io.describe(value)}")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise data_io.RowIssue(
            label_key, "out_of_range", f"expected a number in [0, 1] (P(chosen preferred)), got {value}"
        )
    return float(value)


def _parse_extras(row, *, has_margin, has_subset):
    """(margin, subset) of one row. Both are optional per row: missing or null means the
    default, margin 0.0 (no margin) and subset '' (counted in the overall accuracy only)."""
    margin, subset = 0.0, ""
    if has_margin and row.get("margin") is not None:
        value = row.get("margin")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise data_io.RowIssue("margin", "wrong_type", f"expected a number, got {data_io.describe(value)}")
        if not math.isfinite(value):
            raise data_io.RowIssue("margin", "not_finite", f"expected a finite number, got {value}")
        margin = float(value)
    if has_subset and row.get("subset") is not None:
        value = row.get("subset")
        if not isinstance(value, str):
            raise data_io.RowIssue("subset", "wrong_type", f"expected a string, got {data_io.describe(value)}")
        subset = value
    return margin, subset


def _tokenize_pairs(parsed, tokenizer, eos):
    """[(prompt_ids, chosen_response_ids, rejected_response_ids)] for parsed pair specs."""
    split = [p for p in parsed if p[0] == "split"]
    joint = [p for p in parsed if p[0] == "joint"]
    split_ids = iter(zip(*(data_io.tokenize(tokenizer, [p[i] for p in split]) for i in (1, 2, 3))))
    joint_ids = iter(zip(*(data_io.tokenize(tokenizer, [p[i] for p in joint]) for i in (1, 2))))
    out = []
    for p in parsed:
        if p[0] == "split":
            prompt, chosen, rejected = next(split_ids)
        else:
            full_chosen, full_rejected = next(joint_ids)
            k = min(
                data_io.common_prefix_length(full_chosen, full_rejected), len(full_chosen) - 1, len(full_rejected) - 1
            )
            prompt, chosen, rejected = full_chosen[:k], full_chosen[k:], full_rejected[k:]
        with_eos = lambda ids: ids if ids and ids[-1] == eos else ids + [eos]  # noqa: E731
        out.append((prompt, with_eos(chosen), with_eos(rejected)))
    return out


def _pack_pairs(examples, *, max_length, max_prompt_length, pad, stats):
    """Truncates (prompt, chosen, rejected, margin, subset) examples into right-padded arrays."""
    out = {k: np.full((len(examples), max_length), pad, np.int32) for k in ("chosen_ids", "rejected_ids")}
    out.update({k: np.zeros((len(examples), max_length), np.int32) for k in ("chosen_mask", "rejected_mask")})
    margins, subsets, prompt_lengths, labels = [], [], [], []
    for prompt, chosen, rejected, margin, subset, label in examples:
        if max(len(chosen), len(rejected)) > max_length:
            chosen, rejected = chosen[:max_length], rejected[:max_length]
            if chosen == rejected:  # nothing left to compare
                stats["skipped"] += 1
                stats["skipped/identical_after_truncation"] = stats.get("skipped/identical_after_truncation", 0) + 1
                continue
            stats["truncated_response"] += 1
        # The prompt is shared so both responses are judged in the same context; it gives
        # way to the longer response, keeping its end (next to the response).
        keep = max(0, max_length - max(len(chosen), len(rejected)))
        keep = keep if max_prompt_length is None else min(keep, max_prompt_length)
        if keep < len(prompt):
            stats["truncated_prompt"] += 1
            prompt = prompt[len(prompt) - keep :]
        n = len(margins)
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            sequence = prompt + response
            out[f"{side}_ids"][n, : len(sequence)] = sequence
            out[f"{side}_mask"][n, : len(sequence)] = 1
        margins.append(margin)
        labels.append(label)
        subsets.append(subset)
        prompt_lengths.append(len(prompt))
    out = {k: v[: len(margins)] for k, v in out.items()}
    return dict(
        out,
        margin=np.asarray(margins, np.float32),
        prompt_lengths=np.asarray(prompt_lengths, np.int32),
        subset=subsets,
        label=np.asarray(labels, np.float32),
    )


def load_preference_data(
    files, tokenizer, *, max_length, on_bad_row="error", split="train", max_prompt_length=None
) -> PreferenceData:
    """Reads preference pairs from local files or hub datasets into padded token arrays.

    Args:
      files: a path / hub name ('name' or 'name:split'), or a list of them; files are read
        one by one so errors name the file and the 0-based row.
      tokenizer: a HF tokenizer (EOS required; pad falls back to EOS).
      max_length: length L of every sequence (prompt + response) in the result.
      on_bad_row: 'error' raises BadRowError at the first bad row; 'skip' drops bad rows and
        counts them as stats['skipped/<reason>'] (missing, wrong_type, empty, identical,
        not_finite, out_of_range (a label outside [0, 1]), unparseable: a line that is not JSON,
        not_object: JSON that is no object).
      split: split for hub names given without one.
      max_prompt_length: optional extra cap on prompt tokens (cut from the left).

    Returns:
      PreferenceData. stats: rows, pairs, skipped, skipped/<reason>, truncated_prompt,
      truncated_response, files, formats. Pairs whose responses become identical after
      truncation are always dropped (skipped/identical_after_truncation).
    """
    data_io.check_on_bad_row(on_bad_row)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    eos, pad = data_io.special_ids(tokenizer)
    stats = {
        "rows": 0,
        "pairs": 0,
        "skipped": 0,
        "truncated_prompt": 0,
        "truncated_response": 0,
        "files": [],
        "formats": [],
    }
    # examples: (prompt, chosen, rejected, margin, subset, label)
    examples, has_margin, has_subset, has_label = [], False, False, False
    for source in data_io.resolve_sources(files):
        rows, columns = data_io.read_table(source, split=split)
        fmt = _detect_format(source, rows, columns)
        stats["rows"] += len(rows)
        stats["files"].append(source)
        stats["formats"].append(fmt)
        file_margin, file_subset = "margin" in columns, "subset" in columns
        has_margin, has_subset = has_margin or file_margin, has_subset or file_subset
        present = [k for k in LABEL_KEYS if k in columns]
        if len(present) > 1:
            raise ValueError(
                f"{source}: has both 'label' and 'probability' columns; give one (both mean P(chosen preferred))"
            )
        label_key = present[0] if present else None
        has_label = has_label or label_key is not None

        if fmt == "conversational":
            parse_pair = functools.partial(_parse_conversation, tokenizer=tokenizer, has_prompt="prompt" in columns)
        else:
            parse_pair = functools.partial(_parse_text_pair, explicit=fmt == "explicit")

        def parse(row):
            extras = _parse_extras(row, has_margin=file_margin, has_subset=file_subset)
            return parse_pair(row), extras + (_parse_label(row, label_key),)

        good = data_io.parse_rows(source, rows, parse, on_bad_row=on_bad_row, stats=stats)
        token_triples = _tokenize_pairs([spec for _, (spec, _) in good], tokenizer, eos)
        for (index, (_, (margin, subset, label))), (prompt, chosen, rejected) in zip(good, token_triples):
            if chosen == rejected:  # different texts, same tokens (e.g. a normalising tokenizer)
                issue = data_io.RowIssue("chosen", "identical", "tokenises identically to 'rejected'")
                data_io.reject(source, index, issue, on_bad_row=on_bad_row, stats=stats)
                continue
            examples.append((prompt, chosen, rejected, margin, subset, label))

    arrays = _pack_pairs(examples, max_length=max_length, max_prompt_length=max_prompt_length, pad=pad, stats=stats)
    n = stats["pairs"] = len(arrays["margin"])
    if n == 0:
        raise ValueError(f"no usable preference pairs in {stats['files']} (stats: {stats})")
    subset, label = arrays.pop("subset"), arrays.pop("label")
    return PreferenceData(
        **arrays,
        has_margin=has_margin,
        subset=subset if has_subset else None,
        stats=stats,
        label=label if has_label else None,
        has_label=has_label,
    )


# ----------------------------------------------------------------------------- batching


def trim_to_bucket(batch: dict, bucket: int) -> dict:
    """Drop all-padding columns beyond the batch's longest sequence, rounded up to `bucket`.

    Keeps the number of distinct shapes (and so jit compilations) small while not paying
    for padding up to data.max_length on every batch.
    """
    if bucket <= 0:
        return batch
    longest = max(int(batch["chosen_mask"].sum(1).max()), int(batch["rejected_mask"].sum(1).max()))
    width = batch["chosen_ids"].shape[1]
    keep = min(width, -(-longest // bucket) * bucket)
    return {k: (v[:, :keep] if v.ndim == 2 else v) for k, v in batch.items()}


def train_batches(data: PreferenceData, *, batch_size, seed, start_step=0):
    """Endless (step, batch) for training; batch `s` depends only on (seed, s).

    Keys: chosen_ids, chosen_mask, rejected_ids, rejected_mask [B, L] int32; margin [B] float32;
    label [B] float32 when the data has labels.
    """
    keys = data.batch_keys()

    def make_batch(indices):
        return {k: getattr(data, k)[indices] for k in keys}

    return data_io.stepped_batches(len(data), make_batch, batch_size=batch_size, seed=seed, start_step=start_step)


def eval_batches(data: PreferenceData, *, batch_size) -> Iterator[dict[str, Any]]:
    """Sequential batches of exactly batch_size rows for evaluation.

    The last batch is filled with copies of row 0 marked `valid` = 0 so shapes (and jit
    traces) stay fixed while the padding rows still hold finite, real sequences. Keys: the
    training keys plus valid [B] int32 and index [B] int32 (row in `data`, -1 on padding).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(data)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        fill = batch_size - len(rows)
        indices = np.concatenate([rows, np.zeros(fill, np.int64)])
        batch = {k: getattr(data, k)[indices] for k in data.batch_keys()}
        batch["valid"] = np.concatenate([np.ones(len(rows), np.int32), np.zeros(fill, np.int32)])
        batch["index"] = np.concatenate([rows, np.full(fill, -1)]).astype(np.int32)
        yield batch
