"""Tokenizers built locally with the chat formats of Qwen3, Gemma (2 and 3) and Phi-3 (tests only).

The templates reproduce what the released instruct tokenizers render for plain
system/user/assistant conversations (no tools, no images):

  qwen3   <|im_start|>{role}\\n{content}<|im_end|>\\n per message; the assistant turn after the
          last user message opens with an empty thinking block '<think>\\n\\n</think>\\n\\n'; the
          generation prompt is '<|im_start|>assistant\\n'.
  gemma   {bos}<start_of_turn>{user|model}\\n{content | trim}<end_of_turn>\\n; a system message is
          prepended to the first user turn followed by a blank line (Gemma 3's rule); the
          generation prompt is '<start_of_turn>model\\n'.
  phi3    <|{role}|>\\n{content}<|end|>\\n per message; the generation prompt is '<|assistant|>\\n',
          otherwise the template ends with the EOS token '<|endoftext|>'.

Each family's turn markers are added as special tokens so they encode as single ids, as in
the released vocabularies.
"""

from __future__ import annotations

import os

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.last_query_index == messages|length - 1 and message.role == 'user' %}"
    "{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and loop.index0 > ns.last_query_index and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# family -> (template, special tokens, eos, bos, pad)
CHAT_FORMATS = {
    "qwen3": (
        QWEN3_TEMPLATE,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        "<|im_end|>",
        None,
        "<|endoftext|>",
    ),
    "gemma": (
        GEMMA_TEMPLATE,
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<eos>",
        "<bos>",
        "<pad>",
    ),
    "phi3": (
        PHI3_TEMPLATE,
        ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "<|endoftext|>",
        "<s>",
        "<|endoftext|>",
    ),
}


def make_chat_tokenizer(out_dir, fmt: str, *, texts, vocab_size: int = 300) -> str:
    """A byte-level BPE tokenizer trained on `texts` with chat format `fmt` (CHAT_FORMATS), saved
    to out_dir as a HF tokenizer folder; returns out_dir."""
    template, specials, eos, bos, pad = CHAT_FORMATS[fmt]
    specials = specials + ([bos] if bos and bos not in specials else [])
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, bos_token=bos, pad_token=pad, model_max_length=1_000_000
    )
    hf_tok.chat_template = template
    hf_tok.save_pretrained(out_dir)
    return out_dir
