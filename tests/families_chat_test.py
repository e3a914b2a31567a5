"""Conversational preference rows rendered with the Qwen3, Gemma and Phi-3 chat formats: the
token arrays the reward-model reader builds decode to the strings written out by hand below,
and the prompt / response split falls right after each format's generation prompt."""

import numpy as np
import pytest

from common import data_io
from rm import data as rm_data
from tests.chat_templates import make_chat_tokenizer
from tests.rm_data_gen import corpus, write_jsonl

ROW = {
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Review: the film"}],
    "chosen": [{"role": "assistant", "content": "great film"}],
    "rejected": [{"role": "assistant", "content": "awful plot"}],
}

# fmt -> (prompt as rendered with the generation prompt, the chosen response after it, EOS the reader appends)
EXPECTED = {
    "qwen3": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nReview: the film<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<think>\n\n</think>\n\ngreat film<|im_end|>\n",
        "<|im_end|>",
    ),
    "gemma": (
        "<bos><start_of_turn>user\nBe brief.\n\nReview: the film<end_of_turn>\n<start_of_turn>model\n",
        "great film<end_of_turn>\n",
        "<eos>",
    ),
    "phi3": (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nReview: the film<|end|>\n<|assistant|>\n",
        "great film<|end|>\n<|endoftext|>",
        "",
    ),  # the template already ends with EOS
}


@pytest.mark.parametrize("fmt", list(EXPECTED))
def test_conversational_rows_render_in_the_family_format(tmp_path, fmt):
    tok = data_io.load_tokenizer(make_chat_tokenizer(tmp_path / "tok", fmt, texts=corpus()))
    prompt, chosen, eos = EXPECTED[fmt]
    assert data_io.render_chat(tok, ROW["prompt"], add_generation_prompt=True) == prompt  # PPO / SFT prompts
    data = rm_data.load_preference_data([write_jsonl(tmp_path / "rows.jsonl", [ROW])], tok, max_length=96)
    n, k = int(data.chosen_mask[0].sum()), int(data.prompt_lengths[0])
    ids = data.chosen_ids[0, :n].tolist()
    assert tok.decode(ids[:k], skip_special_tokens=False) == prompt
    assert tok.decode(ids[k:], skip_special_tokens=False) == chosen + eos
    rejected = data.rejected_ids[0, : int(data.rejected_mask[0].sum())].tolist()
    assert rejected[:k] == ids[:k]  # the prompt is shared token for token
    assert "awful plot" in tok.decode(rejected[k:])
    # Turn markers are single special tokens, as in the released vocabularies.
    marker = {"qwen3": "<|im_start|>", "gemma": "<start_of_turn>", "phi3": "<|assistant|>"}[fmt]
    assert ids.count(tok.convert_tokens_to_ids(marker)) == prompt.count(marker) + chosen.count(marker)
    assert np.all(data.chosen_mask[0, n:] == 0)
