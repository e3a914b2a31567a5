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
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, Optional

import numpy as np

from common.run_utils import looks_like_local_path

ON_BAD_ROW = ("error", "skip")
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PAIR_KEYS = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "margin")


class BadRowError(ValueError):
    """A data row that cannot be used; the message names file, 0-based row (and line) and key.

    `key` is None for a line that is not a JSON object at all (named by its 1-based `line`).
    """

    def __init__(self, file, row, key, reason, detail, *, line=None):
        self.file, self.row, self.key, self.reason, self.line = file, row, key, reason, line
        where = f"row {row} (0-based)" if line is None else f"row {row} (0-based, line {line})"
        what = f"key '{key}': {detail}" if key is not None else detail
        super().__init__(f"{file}: {where}: {what}")


class UnreadableRow:
    """Stands in `read_table`'s rows for a JSONL/JSON line that is not a JSON object.

    Bad-row policy applies to it like to any other bad row (`parse_rows`): 'error' names the
    file and line, 'skip' counts it as skipped/<reason> ('unparseable' or 'not_object')."""

    def __init__(self, line, reason, detail):
        self.line, self.reason, self.detail = line, reason, detail

    def get(self, key, default=None):  # rows are read with .get(); an unreadable row has no keys
        return default

    def __repr__(self):
        return f"UnreadableRow(line={self.line}, {self.reason}: {self.detail})"


class NoChatTemplate(ValueError):
    """Conversational rows with a tokenizer that has no chat template (a whole-file problem, never skipped)."""


class RowIssue(Exception):
    """Raised by row parsers; `parse_rows` adds file and row and applies the policy."""

    def __init__(self, key, reason, detail):
        super().__init__(detail)
        self.key, self.reason, self.detail = key, reason, detail


def check_on_bad_row(on_bad_row):
    """ValueError unless on_bad_row is 'error' or 'skip'."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")


def describe(value):
    """Short description of a bad value for error messages."""
    if value is None:
        return "None (key missing or null)"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}"


def expect_text(row, key):
    """The non-blank string in row[key], else RowIssue."""
    value = row.get(key)
    if value is None:
        raise RowIssue(key, "missing", f"expected a non-empty string or message list, got {describe(value)}")
    if not isinstance(value, str):
        raise RowIssue(key, "wrong_type", f"expected a non-empty string, got {describe(value)}")
    if not value.strip():
        raise RowIssue(key, "empty", f"expected a non-empty string, got {value!r}")
    return value


def expect_response(row, key):
    """The string in row[key], which may be empty: with an explicit prompt, an empty response is
    a policy that answered with EOS alone, a real outcome a reward model must rank. Else RowIssue."""
    value = row.get(key)
    if value is None:
        raise RowIssue(key, "missing", f"expected a string (may be empty after a prompt), got {describe(value)}")
    if not isinstance(value, str):
        raise RowIssue(key, "wrong_type", f"expected a string, got {describe(value)}")
    return value


def expect_messages(row, key):
    """row[key] as a clean list of {'role', 'content', ...} dicts, else RowIssue."""
    value = row.get(key)
    if value is None:
        raise RowIssue(key, "missing", f"expected a non-empty string or message list, got {describe(value)}")
    if not isinstance(value, (list, tuple)):
        raise RowIssue(key, "wrong_type", f"expected a list of {{role, content}} messages, got {describe(value)}")
    if not value:
        raise RowIssue(key, "empty", "expected a non-empty list of {role, content} messages, got []")
    messages = []
    for i, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise RowIssue(
                key,
                "wrong_type",
                f"message {i}: expected a dict with string 'role' and 'content', got {describe(message)}",
            )
        # datasets fills keys that other rows have with None; templates test `'k' in message`.
        messages.append({k: v for k, v in message.items() if v is not None})
    if not messages[-1]["content"].strip():
        raise RowIssue(key, "empty", f"message {len(messages) - 1}: the content is empty")
    return messages


# ----------------------------------------------------------------------------- reading


def resolve_sources(files):
    """A str/PathLike or a list of them -> list of str (non-empty)."""
    sources = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not sources:
        raise ValueError("files: expected a path, a hub dataset name, or a non-empty list of them")
    return [os.fspath(s) for s in sources]


def _json_rows(path):
    """(rows, columns) of a JSON Lines file, or of a .json file holding an array (or columns).

    Parsed here with Python's json, line by line, so one bad line is one bad row (an
    UnreadableRow naming the line) instead of a file datasets refuses whole. Keys missing
    from a row are simply absent (row.get(key) is None), never invented from other rows.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    document = None
    if path.lower().endswith(".json"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            document = None  # maybe JSON Lines in a .json file (datasets reads those too)
    if isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
        lengths = {len(v) for v in document.values()}
        if len(lengths) == 1:  # columnar: {"chosen": [...], "rejected": [...]}
            n = lengths.pop()
            document = [{k: v[i] for k, v in document.items()} for i in range(n)]
    if isinstance(document, list):
        items = [(i + 1, item, None) for i, item in enumerate(document)]  # 'line' = 1-based item
    elif document is not None:
        items = [(1, document, None)]
    else:
        items = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((number, json.loads(line), None))
            except json.JSONDecodeError as e:
                items.append((number, None, f"not valid JSON ({e.msg} at column {e.colno}): {line[:60]!r}"))
    rows, columns = [], {}
    for number, value, error in items:
        if error is not None:
            rows.append(UnreadableRow(number, "unparseable", error))
        elif not isinstance(value, dict):
            rows.append(
                UnreadableRow(
                    number, "not_object", f'expected a JSON object {{"key": value, ...}}, got {describe(value)}'
                )
            )
        else:
            rows.append(value)
            columns.update(dict.fromkeys(value))
    return rows, list(columns)


def read_table(source, *, split="train"):
    """Rows of one local file (.jsonl/.json/.parquet) or hub dataset ('name' or 'name:split').

    Returns (rows as a list of dicts, column names: the union over rows, first seen first).
    JSONL/JSON are parsed here line by line (a line that is not a JSON object becomes an
    `UnreadableRow`, a bad row like any other); Parquet and hub names go through
    `datasets.load_dataset`; `split` applies to hub names.
    """
    if os.path.exists(source):
        if os.path.isdir(source):
            raise ValueError(f"{source}: is a directory; pass the data files themselves")
        builder = LOCAL_BUILDERS.get(os.path.splitext(source)[1].lower())
        if builder is None:
            raise ValueError(f"{source}: unsupported file type; expected one of {sorted(LOCAL_BUILDERS)}")
        if builder == "json":
            try:
                return _json_rows(source)
            except UnicodeDecodeError as e:
                raise ValueError(f"{source}: not UTF-8 text ({e}); expected JSON Lines") from None
        import datasets  # heavy import, only when data is read

        try:
            ds = datasets.load_dataset(builder, data_files=source, split="train")
        except Exception as e:
            raise ValueError(f"{source}: could not be read as {builder}: {e.__cause__ or e}") from e
    else:
        if os.path.splitext(source)[1].lower() in LOCAL_BUILDERS:
            raise FileNotFoundError(f"{source}: no such file")
        import datasets

        name, _, name_split = source.partition(":")
        try:
            ds = datasets.load_dataset(name, split=name_split or split)
        except Exception as e:
            raise FileNotFoundError(
                f"{source!r} is not an existing file, and loading it as a hub dataset "
                f"(split {name_split or split!r}) failed (offline?): {e}"
            ) from e
    return ds.to_list(), list(ds.column_names)


def readable_rows(rows):
    """The rows that are dicts (UnreadableRow stand-ins left out), e.g. to detect a layout."""
    return [r for r in rows if not isinstance(r, UnreadableRow)]


def check_has_rows(file, rows):
    """ValueError unless `rows` holds at least one JSON object (names the first bad line)."""
    if not rows:
        raise ValueError(f"{file}: no rows")
    if not readable_rows(rows):
        raise ValueError(
            f"{file}: none of its {len(rows)} rows is a JSON object; line {rows[0].line}: {rows[0].detail}"
        )


def parse_rows(file, rows, parse_fn, *, on_bad_row, stats):
    """[(row index, parse_fn(row))] for the good rows; bad rows raise or are counted in stats."""
    good = []
    for index, row in enumerate(rows):
        if isinstance(row, UnreadableRow):
            issue = RowIssue(None, row.reason, row.detail)
            reject(file, index, issue, on_bad_row=on_bad_row, stats=stats, line=row.line)
            continue
        try:
            good.append((index, parse_fn(row)))
        except RowIssue as issue:
            reject(file, index, issue, on_bad_row=on_bad_row, stats=stats)
        except NoChatTemplate as e:
            raise NoChatTemplate(f"{file}: row {index} (0-based): {e}") from None
    return good


def reject(file, index, issue, *, on_bad_row, stats, line=None):
    """Applies the bad-row policy to one RowIssue."""
    if on_bad_row == "error":
        raise BadRowError(file, index, issue.key, issue.reason, issue.detail, line=line) from None
    stats["skipped"] += 1
    stats[f"skipped/{issue.reason}"] = stats.get(f"skipped/{issue.reason}", 0) + 1


# ----------------------------------------------------------------------------- tokens


TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")


def load_tokenizer(path, *, setting="model.tokenizer"):
    """AutoTokenizer from a local folder (or hub name online), never running remote code.

    Without a pad token, EOS pads (GPT-2/Pythia style); masks then tell padding from EOS.
    A missing folder, a folder without tokenizer files and a tokenizer that encodes text to
    nothing are refused by name (transformers would otherwise hand back an empty tokenizer),
    suggesting `setting` (the config field that names a tokenizer folder).
    """
    import transformers

    path = os.fspath(path)
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_VOCAB_FILES):
            raise FileNotFoundError(
                f"{path} has no tokenizer files (one of {', '.join(TOKENIZER_VOCAB_FILES)}): a checkpoint folder "
                f"saved without its tokenizer? Point config.{setting} at the tokenizer folder"
            )
    elif os.path.exists(path):
        raise NotADirectoryError(f"{path}: expected a tokenizer folder, got a file")
    elif looks_like_local_path(path):
        raise FileNotFoundError(f"{path} does not exist (expected a local folder with tokenizer files)")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"{path!r} is not a local folder, and loading it as a hub tokenizer failed "
            f"(offline?): {str(e).splitlines()[0]}"
        ) from e
    probe = tokenizer("Hello world 123", add_special_tokens=False)["input_ids"]
    if len(tokenizer) < 2 or not probe:
        raise ValueError(
            f'{path}: the tokenizer is empty ({len(tokenizer)} tokens; "Hello world 123" encodes to '
            f"{probe}): point config.{setting} at a real tokenizer folder"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{path}: tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def special_ids(tokenizer):
    """(eos_id, pad_id); pad falls back to EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no EOS token; responses must end with EOS")
    pad = tokenizer.pad_token_id
    return eos, eos if pad is None else pad


def tokenize(tokenizer, texts):
    """Token ids of each text, no special tokens added (those inside the text are kept)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def render_chat(tokenizer, messages, *, add_generation_prompt):
    """The chat template's text for `messages` (not tokenised); NoChatTemplate if there is none."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate(
            "conversational rows (lists of {role, content} messages) need a chat template, but the tokenizer has "
            "none: use a tokenizer with a chat_template (config.model.tokenizer / policy.tokenizer) or plain-text rows"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def common_prefix_length(a, b):
    """Number of leading items shared by sequences a and b."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


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
    check_has_rows(file, rows)
    if "chosen" not in columns or "rejected" not in columns:
        raise ValueError(
            f"{file}: columns {sorted(columns)} are not a known preference layout; expected "
            f"'chosen' and 'rejected' (full texts: implicit prompt), plus 'prompt' (explicit "
            f"prompt), as strings or lists of {{role, content}} messages (conversational), "
            f"with optional 'margin' (number), 'subset' (string) and 'label' / 'probability' (number in [0, 1])"
        )
    first = next((r["chosen"] for r in readable_rows(rows) if r.get("chosen") is not None), None)
    if isinstance(first, (list, tuple)):
        return "conversational"
    return "explicit" if "prompt" in columns else "implicit"


def _parse_text_pair(row, *, explicit):
    prompt = expect_text(row, "prompt") if explicit else None
    expect = expect_response if explicit else expect_text  # implicit rows are full texts: never empty
    chosen, rejected = expect(row, "chosen"), expect(row, "rejected")
    if chosen == rejected:
        raise RowIssue("chosen", "identical", "identical to 'rejected'")
    return ("split", prompt, chosen, rejected) if explicit else ("joint", chosen, rejected)


def _parse_conversation(row, *, tokenizer, has_prompt):
    prompt = expect_messages(row, "prompt") if has_prompt else []
    chosen, rejected = expect_messages(row, "chosen"), expect_messages(row, "rejected")
    if chosen == rejected:
        raise RowIssue("chosen", "identical", "identical to 'rejected'")
    chosen, rejected = prompt + chosen, prompt + rejected
    if not has_prompt:  # the prompt is the common message prefix, leaving a message on each side
        k = min(common_prefix_length(chosen, rejected), len(chosen) - 1, len(rejected) - 1)
        prompt = chosen[:k]
    full_chosen = render_chat(tokenizer, chosen, add_generation_prompt=False)
    full_rejected = render_chat(tokenizer, rejected, add_generation_prompt=False)
    if not prompt:
        return ("split", "", full_chosen, full_rejected)
    # The generation prompt (e.g. '<|assistant|>\n') belongs to the prompt when it renders as
    # a prefix of both conversations; otherwise try without it, then split on tokens.
    for generation_prompt in (True, False):
        text = render_chat(tokenizer, prompt, add_generation_prompt=generation_prompt)
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
        raise RowIssue(label_key, "wrong_type", f"expected a number in [0, 1], got {describe(value)}")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise RowIssue(label_key, "out_of_range", f"expected a number in [0, 1] (P(chosen preferred)), got {value}")
    return float(value)


def _parse_extras(row, *, has_margin, has_subset):
    """(margin, subset) of one row. Both are optional per row: missing or null means the
    default, margin 0.0 (no margin) and subset '' (counted in the overall accuracy only)."""
    margin, subset = 0.0, ""
    if has_margin and row.get("margin") is not None:
        value = row.get("margin")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RowIssue("margin", "wrong_type", f"expected a number, got {describe(value)}")
        if not math.isfinite(value):
            raise RowIssue("margin", "not_finite", f"expected a finite number, got {value}")
        margin = float(value)
    if has_subset and row.get("subset") is not None:
        value = row.get("subset")
        if not isinstance(value, str):
            raise RowIssue("subset", "wrong_type", f"expected a string, got {describe(value)}")
        subset = value
    return margin, subset


def _tokenize_pairs(parsed, tokenizer, eos):
    """[(prompt_ids, chosen_response_ids, rejected_response_ids)] for parsed pair specs."""
    split = [p for p in parsed if p[0] == "split"]
    joint = [p for p in parsed if p[0] == "joint"]
    split_ids = iter(zip(*(tokenize(tokenizer, [p[i] for p in split]) for i in (1, 2, 3))))
    joint_ids = iter(zip(*(tokenize(tokenizer, [p[i] for p in joint]) for i in (1, 2))))
    out = []
    for p in parsed:
        if p[0] == "split":
            prompt, chosen, rejected = next(split_ids)
        else:
            full_chosen, full_rejected = next(joint_ids)
            k = min(common_prefix_length(full_chosen, full_rejected), len(full_chosen) - 1, len(full_rejected) - 1)
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
    check_on_bad_row(on_bad_row)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    eos, pad = special_ids(tokenizer)
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
    for source in resolve_sources(files):
        rows, columns = read_table(source, split=split)
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

        good = parse_rows(source, rows, parse, on_bad_row=on_bad_row, stats=stats)
        token_triples = _tokenize_pairs([spec for _, (spec, _) in good], tokenizer, eos)
        for (index, (_, (margin, subset, label))), (prompt, chosen, rejected) in zip(good, token_triples):
            if chosen == rejected:  # different texts, same tokens (e.g. a normalising tokenizer)
                issue = RowIssue("chosen", "identical", "tokenises identically to 'rejected'")
                reject(source, index, issue, on_bad_row=on_bad_row, stats=stats)
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


@functools.lru_cache(maxsize=8)
def epoch_permutation(num_examples, seed, epoch):
    """The example order of one epoch: a permutation depending only on (seed, epoch)."""
    perm = np.random.default_rng((seed, epoch)).permutation(num_examples)
    perm.flags.writeable = False  # cached and shared between callers
    return perm


def batch_indices(num_examples, *, batch_size, seed, step):
    """Example indices [batch_size] of batch `step` in the stream of per-epoch permutations."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)  # [B] in the endless stream
    epochs = positions // num_examples
    indices = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):  # a batch can straddle two epochs
        where = epochs == epoch
        indices[where] = epoch_permutation(num_examples, seed, int(epoch))[positions[where] % num_examples]
    return indices


def stepped_batches(
    num_examples, make_batch: Callable[[np.ndarray], dict], *, batch_size, seed, start_step
) -> Iterator[tuple[int, dict]]:
    """Endless (step, make_batch(indices)) from start_step; validates eagerly."""
    if not 0 < batch_size <= num_examples:
        raise ValueError(f"batch_size must be in [1, {num_examples}] (the number of examples), got {batch_size}")
    if seed < 0 or start_step < 0:
        raise ValueError(f"seed and start_step must be >= 0, got seed={seed}, start_step={start_step}")

    def generate():
        step = start_step
        while True:
            yield step, make_batch(batch_indices(num_examples, batch_size=batch_size, seed=seed, step=step))
            step += 1

    return generate()


def train_batches(data: PreferenceData, *, batch_size, seed, start_step=0):
    """Endless (step, batch) for training; batch `s` depends only on (seed, s).

    Keys: chosen_ids, chosen_mask, rejected_ids, rejected_mask [B, L] int32; margin [B] float32;
    label [B] float32 when the data has labels.
    """
    keys = data.batch_keys()

    def make_batch(indices):
        return {k: getattr(data, k)[indices] for k in keys}

    return stepped_batches(len(data), make_batch, batch_size=batch_size, seed=seed, start_step=start_step)


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
