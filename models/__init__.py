"""The transformer, its heads, Hugging Face checkpoint I/O, sampling, LoRA, quantisation, sharding."""
