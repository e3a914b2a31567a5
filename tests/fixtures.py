"""Shared test fixtures: a tiny byte-level BPE tokenizer trained locally.

Nothing here downloads anything. Tests that need a Hugging Face tokenizer folder call
`make_tiny_tokenizer(tmp_path / "tok")` and load it back with
`transformers.AutoTokenizer.from_pretrained`; tiny models built on top of it use
`vocab_size = len(tokenizer)`.
"""

import os

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"

# A simple chat template: each turn is "<|role|>\n{content}\n"; with
# add_generation_prompt the assistant header is appended so the model continues it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Default training text: a few hundred words of plain English-ish sentences, enough for
# the BPE trainer to learn common merges (" the", "ing", ...).
DEFAULT_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A reward model scores a response given a prompt.",
    "The policy writes a summary and the reward model reads it.",
    "Human: What is the capital of France? Assistant: The capital of France is Paris.",
    "Human: How do I boil an egg? Assistant: Put the egg in boiling water for ten minutes.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "Training a model takes data, compute, patience and a good learning rate.",
    "The cat sat on the mat while the dog slept in the sun near the door.",
    "Please summarise the following text in one short sentence.",
    "I think the first answer is more helpful than the second one.",
    "The weather today is sunny with a light breeze from the west.",
    "Numbers like 1, 2, 3, 42 and 100 appear in many sentences.",
    "Reading books is a pleasant way to spend a quiet evening at home.",
    "The assistant should be helpful, honest and harmless in every answer.",
    "Tell me a story about a dragon who learned to cook pancakes.",
    "Once upon a time there was a small village at the edge of a forest.",
    "The river ran fast and cold after the long winter rains.",
    "Can you explain why the sky is blue? Light is scattered by the air.",
    "Good morning! How are you doing today? I am doing well, thank you.",
]


def make_tiny_tokenizer(out_dir, *, texts=None, vocab_size=300, pad_is_eos=True):
    """Trains a tiny byte-level BPE tokenizer and saves it as a HF tokenizer folder.

    Args:
      out_dir: folder to write (created if needed).
      texts: training sentences; defaults to `DEFAULT_TEXTS` (repeated a few times).
      vocab_size: BPE vocabulary size including the 256 byte symbols and specials.
      pad_is_eos: if True the pad token is the EOS token (as in GPT-2/Pythia
        checkpoints); otherwise a separate '<pad>' token is added.

    Returns:
      `out_dir` as a string, loadable with `transformers.AutoTokenizer.from_pretrained`.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    texts = list(texts) if texts is not None else DEFAULT_TEXTS * 3
    special_tokens = [EOS_TOKEN] if pad_is_eos else [EOS_TOKEN, PAD_TOKEN]

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=special_tokens,
        # Every byte is in the vocabulary, so any text (any language, emoji) encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN if pad_is_eos else PAD_TOKEN,
        model_max_length=1_000_000,  # no truncation warnings for long test texts
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out_dir)
    return out_dir
