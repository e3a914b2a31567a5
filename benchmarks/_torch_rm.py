"""The PyTorch side of `benchmarks/rm_throughput.py`: a plain eager PyTorch reward-model step and
TRL's RewardTrainer, each run in its own worker process on the shared weights and batches."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from benchmarks._rm_bench import (
    LEARNING_RATE,
    N_DISTINCT_BATCHES,
    VOCAB,
    WARMUP_STEPS,
    batch_at,
    load_pairs,
    now,
    pairs_per_batch,
    tokens_in,
)


def _torch_setup():
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.manual_seed(0)
    return torch


def _load_torch_model(directory: str):
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32)
    model.config.pad_token_id = 0
    return model


def worker_torch(directory: str, steps: int) -> dict:
    """Plain eager PyTorch step: forward [2B, T] (T = the batch's longest), BT loss, backward, clip, fused AdamW."""
    torch = _torch_setup()
    pairs = load_pairs(directory)
    model = _load_torch_model(directory)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0, fused=True)
    batches = []
    for s in range(N_DISTINCT_BATCHES):
        b = batch_at(pairs, s)
        mask = np.concatenate([b["chosen_mask"], b["rejected_mask"]])  # [2B, T]
        width = int(mask.sum(axis=1).max())  # padded to the batch's longest row, as a collator does
        ids = np.concatenate([b["chosen_ids"], b["rejected_ids"]])[:, :width]
        batches.append((torch.from_numpy(ids).long(), torch.from_numpy(mask[:, :width]).long()))

    def step(s):
        ids, mask = batches[s % N_DISTINCT_BATCHES]
        rewards = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.squeeze(-1)  # [2B]
        chosen, rejected = rewards.chunk(2)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    first_loss = float(step(0).detach())
    for s in range(1, WARMUP_STEPS):
        step(s)
    t0 = now()
    for s in range(WARMUP_STEPS, WARMUP_STEPS + steps):
        step(s)
    t1 = now()
    return {
        "seconds": t1[0] - t0[0],
        "cpu_seconds": t1[1] - t0[1],
        "steps": steps,
        "tokens": tokens_in(pairs, WARMUP_STEPS, steps),
        "first_loss": first_loss,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def worker_trl(directory: str, steps: int, gradient_checkpointing: bool | None) -> dict:
    """trl.RewardTrainer.train() on pre-tokenized pairs; None = RewardConfig's default."""
    torch = _torch_setup()
    import datasets
    import tokenizers
    import transformers
    import trl

    pairs = load_pairs(directory)
    n_steps = WARMUP_STEPS + steps
    rows = [batch_at(pairs, s) for s in range(n_steps)]
    chosen = [list(map(int, ids[m > 0])) for b in rows for ids, m in zip(b["chosen_ids"], b["chosen_mask"])]
    rejected = [list(map(int, ids[m > 0])) for b in rows for ids, m in zip(b["rejected_ids"], b["rejected_mask"])]
    dataset = datasets.Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected})
    # A word-level tokenizer whose id 0 is the pad/eos token: TRL only needs it for pad_token_id.
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t1")),
        pad_token="t0",
        eos_token="t0",
    )

    ends, begins, first_loss = [], [], []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(now())

    class Trainer(trl.RewardTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not first_loss:
                first_loss.append(float((out[0] if return_outputs else out).detach()))
            return out

    kw = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
    with tempfile.TemporaryDirectory() as out_dir:
        args = trl.RewardConfig(
            output_dir=out_dir,
            max_steps=n_steps,
            per_device_train_batch_size=pairs_per_batch(pairs),
            learning_rate=LEARNING_RATE,
            max_length=int(pairs["chosen_ids"].shape[1]),
            bf16=False,
            fp16=False,
            use_cpu=True,
            report_to="none",
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            train_sampling_strategy="sequential",
            seed=0,
            **kw,
        )
        trainer = Trainer(
            model=_load_torch_model(directory),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[Timer()],
        )
        trainer.train()
    if len(ends) != n_steps:
        raise RuntimeError(f"TRL ran {len(ends)} optimizer steps, expected {n_steps}")
    compute = [e[0] - b for b, e in zip(begins[WARMUP_STEPS:], ends[WARMUP_STEPS:])]
    return {
        "seconds": ends[-1][0] - ends[WARMUP_STEPS - 1][0],
        "cpu_seconds": ends[-1][1] - ends[WARMUP_STEPS - 1][1],
        "steps": steps,
        "tokens": tokens_in(pairs, WARMUP_STEPS, steps),
        "first_loss": first_loss[0],
        "compute_only_seconds": sum(compute),
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "model_is_gradient_checkpointing": _is_checkpointing(trainer.model),
        "optim": str(args.optim),
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }


def _is_checkpointing(model) -> bool:
    """Whether the torch model recomputes activations (the attribute was renamed in transformers 5)."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False
