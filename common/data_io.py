"""Data I/O every trainer shares: reading tables, bad-row handling, tokenizers, stepped batches.

Tables: local JSONL/JSON (parsed here line by line, so a bad line is one bad row) and Parquet
or hub datasets through `datasets`. Row parsers raise `RowIssue`; `parse_rows` names the file,
row (and line) and key in a `BadRowError` (on_bad_row='error') or counts the row as
skipped/<reason> ('skip'). Training batches depend only on (seed, step): one permutation per
epoch, np.random.default_rng((seed, epoch)), so resuming needs only the step.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator

import numpy as np

from common.run_utils import looks_like_local_path

ON_BAD_ROW = ("error", "skip")
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


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


def split_files(value) -> list[str]:
    """'a.jsonl,b.jsonl' or a list -> list of paths (empty string -> [])."""
    if not value:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


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
