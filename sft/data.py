"""Supervised fine-tuning data -> right-padded token arrays with a loss mask, and batches.

Row layouts (TRL's), recognised per file from its columns (extra columns are ignored):
  text               {'text': str}                              loss on every token
  prompt-completion  {'prompt': str, 'completion': str}         loss on the completion only
                     (or both as lists of {role, content}: the prompt is rendered with the
                     chat template and add_generation_prompt=True, the completion is the
                     rest of the rendered conversation)
  conversational     {'messages': [{role, content}, ...]}       loss on the assistant turns

Every example ends with EOS (appended unless the tokens already end with it), and EOS is a
target whenever the last segment is one, so the model learns to stop. No other special
token is added (chat templates bring their own). Conversations are cut into segments at
the chat template's turn boundaries: before assistant turn i the text of messages[:i]
rendered with add_generation_prompt=True, after it the text of messages[:i+1]; assistant
text (including the template's end-of-turn markup) is a target, the rest is context. Each
segment is tokenised on its own, so masks follow the boundaries exactly. A template whose
partial renderings are not prefixes of the whole conversation makes the row bad.

`loss_mask[i, t] = 1` marks token t of row i as a target, predicted from tokens < t, so
position 0 is never a target. Over-long examples keep their first max_length tokens
(counted as stats['truncated']); those left with no target token are dropped
(stats['skipped/no_targets_after_truncation']). Reading, the bad-row policy and the
(seed, step)-deterministic batching are shared with rm/data.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

from common import data_io

ARRAY_KEYS = ("input_ids", "attention_mask", "loss_mask")
FORMATS = ("text", "prompt_completion", "conversational")


@dataclasses.dataclass
class SFTData:
    """N examples as right-padded int32 arrays [N, max_length]; masks are the truth."""

    input_ids: np.ndarray  # [N, L] int32, pad id after the sequence
    attention_mask: np.ndarray  # [N, L] int32, 1 on real tokens (EOS included)
    loss_mask: np.ndarray  # [N, L] int32, 1 where the token is a target (never column 0)
    stats: dict

    def __len__(self):
        return int(self.input_ids.shape[0])

    def select(self, indices) -> SFTData:
        """An SFTData holding only the given rows (e.g. a held-out split)."""
        indices = np.asarray(indices, dtype=np.int64)
        arrays = {k: getattr(self, k)[indices] for k in ARRAY_KEYS}
        stats = dict(
            self.stats,
            examples=len(indices),
            target_tokens=int(arrays["loss_mask"].sum()),
            tokens=int(arrays["attention_mask"].sum()),
        )
        return SFTData(**arrays, stats=stats)


def detect_format(file, rows, columns) -> str:
    """'text' | 'prompt_completion' | 'conversational' from a file's columns."""
    data_io.check_has_rows(file, rows)
    if "messages" in columns:
        return "conversational"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    raise ValueError(
        f"{file}: columns {sorted(columns)} are not a known SFT layout; expected 'text' (loss on all "
        f"tokens), 'prompt' + 'completion' (loss on the completion; strings or {{role, content}} message "
        f"lists) or 'messages' (a list of {{role, content}} messages; loss on the assistant turns)"
    )


# ----------------------------------------------------------------------------- rows -> text segments
# A parsed row is a list of (text, is_target) segments whose concatenation is the example.


def _parse_text(row):
    return [(data_io.expect_text(row, "text"), True)]


def _parse_prompt_completion(row, *, tokenizer):
    if isinstance(row.get("prompt"), (list, tuple)) or isinstance(row.get("completion"), (list, tuple)):
        prompt = data_io.expect_messages(row, "prompt")
        completion = data_io.expect_messages(row, "completion")
        prompt_text = data_io.render_chat(tokenizer, prompt, add_generation_prompt=True)
        full = data_io.render_chat(tokenizer, prompt + completion, add_generation_prompt=False)
        if not full.startswith(prompt_text):
            raise data_io.RowIssue(
                "completion",
                "template",
                "the chat template does not render the prompt as a prefix of prompt + completion, "
                "so the completion tokens cannot be told apart",
            )
        return [(prompt_text, False), (full[len(prompt_text) :], True)]
    return [(data_io.expect_text(row, "prompt"), False), (data_io.expect_text(row, "completion"), True)]


def _parse_messages(row, *, tokenizer):
    messages = data_io.expect_messages(row, "messages")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        roles = [m["role"] for m in messages]
        raise data_io.RowIssue(
            "messages",
            "no_assistant",
            f"expected at least one message with role 'assistant' (the targets), got roles {roles}",
        )
    full = data_io.render_chat(tokenizer, messages, add_generation_prompt=False)
    # Character offsets where targets start and end, checked to be prefixes of `full`.
    bounds, position = [], 0
    for i in turns:
        start = data_io.render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        end = data_io.render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(start) and full.startswith(end) and position <= len(start) < len(end)):
            raise data_io.RowIssue(
                "messages",
                "template",
                f"message {i}: the chat template does not render the conversation up to this "
                f"assistant turn as a prefix of the whole, so its tokens cannot be told apart",
            )
        bounds.append((len(start), len(end)))
        position = len(end)
    segments, position = [], 0
    for start, end in bounds:
        segments += [(full[position:start], False), (full[start:end], True)]
        position = end
    segments.append((full[position:], False))
    return [s for s in segments if s[0]]


# ----------------------------------------------------------------------------- tokens


def _tokenize_examples(parsed, tokenizer, eos):
    """[(ids, targets)] for lists of (text, is_target) segments; EOS appended."""
    texts = [text for segments in parsed for text, _ in segments]
    flat = iter(data_io.tokenize(tokenizer, texts))
    out = []
    for segments in parsed:
        ids, targets = [], []
        for _, is_target in segments:
            piece = next(flat)
            ids += piece
            targets += [is_target] * len(piece)
        if not ids or ids[-1] != eos:
            ids.append(eos)
            targets.append(bool(targets) and targets[-1])
        targets[0] = False  # nothing predicts the first token
        out.append((ids, targets))
    return out


def load_sft_data(files, tokenizer, *, max_length, on_bad_row="error", split="train") -> SFTData:
    """Reads SFT examples from local files (or hub datasets) into padded token arrays.

    Args:
      files: a path / hub name ('name' or 'name:split'), or a list of them; files are read
        one by one so errors name the file and the 0-based row.
      tokenizer: a HF tokenizer (EOS required; pad falls back to EOS).
      max_length: length L of every sequence in the result; longer ones keep their start.
      on_bad_row: 'error' raises rm.data.BadRowError at the first bad row (file, row, key);
        'skip' drops bad rows and counts them as stats['skipped/<reason>'] (missing,
        wrong_type, empty, no_assistant, template, no_targets, unparseable, not_object).
      split: split for hub names given without one.

    Returns:
      SFTData. stats: rows, examples, skipped, skipped/<reason>, truncated, tokens,
      target_tokens, files, formats.
    """
    data_io.check_on_bad_row(on_bad_row)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    eos, pad = data_io.special_ids(tokenizer)
    stats = {
        "rows": 0,
        "examples": 0,
        "skipped": 0,
        "truncated": 0,
        "tokens": 0,
        "target_tokens": 0,
        "files": [],
        "formats": [],
    }
    examples = []  # (ids, targets)
    parsers = {
        "text": _parse_text,
        "prompt_completion": functools.partial(_parse_prompt_completion, tokenizer=tokenizer),
        "conversational": functools.partial(_parse_messages, tokenizer=tokenizer),
    }
    for source in data_io.resolve_sources(files):
        rows, columns = data_io.read_table(source, split=split)
        fmt = detect_format(source, rows, columns)
        stats["rows"] += len(rows)
        stats["files"].append(source)
        stats["formats"].append(fmt)
        good = data_io.parse_rows(source, rows, parsers[fmt], on_bad_row=on_bad_row, stats=stats)
        for (index, _), (ids, targets) in zip(good, _tokenize_examples([g for _, g in good], tokenizer, eos)):
            if not any(targets):  # e.g. a completion that tokenises to nothing
                key = {"text": "text", "prompt_completion": "completion"}.get(fmt, "messages")
                issue = data_io.RowIssue(key, "no_targets", "no target token left after tokenisation")
                data_io.reject(source, index, issue, on_bad_row=on_bad_row, stats=stats)
                continue
            examples.append((ids, targets))

    n = len(examples)
    input_ids = np.full((n, max_length), pad, np.int32)
    attention_mask = np.zeros((n, max_length), np.int32)
    loss_mask = np.zeros((n, max_length), np.int32)
    kept = 0
    for ids, targets in examples:
        if len(ids) > max_length:
            ids, targets = ids[:max_length], targets[:max_length]
            if not any(targets):  # the prompt alone fills max_length
                stats["skipped"] += 1
                stats["skipped/no_targets_after_truncation"] = stats.get("skipped/no_targets_after_truncation", 0) + 1
                continue
            stats["truncated"] += 1
        input_ids[kept, : len(ids)] = ids
        attention_mask[kept, : len(ids)] = 1
        loss_mask[kept, : len(ids)] = targets
        kept += 1
    input_ids, attention_mask, loss_mask = input_ids[:kept], attention_mask[:kept], loss_mask[:kept]
    stats.update(examples=kept, tokens=int(attention_mask.sum()), target_tokens=int(loss_mask.sum()))
    if kept == 0:
        raise ValueError(f"no usable SFT examples in {stats['files']} (stats: {stats})")
    return SFTData(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask, stats=stats)


def split_heldout(data: SFTData, *, fraction, seed) -> tuple[SFTData, SFTData]:
    """(train, held-out) split of `data`: a seeded random `fraction` of rows (at least 1) held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n = len(data)
    n_eval = max(1, int(round(n * fraction)))
    if n_eval >= n:
        raise ValueError(f"holding out {fraction} of {n} examples leaves none to train on")
    perm = np.random.default_rng((seed, 0x5F7)).permutation(n)
    return data.select(np.sort(perm[n_eval:])), data.select(np.sort(perm[:n_eval]))


# ----------------------------------------------------------------------------- batching


def train_batches(data: SFTData, *, batch_size, seed, start_step=0) -> Iterator[tuple[int, dict]]:
    """Endless (step, batch) for training; batch `s` depends only on (seed, s).

    Keys: input_ids, attention_mask, loss_mask [B, L] int32.
    """

    def make_batch(indices):
        return {k: getattr(data, k)[indices] for k in ARRAY_KEYS}

    return data_io.stepped_batches(len(data), make_batch, batch_size=batch_size, seed=seed, start_step=start_step)


def eval_batches(data: SFTData, *, batch_size) -> Iterator[dict[str, Any]]:
    """Sequential batches of exactly batch_size rows for evaluation.

    The last batch is filled with copies of row 0 marked `valid` = 0 and with a zero
    loss_mask, so shapes (and jit traces) stay fixed and padding rows add no loss. Keys:
    the training keys plus valid [B] int32 and index [B] int32 (row in `data`, -1 on padding).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(data)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        fill = batch_size - len(rows)
        indices = np.concatenate([rows, np.zeros(fill, np.int64)])
        valid = np.concatenate([np.ones(len(rows), np.int32), np.zeros(fill, np.int32)])
        batch = {k: getattr(data, k)[indices] for k in ARRAY_KEYS}
        batch["loss_mask"] = batch["loss_mask"] * valid[:, None]
        batch["valid"] = valid
        batch["index"] = np.concatenate([rows, np.full(fill, -1)]).astype(np.int32)
        yield batch
