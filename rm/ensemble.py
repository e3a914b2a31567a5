"""Reward-model ensembles: conservative scoring objectives and WARM weight averaging.

  python -m rm.score --workdir A,B,C --data FILE --out OUT.jsonl --objective wco   (ensemble scores)
  python -m rm.ensemble --workdirs A,B,C --out W [--normalize_on FILES]            (WARM average)

Objectives over K members' scores of the same responses (Coste et al., ICLR 2024, "Reward
model ensembles help mitigate overoptimization"):

  mean   mean_k r_k
  wco    min_k r_k                           worst-case optimisation
  uwo    mean_k r_k - lambda * var_k r_k     uncertainty-weighted optimisation; var is the
                                            population variance over members (ddof = 0)

Members are combined on their *normalised* scores (each member's gain/bias: mean 0 / std 1
on its normalisation set), so one member's larger raw scale does not decide the minimum or
dominate the variance.

WARM (Rame et al., ICML 2024): members fine-tuned from one initialisation are averaged in
weight space, p = mean_k p_k, giving one reward model (`average_params`). That only makes
sense for full fine-tunes of the same architecture; LoRA members are refused (averaging A
and B separately is not averaging the update B A).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

OBJECTIVES = ("mean", "wco", "uwo")
ENSEMBLE_FILE = "ensemble.json"  # written by rm/ensemble_train.py: {'members': [relative dirs], 'seeds': [...]}


def member_workdirs(workdir: str) -> list[str]:
    """The RM workdirs a reward path stands for: an ensemble run's members (ensemble.json), else itself."""
    import json
    import os

    path = os.path.join(workdir, ENSEMBLE_FILE)
    if not os.path.exists(path):
        return [workdir]
    with open(path) as f:
        members = json.load(f).get("members")
    if not members:
        raise ValueError(f"{path}: expected a non-empty 'members' list of member workdirs")
    return [os.path.join(workdir, m) for m in members]


def expand_workdirs(workdirs) -> list[str]:
    """'A,B' or [A, B] (each an RM workdir, an exported folder or an ensemble run) -> member workdirs."""
    if isinstance(workdirs, str):
        workdirs = [w for w in workdirs.split(",") if w]
    return [m for w in workdirs for m in member_workdirs(w)]


def combine_scores(member_scores, *, objective: str = "mean", uwo_lambda: float = 1.0) -> np.ndarray:
    """Ensemble score of N responses from K members' scores.

    Args:
      member_scores: [K, N] scores (K >= 1 members, same responses in the same order).
      objective: 'mean', 'wco' (min over members) or 'uwo' (mean - uwo_lambda * var).
      uwo_lambda: weight of the variance in 'uwo' (>= 0).

    Returns:
      [N] float64 scores.
    """
    scores = np.asarray(member_scores, np.float64)  # [K, N]
    if scores.ndim != 2 or scores.shape[0] < 1:
        raise ValueError(f"rm/ensemble.py: member_scores must be [K, N] with K >= 1, got shape {scores.shape}")
    if objective not in OBJECTIVES:
        raise ValueError(f"rm/ensemble.py: objective={objective!r}; expected one of {OBJECTIVES}")
    if objective == "mean":
        return scores.mean(0)
    if objective == "wco":
        return scores.min(0)
    if not uwo_lambda >= 0:
        raise ValueError(f"rm/ensemble.py: uwo_lambda must be >= 0, got {uwo_lambda}")
    return scores.mean(0) - uwo_lambda * scores.var(0)


def combine_member_scores(member_scores, *, objective: str = "mean", uwo_lambda: float = 1.0):
    """`combine_scores` in JAX (jittable, float32), for scoring inside a jitted step (PPO's rollout).

    Args:
      member_scores: [K, B] normalised scores of the same B responses by K members.
      objective: 'mean', 'wco' or 'uwo' (static).
      uwo_lambda: variance weight of 'uwo' (static, >= 0).

    Returns:
      [B] float32 ensemble scores.
    """
    import jax.numpy as jnp

    if objective not in OBJECTIVES:
        raise ValueError(f"rm/ensemble.py: objective={objective!r}; expected one of {OBJECTIVES}")
    if not uwo_lambda >= 0:
        raise ValueError(f"rm/ensemble.py: uwo_lambda must be >= 0, got {uwo_lambda}")
    scores = jnp.asarray(member_scores, jnp.float32)  # [K, B]
    if objective == "mean":
        return jnp.mean(scores, axis=0)
    if objective == "wco":
        return jnp.min(scores, axis=0)
    return jnp.mean(scores, axis=0) - uwo_lambda * jnp.var(scores, axis=0)  # var: ddof = 0


def load_members(path: str, *, dtype: str = "float32", scan_layers: bool = False, mesh=None, rules=None) -> list:
    """The reward models a path stands for (`member_workdirs`), loaded: [LoadedRewardModel] of one
    architecture and tokenizer (an ensemble run's members, or one RM workdir / exported folder).
    scan_layers: loaded stacked (exported folders per shard, workdirs layer by layer; rm.model.load_reward_model).
    mesh (+ rules): every member's tensors straight onto their shardings (rm.model.load_reward_model)."""
    from rm.model import load_reward_model

    workdirs = member_workdirs(path)
    members = [load_reward_model(w, dtype=dtype, scan_layers=scan_layers, mesh=mesh, rules=rules) for w in workdirs]
    for workdir, member in zip(workdirs[1:], members[1:]):
        if member.config != members[0].config:
            raise ValueError(f"{workdir}: model config differs from {workdirs[0]}'s; ensemble members share one")
    return members


def average_params(member_params: Sequence) -> dict:
    """WARM: the element-wise mean of K parameter trees of the same structure and shapes (float32 mean)."""
    if not member_params:
        raise ValueError("rm/ensemble.py: average_params needs at least one member")
    structure = jax.tree.structure(member_params[0])
    for index, params in enumerate(member_params[1:], start=1):
        if jax.tree.structure(params) != structure:
            raise ValueError(
                f"rm/ensemble.py: member {index}'s parameter tree differs from member 0's; WARM "
                f"averages members of one architecture (fine-tuned from one initialisation)"
            )
        for a, b in zip(jax.tree.leaves(member_params[0]), jax.tree.leaves(params)):
            if np.shape(a) != np.shape(b):
                raise ValueError(
                    f"rm/ensemble.py: member {index} has a leaf of shape {np.shape(b)} where member 0 has {np.shape(a)}"
                )

    def mean(*leaves):
        dtype = np.asarray(leaves[0]).dtype
        return (sum(np.asarray(x, np.float32) for x in leaves) / len(leaves)).astype(dtype)

    return jax.tree.map(mean, *member_params)


# ----------------------------------------------------------------------------- WARM workdirs


def write_reward_workdir(
    workdir: str,
    config,
    params: dict,
    *,
    tokenizer_dir: str | None = None,
    config_json: str | None = None,
    normalization: dict | None = None,
    extra: dict | None = None,
    frozen: dict | None = None,
    step: int = 0,
) -> str:
    """Writes an RM workdir that `rm.model.load_reward_model`, rm.score and rm.export read.

    workdir/model_config.json, tokenizer/ (copied from tokenizer_dir), config.json (copied from
    config_json: rm.score reads data.max_length there), normalization.json and an Orbax checkpoint
    (at `step`) holding {'params': params} (plus {'frozen': frozen}, the frozen base of a LoRA / int8
    model, as rm/train.py writes it) with extra {'step', 'normalization', ...}.
    """
    import json
    import os
    import shutil

    from common.checkpoint import CheckpointManager
    from common.workdir import save_model_config

    os.makedirs(workdir, exist_ok=True)
    save_model_config(workdir, config)
    if tokenizer_dir:
        shutil.copytree(tokenizer_dir, os.path.join(workdir, "tokenizer"), dirs_exist_ok=True)
    if config_json:
        shutil.copyfile(config_json, os.path.join(workdir, "config.json"))
    normalization = normalization or {"gain": 1.0, "bias": 0.0, "source": "none"}
    with open(os.path.join(workdir, "normalization.json"), "w") as f:
        json.dump(normalization, f, indent=2)
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
    try:
        tree = {"params": params, "frozen": frozen} if frozen else {"params": params}
        ckpt.save(step, tree, dict(extra or {}, step=step, normalization=normalization), force=True)
    finally:
        ckpt.close()
    return workdir


def warm_average(workdirs: Sequence[str], out: str, *, normalize_on: str = "", batch_size: int = 32) -> dict:
    """WARM: averages the weights of K RM workdirs into a new RM workdir `out`.

    The members must be full fine-tunes (no LoRA / int8) of one architecture. The averaged
    model's normalisation is recomputed on `normalize_on` (preference files: chosen and rejected
    responses get mean 0 / std 1); without it gain 1 / bias 0 (members' gains do not carry over
    to the averaged weights). Returns the normalisation record.
    """
    import os

    from common import data_io
    from rm import data as rm_data
    from rm.evaluate import compute_normalization
    from rm.model import load_reward_model, score_arrays, training_max_length

    workdirs = expand_workdirs(list(workdirs))  # an ensemble run's workdir stands for its members
    if len(workdirs) < 2:
        raise ValueError(f"rm/ensemble.py: WARM needs at least two member workdirs, got {list(workdirs)}")
    members = [load_reward_model(w) for w in workdirs]
    for workdir, member in zip(workdirs, members):
        if member.config.lora_rank > 0 or member.config.quant:
            raise ValueError(
                f"{workdir}: a LoRA / int8 reward model; WARM averages full fine-tunes only "
                f"(averaging adapters A and B separately is not averaging their product)"
            )
        if member.config != members[0].config:
            raise ValueError(
                f"{workdir}: model config differs from {workdirs[0]}'s; WARM averages members of one architecture"
            )
    params = average_params([m.params for m in members])
    normalization = {"gain": 1.0, "bias": 0.0, "source": "none"}
    first = workdirs[0]
    if normalize_on:
        from rm.model import LoadedRewardModel

        tokenizer = data_io.load_tokenizer(members[0].tokenizer_path or first)
        data = rm_data.load_preference_data(normalize_on.split(","), tokenizer, max_length=training_max_length(first))
        averaged = LoadedRewardModel(config=members[0].config, params=params)
        rewards = np.concatenate(
            [
                score_arrays(averaged, data.chosen_ids, data.chosen_mask, batch_size=batch_size),
                score_arrays(averaged, data.rejected_ids, data.rejected_mask, batch_size=batch_size),
            ]
        )
        gain, bias = compute_normalization(rewards)
        normalization = {"gain": gain, "bias": bias, "source": normalize_on, "n": int(rewards.size)}
    config_json = os.path.join(first, "config.json")
    write_reward_workdir(
        out,
        members[0].config,
        params,
        tokenizer_dir=members[0].tokenizer_path,
        config_json=config_json if os.path.exists(config_json) else None,
        normalization=normalization,
        extra={"warm_members": list(workdirs)},
    )
    return normalization


def main(argv=None):
    """python -m rm.ensemble --workdirs A,B,C --out DIR [--normalize_on FILES]: WARM-average reward models."""
    import argparse

    from common.run_utils import exit_on_user_error

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument(
        "--workdirs", required=True, help="member RM workdirs, comma-separated, or an ensemble run's workdir"
    )
    ap.add_argument("--out", required=True, help="the averaged model's RM workdir (rm.score / rm.export read it)")
    ap.add_argument("--normalize_on", default="", help="preference files to recompute gain/bias on")
    args = ap.parse_args(argv)
    with exit_on_user_error("rm.ensemble"):
        normalization = warm_average(
            [w for w in args.workdirs.split(",") if w], args.out, normalize_on=args.normalize_on
        )
        print(f"WARM: averaged {args.workdirs} -> {args.out} (normalisation {normalization})")


if __name__ == "__main__":
    main()
