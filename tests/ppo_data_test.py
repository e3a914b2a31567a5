"""Tests for ppo/data.py: prompt files -> left-padded token arrays and deterministic batches."""

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
from ppo import data as ppo_data  # noqa: E402
from tests.fixtures import make_tiny_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = make_tiny_tokenizer(tmp_path_factory.mktemp("tok"), pad_is_eos=False)
    return transformers.AutoTokenizer.from_pretrained(path)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def check_left_padded(data, i, expected, *, pad):
    width = data.input_ids.shape[1]
    np.testing.assert_array_equal(data.input_ids[i], [pad] * (width - len(expected)) + expected)
    np.testing.assert_array_equal(data.attention_mask[i], [0] * (width - len(expected)) + [1] * len(expected))


def test_string_and_message_prompts_left_padded(tok, tmp_path):
    rows = [
        {"prompt": "Tell me a story.", "chosen": "ignored"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    ]
    data = ppo_data.load_prompts(write_jsonl(tmp_path / "p.jsonl", rows), tok, max_prompt_length=64)
    rendered = "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"  # the fixture's template, by hand
    assert data.texts == ["Tell me a story.", rendered]
    pad = tok.pad_token_id
    assert pad != tok.eos_token_id and data.input_ids.dtype == np.int32 and data.input_ids.shape == (2, 64)
    check_left_padded(data, 0, ids(tok, "Tell me a story."), pad=pad)
    check_left_padded(data, 1, ids(tok, rendered), pad=pad)
    assert len(data) == 2 and data.stats["rows"] == 2 and data.stats["prompts"] == 2
    assert data.stats["truncated_prompt"] == 0


def test_parquet_and_left_truncation(tok, tmp_path):
    long_prompt = "It was the best of times, it was the worst of times, it was the age of wisdom."
    path = str(tmp_path / "p.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": long_prompt}, {"prompt": "Hi."}]), path)
    width = 8
    assert len(ids(tok, long_prompt)) > width
    data = ppo_data.load_prompts(path, tok, max_prompt_length=width)
    check_left_padded(data, 0, ids(tok, long_prompt)[-width:], pad=tok.pad_token_id)  # keeps the end
    check_left_padded(data, 1, ids(tok, "Hi."), pad=tok.pad_token_id)
    assert data.stats["truncated_prompt"] == 1 and data.texts[0] == long_prompt


def test_bad_prompt_rows(tok, tmp_path):
    rows = [
        {"prompt": "Good one."},
        {"prompt": 3},
        {"prompt": "  "},
        {"other": "x"},
        {"prompt": [{"role": "user"}]},
        {"prompt": "Another."},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(data_io.BadRowError, match=r"p\.jsonl: row 1 \(0-based\): key 'prompt': .*got int 3"):
        ppo_data.load_prompts(path, tok, max_prompt_length=16)
    data = ppo_data.load_prompts(path, tok, max_prompt_length=16, on_bad_row="skip")
    assert data.texts == ["Good one.", "Another."]
    assert data.stats["skipped"] == 4 and data.stats["skipped/wrong_type"] == 2
    assert data.stats["skipped/empty"] == 1 and data.stats["skipped/missing"] == 1
    with pytest.raises(ValueError, match="on_bad_row"):
        ppo_data.load_prompts(path, tok, max_prompt_length=16, on_bad_row="drop")
    no_prompt = write_jsonl(tmp_path / "np.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match=r"np\.jsonl: columns \['chosen', 'rejected'\] have no 'prompt'"):
        ppo_data.load_prompts(no_prompt, tok, max_prompt_length=16)


def test_prompt_batches_deterministic_and_resumable():
    n, batch_size, seed = 7, 3, 11
    rows = np.repeat(np.arange(n, dtype=np.int32)[:, None], 5, axis=1)
    data = ppo_data.PromptData(
        input_ids=rows, attention_mask=np.ones_like(rows), texts=[str(i) for i in range(n)], stats={}
    )
    fresh = ppo_data.prompt_batches(data, batch_size=batch_size, seed=seed)
    first = [next(fresh) for _ in range(6)]
    stream = np.concatenate([np.random.default_rng((seed, e)).permutation(n) for e in range(3)])
    for step, batch in first:
        expected = stream[step * batch_size : (step + 1) * batch_size]
        np.testing.assert_array_equal(batch["input_ids"][:, 0], expected)
        np.testing.assert_array_equal(batch["index"], expected)
    for k in (2, 4):
        step, batch = next(ppo_data.prompt_batches(data, batch_size=batch_size, seed=seed, start_step=k))
        assert step == k
        np.testing.assert_array_equal(batch["input_ids"], first[k][1]["input_ids"])
    with pytest.raises(ValueError, match="batch_size"):
        ppo_data.prompt_batches(data, batch_size=8, seed=seed)
