"""Tests for rm/data.py: TRL preference formats -> padded token arrays, bad rows, batching.

Expected token ids are built independently: the tokenizer is called on the prompt and
response texts (or on hand-written chat-template text) and EOS is appended by hand.
"""

import copy
import json
import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hf_datasets_cache_"))

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402

from common import data_io  # noqa: E402
from rm import data as rm_data  # noqa: E402
from tests.fixtures import make_tiny_tokenizer  # noqa: E402

EXPLICIT = [
    {"prompt": "Human: What is the capital of France? Assistant:", "chosen": " Paris.", "rejected": " London."},
    {"prompt": "Tell me a story.", "chosen": " Once upon a time there was a dragon.", "rejected": " No."},
    {"prompt": "Count to three.", "chosen": " 1, 2, 3", "rejected": " 1, 2"},
]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    # datasets reads HF_DATASETS_CACHE at import; another test module may have imported it first.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return transformers.AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tok_pad(tmp_path_factory):
    path = make_tiny_tokenizer(tmp_path_factory.mktemp("tok_pad"), pad_is_eos=False)
    return transformers.AutoTokenizer.from_pretrained(path)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def check_row(data, i, side, expected, *, pad):
    """Row i of data.<side>_ids equals `expected`, right-padded with `pad`; mask marks it."""
    length = data.chosen_ids.shape[1]
    np.testing.assert_array_equal(getattr(data, f"{side}_ids")[i], expected + [pad] * (length - len(expected)))
    np.testing.assert_array_equal(
        getattr(data, f"{side}_mask")[i], [1] * len(expected) + [0] * (length - len(expected))
    )


@pytest.mark.parametrize("file_type", ["jsonl", "json", "parquet"])
def test_explicit_prompt_all_file_types(tok_pad, tmp_path, file_type):
    path = tmp_path / f"train.{file_type}"
    if file_type == "jsonl":
        write_jsonl(path, EXPLICIT)
    elif file_type == "json":
        path.write_text(json.dumps(EXPLICIT))
    else:
        pq.write_table(pa.Table.from_pylist(EXPLICIT), str(path))
    data = rm_data.load_preference_data(str(path), tok_pad, max_length=64)
    eos, pad = tok_pad.eos_token_id, tok_pad.pad_token_id
    assert pad != eos and data.chosen_ids.dtype == np.int32 and data.chosen_ids.shape == (3, 64)
    for i, row in enumerate(EXPLICIT):
        prompt = ids(tok_pad, row["prompt"])
        check_row(data, i, "chosen", prompt + ids(tok_pad, row["chosen"]) + [eos], pad=pad)
        check_row(data, i, "rejected", prompt + ids(tok_pad, row["rejected"]) + [eos], pad=pad)
        assert data.prompt_lengths[i] == len(prompt)
    assert len(data) == 3 and not data.has_margin and data.subset is None
    np.testing.assert_array_equal(data.margin, np.zeros(3, np.float32))
    assert data.stats["rows"] == 3 and data.stats["pairs"] == 3 and data.stats["skipped"] == 0
    assert data.stats["files"] == [str(path)] and data.stats["formats"] == ["explicit"]


def test_pad_equals_eos_masks_and_existing_eos(tok, tmp_path):
    rows = [{"prompt": "Hi.", "chosen": " Hello there.<|endoftext|>", "rejected": " Go away."}]
    data = rm_data.load_preference_data(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_length=16)
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    chosen = ids(tok, "Hi.") + ids(tok, " Hello there.")  # the text's own EOS, not a second one
    rejected = ids(tok, "Hi.") + ids(tok, " Go away.")
    check_row(data, 0, "chosen", chosen + [eos], pad=eos)
    check_row(data, 0, "rejected", rejected + [eos], pad=eos)
    # Padding and the final EOS share an id; only the mask says where the sequence ends.
    assert data.chosen_mask[0].sum() == len(chosen) + 1
    assert data.chosen_ids[0, len(chosen)] == eos and data.chosen_ids[0, -1] == eos


def test_implicit_prompt_common_token_prefix(tok, tmp_path):
    rows = [
        {
            "chosen": "Human: How do I boil an egg? Assistant: Put it in boiling water.",
            "rejected": "Human: How do I boil an egg? Assistant: I do not know.",
        },
        # One text is a prefix of the other: the shorter keeps its last token as the response.
        {"chosen": "The cat sat on the mat.", "rejected": "The cat sat on the mat"},
    ]
    data = rm_data.load_preference_data(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_length=64)
    eos = tok.eos_token_id
    for i, row in enumerate(rows):
        full_c, full_r = ids(tok, row["chosen"]), ids(tok, row["rejected"])
        k = 0
        while k < min(len(full_c), len(full_r)) - 1 and full_c[k] == full_r[k]:
            k += 1
        check_row(data, i, "chosen", full_c + [eos], pad=eos)
        check_row(data, i, "rejected", full_r + [eos], pad=eos)
        assert data.prompt_lengths[i] == k
    # The shared prompt of the first row decodes to the dialogue up to the answers.
    prompt_text = tok.decode(data.chosen_ids[0, : data.prompt_lengths[0]])
    assert "Human: How do I boil an egg? Assistant:" in prompt_text and "Put" not in prompt_text
    assert data.prompt_lengths[1] == len(ids(tok, rows[1]["rejected"])) - 1
    assert data.stats["formats"] == ["implicit"]


def test_conversational_with_and_without_prompt_column(tok, tmp_path):
    user = {"role": "user", "content": "What is the capital of France?"}
    good = {"role": "assistant", "content": "Paris."}
    bad = {"role": "assistant", "content": "London."}
    with_prompt = write_jsonl(tmp_path / "a.jsonl", [{"prompt": [user], "chosen": [good], "rejected": [bad]}])
    without = write_jsonl(tmp_path / "b.jsonl", [{"chosen": [user, good], "rejected": [user, bad], "extra": 1}])
    data = rm_data.load_preference_data([with_prompt, without], tok, max_length=64, on_bad_row="skip")
    eos = tok.eos_token_id
    # Hand-written rendering of the fixture's chat template.
    prompt = ids(tok, "<|user|>\nWhat is the capital of France?\n<|assistant|>\n")
    assert tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True) == (
        "<|user|>\nWhat is the capital of France?\n<|assistant|>\n"
    )
    for i in range(2):
        check_row(data, i, "chosen", prompt + ids(tok, "Paris.\n") + [eos], pad=eos)
        check_row(data, i, "rejected", prompt + ids(tok, "London.\n") + [eos], pad=eos)
        assert data.prompt_lengths[i] == len(prompt)
    assert data.stats["formats"] == ["conversational", "conversational"] and data.stats["pairs"] == 2


def test_conversational_multi_turn_common_prefix(tok, tmp_path):
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Tell me a story"},
    ]
    rows = [
        {
            "chosen": turns + [{"role": "assistant", "content": "Once upon a time."}],
            "rejected": turns + [{"role": "assistant", "content": "No."}],
        }
    ]
    data = rm_data.load_preference_data(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_length=80)
    prompt = ids(tok, "<|user|>\nHi\n<|assistant|>\nHello\n<|user|>\nTell me a story\n<|assistant|>\n")
    eos = tok.eos_token_id
    check_row(data, 0, "chosen", prompt + ids(tok, "Once upon a time.\n") + [eos], pad=eos)
    check_row(data, 0, "rejected", prompt + ids(tok, "No.\n") + [eos], pad=eos)


def test_margin_and_subset_columns(tok, tmp_path):
    rows = [dict(r, margin=m, subset=s) for r, m, s in zip(EXPLICIT, [1.5, 0, -2], ["chat", "code", "chat"])]
    plain = write_jsonl(tmp_path / "plain.jsonl", EXPLICIT[:1])
    data = rm_data.load_preference_data([write_jsonl(tmp_path / "m.jsonl", rows), plain], tok, max_length=64)
    assert data.has_margin and data.margin.dtype == np.float32
    np.testing.assert_array_equal(data.margin, [1.5, 0.0, -2.0, 0.0])  # 0 for the file without margins
    assert data.subset == ["chat", "code", "chat", ""]
    picked = data.select([2, 0])
    np.testing.assert_array_equal(picked.chosen_ids, data.chosen_ids[[2, 0]])
    assert picked.subset == ["chat", "chat"] and len(picked) == 2


def test_truncation_keeps_responses(tok, tmp_path):
    long_prompt = "It was the best of times, it was the worst of times, it was the age of wisdom."
    rows = [
        {"prompt": long_prompt, "chosen": " Yes indeed.", "rejected": " No."},
        {"prompt": "Hi.", "chosen": " The river ran fast and cold after the long winter rains.", "rejected": " Ok"},
        {"prompt": "Hi.", "chosen": " Fine.", "rejected": " Ok"},
    ]
    max_length = 20
    eos = tok.eos_token_id
    chosen0, rejected0 = ids(tok, " Yes indeed.") + [eos], ids(tok, " No.") + [eos]
    long1 = ids(tok, rows[1]["chosen"]) + [eos]
    assert len(ids(tok, long_prompt)) > max_length and len(long1) > max_length
    data = rm_data.load_preference_data(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_length=max_length)
    keep = max_length - len(chosen0)  # the shared prompt gives way to the longer response
    prompt0 = ids(tok, long_prompt)[-keep:]
    check_row(data, 0, "chosen", prompt0 + chosen0, pad=eos)
    check_row(data, 0, "rejected", prompt0 + rejected0, pad=eos)
    # A response longer than max_length alone: no prompt, first max_length tokens.
    check_row(data, 1, "chosen", long1[:max_length], pad=eos)
    check_row(data, 1, "rejected", ids(tok, " Ok") + [eos], pad=eos)
    assert list(data.prompt_lengths) == [keep, 0, len(ids(tok, "Hi."))]
    assert data.stats["truncated_prompt"] == 2 and data.stats["truncated_response"] == 1
    # max_prompt_length caps the prompt further.
    capped = rm_data.load_preference_data(str(tmp_path / "d.jsonl"), tok, max_length=max_length, max_prompt_length=2)
    check_row(capped, 0, "chosen", ids(tok, long_prompt)[-2:] + chosen0, pad=eos)
    assert capped.stats["truncated_prompt"] == 3


BAD_ROWS = [  # (replacement for row 2, key, reason, text expected in the message)
    ({"prompt": "p", "rejected": "r"}, "chosen", "missing", "got None"),
    ({"prompt": "p", "chosen": None, "rejected": "r"}, "chosen", "missing", "got None"),
    ({"prompt": "p", "chosen": 7, "rejected": "r"}, "chosen", "wrong_type", "got int 7"),
    ({"prompt": "p", "chosen": "c", "rejected": 5}, "rejected", "wrong_type", "expected a string, got int 5"),
    ({"prompt": "", "chosen": "c", "rejected": "r"}, "prompt", "empty", "non-empty string"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen", "identical", "identical to 'rejected'"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}, "margin", "wrong_type", "expected a number"),
    # (A null margin is no longer a bad row: optional columns are per row, null = default 0; issue 15.)
]


def _with_bad_row(bad):
    rows = [dict(r) for r in EXPLICIT] + [dict(EXPLICIT[0])]
    if "margin" in bad:  # the file has a margin column; the good rows hold valid margins
        rows = [dict(r, margin=1.0) for r in rows]
    rows[2] = bad
    return rows


@pytest.mark.parametrize("bad, key, reason, text", BAD_ROWS)
def test_bad_rows_error_and_skip(tok, tmp_path, bad, key, reason, text):
    path = write_jsonl(tmp_path / "train.jsonl", _with_bad_row(bad))
    with pytest.raises(data_io.BadRowError) as info:
        rm_data.load_preference_data(path, tok, max_length=64)
    message = str(info.value)
    assert message.startswith(f"{path}: row 2 (0-based): key '{key}':") and text in message, message
    assert isinstance(info.value, ValueError) and info.value.reason == reason
    data = rm_data.load_preference_data(path, tok, max_length=64, on_bad_row="skip")
    assert data.stats["skipped"] == 1 and data.stats[f"skipped/{reason}"] == 1
    assert data.stats["rows"] == 4 and data.stats["pairs"] == 3
    for i, row in zip(range(3), [EXPLICIT[0], EXPLICIT[1], EXPLICIT[0]]):  # good rows, in order
        check_row(
            data,
            i,
            "chosen",
            ids(tok, row["prompt"]) + ids(tok, row["chosen"]) + [tok.eos_token_id],
            pad=tok.eos_token_id,
        )


def test_empty_response_after_prompt_is_eos_alone(tok_pad, tmp_path):
    # Explicit prompt: an empty (or blank) response is a policy that stopped at once: prompt + EOS.
    rows = [
        {"prompt": "Hi there.", "chosen": "Hello.", "rejected": ""},
        {"prompt": "Hi there.", "chosen": " ", "rejected": "Go away."},
    ]
    data = rm_data.load_preference_data(write_jsonl(tmp_path / "e.jsonl", rows), tok_pad, max_length=64)
    eos, pad = tok_pad.eos_token_id, tok_pad.pad_token_id
    assert data.stats["pairs"] == 2 and data.stats["skipped"] == 0
    check_row(data, 0, "rejected", ids(tok_pad, "Hi there.") + [eos], pad=pad)
    check_row(data, 1, "chosen", ids(tok_pad, "Hi there.") + ids(tok_pad, " ") + [eos], pad=pad)
    # Implicit prompt (full texts): an empty text is still an error naming the row and key.
    path = write_jsonl(
        tmp_path / "i.jsonl",
        [{"chosen": "Hi. Hello.", "rejected": "Hi. Bye."}, {"chosen": "Hi. Hello.", "rejected": ""}],
    )
    with pytest.raises(data_io.BadRowError, match=r"i.jsonl: row 1 \(0-based\): key 'rejected': expected a non-empty"):
        rm_data.load_preference_data(path, tok_pad, max_length=64)


def test_bad_conversational_rows(tok, tmp_path):
    user = {"role": "user", "content": "Hi"}
    rows = [
        {"chosen": [user, {"role": "assistant", "content": "Hello"}], "rejected": [user, {"role": "assistant"}]},
        {"chosen": [user, {"role": "assistant", "content": "Hello"}], "rejected": "Bye"},
        {
            "chosen": [user, {"role": "assistant", "content": "Hello"}],
            "rejected": [user, {"role": "assistant", "content": "Bye"}],
        },
    ]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(data_io.BadRowError, match=r"row 0 \(0-based\): key 'rejected': message 1: expected a dict"):
        rm_data.load_preference_data(path, tok, max_length=64)
    data = rm_data.load_preference_data(path, tok, max_length=64, on_bad_row="skip")
    assert data.stats["skipped/wrong_type"] == 2 and len(data) == 1


def test_skip_counts_several_reasons_across_files(tok, tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", EXPLICIT)
    second = write_jsonl(
        tmp_path / "b.jsonl",
        [
            EXPLICIT[0],
            {"prompt": "p", "chosen": "x", "rejected": "x"},
            {"prompt": "p", "chosen": 5, "rejected": "r"},
            {"prompt": "p", "chosen": "c", "rejected": "r"},
        ],
    )
    with pytest.raises(data_io.BadRowError, match=r"b\.jsonl: row 1 \(0-based\)"):
        rm_data.load_preference_data([first, second], tok, max_length=64)
    data = rm_data.load_preference_data([first, second], tok, max_length=64, on_bad_row="skip")
    assert data.stats["rows"] == 7 and data.stats["pairs"] == 5 and data.stats["skipped"] == 2
    assert data.stats["skipped/identical"] == 1 and data.stats["skipped/wrong_type"] == 1


def test_file_level_errors(tok, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", EXPLICIT)
    with pytest.raises(ValueError, match="on_bad_row"):
        rm_data.load_preference_data(good, tok, max_length=64, on_bad_row="ignore")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: no rows"):
        rm_data.load_preference_data(str(tmp_path / "empty.jsonl"), tok, max_length=64)
    other = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "c", "label": True}])
    with pytest.raises(ValueError, match=r"kto.jsonl: columns \['completion', 'label', 'prompt'\].*'chosen'"):
        rm_data.load_preference_data(other, tok, max_length=64)
    (tmp_path / "broken.jsonl").write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": "a", rejected\n')
    # An unparseable line is a bad row (issue 15), named by file, row and line.
    with pytest.raises(ValueError, match=r"broken.jsonl: row 1 \(0-based, line 2\): not valid JSON"):
        rm_data.load_preference_data(str(tmp_path / "broken.jsonl"), tok, max_length=64)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        rm_data.load_preference_data(str(tmp_path / "missing.jsonl"), tok, max_length=64)
    with pytest.raises(FileNotFoundError, match="hub dataset"):  # offline: a hub name cannot load
        rm_data.load_preference_data("nobody/no-such-dataset:test", tok, max_length=64)
    only_bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    with pytest.raises(ValueError, match="no usable preference pairs"):
        rm_data.load_preference_data(only_bad, tok, max_length=64, on_bad_row="skip")


def test_load_tokenizer_sets_pad_to_eos(tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path / "a"))
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path / "nopad"))
    loaded = data_io.load_tokenizer(str(tmp_path / "nopad"))
    assert loaded.pad_token_id == loaded.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")


def _toy_data(n, length=4):
    """PreferenceData whose row i holds the value i everywhere (to track rows through batches)."""
    rows = np.repeat(np.arange(n, dtype=np.int32)[:, None], length, axis=1)
    return rm_data.PreferenceData(
        chosen_ids=rows,
        chosen_mask=np.ones_like(rows),
        rejected_ids=rows + 100,
        rejected_mask=np.ones_like(rows),
        margin=np.arange(n, dtype=np.float32),
        has_margin=True,
        subset=None,
        prompt_lengths=np.zeros(n, np.int32),
        stats={},
    )


def test_train_batches_deterministic_and_resumable():
    n, batch_size, seed = 10, 4, 3
    data = _toy_data(n)
    fresh = rm_data.train_batches(data, batch_size=batch_size, seed=seed)
    first = [next(fresh) for _ in range(8)]
    assert [step for step, _ in first] == list(range(8))
    assert set(first[0][1]) == {"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "margin"}
    # Independent reference: the stream of per-epoch permutations, cut into batches.
    stream = np.concatenate([np.random.default_rng((seed, e)).permutation(n) for e in range(4)])
    for step, batch in first:
        expected = stream[step * batch_size : (step + 1) * batch_size]
        np.testing.assert_array_equal(batch["chosen_ids"][:, 0], expected)
        np.testing.assert_array_equal(batch["rejected_ids"][:, 0], expected + 100)
        np.testing.assert_array_equal(batch["margin"], expected.astype(np.float32))
    # Resume at step k == the k-th batch of a fresh iterator.
    for k in (0, 3, 5):
        step, batch = next(rm_data.train_batches(data, batch_size=batch_size, seed=seed, start_step=k))
        assert step == k
        for key in batch:
            np.testing.assert_array_equal(batch[key], first[k][1][key])
    other = next(rm_data.train_batches(data, batch_size=batch_size, seed=seed + 1))[1]
    assert not np.array_equal(other["chosen_ids"], first[0][1]["chosen_ids"])
    with pytest.raises(ValueError, match="batch_size"):
        rm_data.train_batches(data, batch_size=11, seed=0)


def test_eval_batches_pad_last_batch():
    data = _toy_data(5)
    batches = list(rm_data.eval_batches(data, batch_size=2))
    assert len(batches) == 3 and all(b["chosen_ids"].shape == (2, 4) for b in batches)
    np.testing.assert_array_equal([b["valid"] for b in batches], [[1, 1], [1, 1], [1, 0]])
    np.testing.assert_array_equal([b["index"] for b in batches], [[0, 1], [2, 3], [4, -1]])
    valid_rows = np.concatenate([b["chosen_ids"][b["valid"] == 1, 0] for b in batches])
    np.testing.assert_array_equal(valid_rows, np.arange(5))
    assert batches[-1]["chosen_mask"][1].sum() == 4  # padding row is a finite, real sequence


def test_conversational_template_fallback_splits_on_tokens(tok, tmp_path):
    # A template that marks the final turn renders the prompt differently from the same
    # turns inside the full conversation, so the prompt is found as a common token prefix.
    odd = copy.deepcopy(tok)
    odd.chat_template = (
        "{% for m in messages %}{% if loop.last %}[END]{% endif %}<|{{ m['role'] }}|>\n"
        "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    user = {"role": "user", "content": "Hi"}
    rows = [
        {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "assistant", "content": "Bye"}],
        }
    ]
    data = rm_data.load_preference_data(write_jsonl(tmp_path / "d.jsonl", rows), odd, max_length=64)
    eos = tok.eos_token_id
    full_c, full_r = (
        ids(tok, "<|user|>\nHi\n[END]<|assistant|>\nHello\n"),
        ids(tok, "<|user|>\nHi\n[END]<|assistant|>\nBye\n"),
    )
    check_row(data, 0, "chosen", full_c + [eos], pad=eos)
    check_row(data, 0, "rejected", full_r + [eos], pad=eos)
    k = next(i for i, (a, b) in enumerate(zip(full_c, full_r)) if a != b)
    assert data.prompt_lengths[0] == k
