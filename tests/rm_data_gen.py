"""Synthetic preference data with a learnable rule, for reward-model tests.

Rule: the chosen response contains more 'good' words than the rejected one.
"""

import json

import numpy as np

GOOD = ["great", "lovely", "superb", "wonderful", "excellent"]
BAD = ["awful", "boring", "terrible", "dull", "poor"]
NEUTRAL = ["the", "film", "was", "a", "story", "with", "actors", "and", "music", "plot", "scenes", "it"]


def response(rng, n_good, length=8):
    words = list(rng.choice(NEUTRAL, size=length - n_good)) + list(rng.choice(GOOD, size=n_good))
    rng.shuffle(words)
    return " " + " ".join(words)


def make_rows(n, seed, fmt="explicit"):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        prompt = "Review: " + " ".join(rng.choice(NEUTRAL, size=4))
        good_n = int(rng.integers(2, 4))
        chosen = response(rng, good_n)
        rejected = response(rng, 0)
        if rng.random() < 0.5:
            rejected = rejected.replace(" the ", " " + str(rng.choice(BAD)) + " ", 1)
        if fmt == "explicit":
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        elif fmt == "implicit":
            rows.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
        else:
            p = [{"role": "user", "content": prompt}]
            rows.append(
                {
                    "prompt": p,
                    "chosen": [{"role": "assistant", "content": chosen.strip()}],
                    "rejected": [{"role": "assistant", "content": rejected.strip()}],
                }
            )
    return rows


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def corpus():
    """Text to train a tokenizer that knows the words above."""
    words = GOOD + BAD + NEUTRAL + ["Review:"]
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=12)) for _ in range(300)]


def make_tiny_policy(d):
    """A tokenizer trained on `corpus()` (d/tok) and a tiny random GPT-2 causal LM using it (d/hf),
    saved as a Hugging Face folder. Returns the model folder's path."""
    from transformers import AutoTokenizer

    from tests.fixtures import make_tiny_tokenizer
    from tests.hf_fixtures import make_tiny_hf_model

    tok_dir = make_tiny_tokenizer(str(d / "tok"), texts=corpus(), vocab_size=300)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    make_tiny_hf_model(
        "gpt2",
        str(d / "hf"),
        tokenizer_dir=tok_dir,
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return str(d / "hf")
