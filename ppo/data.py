"""Prompts for PPO -> fixed-shape, LEFT-padded token arrays and deterministic batches.

Each row needs a 'prompt': a string (used as is) or a list of {role, content} messages
(rendered with the tokenizer's chat template and add_generation_prompt=True, so the
policy continues with the assistant turn). Other columns are ignored, so preference
files in the explicit or conversational layout double as prompt files.

Prompts are left-padded because generation appends tokens on the right: every row's
last prompt token then sits in the same column. No special tokens are added beyond what
a chat template renders. Over-long prompts keep their last max_prompt_length tokens
(counted in stats['truncated_prompt']). Reading, bad-row policy and batching are shared
with rm/data.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from common import data_io


@dataclasses.dataclass
class PromptData:
    """N prompts as left-padded int32 arrays [N, max_prompt_length]."""

    input_ids: np.ndarray  # [N, P] int32, pad id before the prompt
    attention_mask: np.ndarray  # [N, P] int32, 1 on prompt tokens
    texts: list  # [N] prompt strings as rendered (before truncation)
    stats: dict

    def __len__(self):
        return int(self.input_ids.shape[0])


def _parse_prompt(row, *, tokenizer):
    value = row.get("prompt")
    if isinstance(value, (list, tuple)):
        messages = data_io.expect_messages(row, "prompt")
        return data_io.render_chat(tokenizer, messages, add_generation_prompt=True)
    return data_io.expect_text(row, "prompt")


def load_prompts(files, tokenizer, *, max_prompt_length, on_bad_row="error", split="train") -> PromptData:
    """Reads prompts from local files (.jsonl/.json/.parquet) or hub datasets.

    Args:
      files: a path / hub name ('name' or 'name:split'), or a list of them.
      tokenizer: a HF tokenizer (pad falls back to EOS; the mask tells padding apart).
      max_prompt_length: width P of the result; longer prompts are cut from the left.
      on_bad_row: 'error' raises rm.data.BadRowError naming file, 0-based row and key;
        'skip' drops bad rows and counts them as stats['skipped/<reason>'] (a JSONL line that
        does not parse is one bad row: 'unparseable'; the rest of the file is read).
      split: split for hub names given without one.

    Returns:
      PromptData with stats: rows, prompts, skipped, skipped/<reason>, truncated_prompt, files.
    """
    data_io.check_on_bad_row(on_bad_row)
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    _, pad = data_io.special_ids(tokenizer)
    stats = {"rows": 0, "prompts": 0, "skipped": 0, "truncated_prompt": 0, "files": []}
    texts = []
    for source in data_io.resolve_sources(files):
        rows, columns = data_io.read_table(source, split=split)
        data_io.check_has_rows(source, rows)
        if "prompt" not in columns:
            raise ValueError(
                f"{source}: columns {sorted(columns)} have no 'prompt'; expected a 'prompt' column "
                f"holding strings or lists of {{role, content}} messages"
            )
        stats["rows"] += len(rows)
        stats["files"].append(source)
        parse = lambda row: _parse_prompt(row, tokenizer=tokenizer)  # noqa: E731
        texts += [text for _, text in data_io.parse_rows(source, rows, parse, on_bad_row=on_bad_row, stats=stats)]

    if not texts:
        raise ValueError(f"no usable prompts in {stats['files']} (stats: {stats})")
    input_ids = np.full((len(texts), max_prompt_length), pad, np.int32)
    attention_mask = np.zeros((len(texts), max_prompt_length), np.int32)
    for i, ids in enumerate(data_io.tokenize(tokenizer, texts)):
        if len(ids) > max_prompt_length:
            stats["truncated_prompt"] += 1
            ids = ids[len(ids) - max_prompt_length :]  # keep the end, next to the response
        if ids:
            input_ids[i, -len(ids) :] = ids
            attention_mask[i, -len(ids) :] = 1
    stats["prompts"] = len(texts)
    return PromptData(input_ids=input_ids, attention_mask=attention_mask, texts=texts, stats=stats)


def prompt_batches(data: PromptData, *, batch_size, seed, start_step=0):
    """Endless (step, batch) of prompts; batch `s` depends only on (seed, s).

    Same per-epoch permutation scheme as rm.data.train_batches. Batch keys: input_ids and
    attention_mask ([B, P] int32) and index ([B] int32, rows of `data`, e.g. for data.texts).
    """

    def make_batch(indices):
        return {
            "input_ids": data.input_ids[indices],
            "attention_mask": data.attention_mask[indices],
            "index": indices.astype(np.int32),
        }

    return data_io.stepped_batches(len(data), make_batch, batch_size=batch_size, seed=seed, start_step=start_step)
