"""Supervised fine-tuning: the causal LM that the reward model and the PPO policy start from.

Modules:
  data.py    SFT datasets (text, prompt-completion, conversational) -> padded tokens + loss mask
  train.py   train(config, workdir); next-token loss (next_token_loss, next_token_nll)
  export.py  export to a Hugging Face AutoModelForCausalLM folder (also written to workdir/hf)
"""
