"""Which policy-optimisation algorithm a PPO-trainer run uses: config.algo + config.rollout, resolved.

One rollout engine and one update serve them all; the algorithm decides
  * the advantage estimator (`algo.advantage`): 'gae' (PPO with a value model) or a critic-free
    one of ppo/advantages.py ('rloo', 'grpo', 'dr_grpo', 'reinforce_pp', 'reinforce_baseline'),
    which holds no value model at all (no params, no optimizer state, nothing checkpointed);
  * where the KL to the reference goes (`algo.kl_placement`): 'in_reward' (-beta kl_t per token,
    PPO and REINFORCE++) or 'in_loss' (beta * k3 averaged as the policy loss is, GRPO); 'auto'
    = in_loss for grpo / dr_grpo, in_reward otherwise. Both work with the fixed and adaptive
    controllers: beta is an input of the rollout and (in the loss) read from the rollout batch;
  * the policy loss: clip range (clip_eps_low / clip_eps_high, DAPO clip-higher), dual clip,
    and the loss aggregation (ppo/objectives.py); 'auto' = seq_mean_token_mean for grpo,
    seq_mean_token_sum_norm for dr_grpo, token_mean otherwise;
  * K samples per prompt (`rollout.samples_per_prompt`): each prompt of an iteration is repeated
    K times (np.repeat: one prompt's group is K consecutive rows) and train.batch_size counts
    rollouts, so budgets match across K.

Minibatch shuffling with K > 1 permutes whole groups, not members (`minibatch_order`): a
minibatch then holds complete groups, so each optimizer step sees all K contrasting samples of a
prompt (for rloo / dr_grpo their advantages sum to zero over the group, and the step's gradient
is the group-centred one). The advantages themselves are computed once over the whole rollout
batch in the rollout, so no estimator is wrong with member shuffling; keeping groups is the lower-
variance choice. With K = 1 the order is exactly PPO's row permutation.

With the defaults (gae, KL in the reward, symmetric clip, no dual clip, token_mean, K = 1)
`resolve` returns `variant=None` and the trainer runs today's PPO loss unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ppo import advantages as A
from ppo import losses as L
from ppo import objectives as O

KL_PLACEMENTS = ("auto", "in_reward", "in_loss")


@dataclasses.dataclass(frozen=True)
class Algorithm:
    advantage: str
    group_size: int  # K samples per prompt
    kl_in_loss: bool
    critic: bool  # a value model exists
    variant: dict | None  # keyword arguments of objectives.policy_objective; None = the PPO loss as before
    group_eps: float


def resolve(config) -> Algorithm:
    """Checks and resolves config.algo / config.rollout (errors name the key and the choices)."""
    algo, tc = config.algo, config.train
    kind = algo.advantage
    if kind not in A.ADVANTAGE_KINDS:
        raise ValueError(f"config.algo.advantage={kind!r}; expected one of {', '.join(A.ADVANTAGE_KINDS)}")
    k = int(config.rollout.samples_per_prompt)
    if k < 1:
        raise ValueError(f"config.rollout.samples_per_prompt={k}; expected an integer >= 1")
    if kind in A.GROUP_KINDS and k < 2:
        raise ValueError(
            f"config.algo.advantage={kind!r} needs config.rollout.samples_per_prompt >= 2 (a group "
            f"baseline over one sample is undefined), got {k}"
        )
    if tc.batch_size % k:
        raise ValueError(
            f"config.train.batch_size={tc.batch_size} (rollouts per iteration) must be divisible by "
            f"config.rollout.samples_per_prompt={k}"
        )
    if k > 1 and (tc.batch_size // k) % tc.num_minibatches:
        raise ValueError(
            f"config.train.num_minibatches={tc.num_minibatches} must divide the "
            f"{tc.batch_size // k} prompt groups per iteration (minibatches hold whole groups)"
        )
    if algo.kl_placement not in KL_PLACEMENTS:
        raise ValueError(f"config.algo.kl_placement={algo.kl_placement!r}; expected one of {KL_PLACEMENTS}")
    kl_in_loss = algo.kl_placement == "in_loss" or (algo.kl_placement == "auto" and kind in ("grpo", "dr_grpo"))
    agg = algo.loss_agg
    if agg == "auto":
        agg = {"grpo": "seq_mean_token_mean", "dr_grpo": "seq_mean_token_sum_norm"}.get(kind, "token_mean")
    if agg not in O.AGGREGATIONS:
        raise ValueError(f"config.algo.loss_agg={agg!r}; expected 'auto' or one of {O.AGGREGATIONS}")
    if algo.kl_loss_estimator not in L.KL_ESTIMATORS:
        raise ValueError(f"config.algo.kl_loss_estimator={algo.kl_loss_estimator!r}; expected one of {L.KL_ESTIMATORS}")
    low = tc.clip_eps if algo.clip_eps_low < 0 else float(algo.clip_eps_low)
    high = tc.clip_eps if algo.clip_eps_high < 0 else float(algo.clip_eps_high)
    dual = float(algo.dual_clip_c)
    if dual and dual <= 1.0:
        raise ValueError(f"config.algo.dual_clip_c={dual}; expected 0 (off) or a value > 1 (e.g. 3)")
    critic = kind == "gae"
    default = critic and not kl_in_loss and low == high == tc.clip_eps and not dual and agg == "token_mean"
    variant = (
        None
        if default
        else {
            "clip_eps_low": low,
            "clip_eps_high": high,
            "dual_clip_c": dual or None,
            "aggregation": agg,
            "norm_constant": float(algo.norm_constant)
            if algo.norm_constant > 0
            else float(config.sampling.max_new_tokens),
            "kl_estimator": algo.kl_loss_estimator,
        }
    )
    return Algorithm(
        advantage=kind,
        group_size=k,
        kl_in_loss=kl_in_loss,
        critic=critic,
        variant=variant,
        group_eps=float(algo.group_eps),
    )


def policy_gradient_loss(logprobs, batch, maskf, *, variant: dict, kl_in_loss: bool):
    """The variant policy loss of one micro-batch: objectives.policy_objective on the batch's arrays.

    batch carries 'logprobs' (old), 'advantages' and, with the KL in the loss, 'ref_logprobs' and
    'kl_coef' ([B] copies of this iteration's beta). Returns (loss, metrics with trainer names).
    """
    loss, m = O.policy_objective(
        logprobs,
        batch["logprobs"],
        batch["advantages"],
        maskf,
        **variant,
        ref_logprobs=batch["ref_logprobs"] if kl_in_loss else None,
        kl_coef=jnp.mean(batch["kl_coef"]) if kl_in_loss else 0.0,
    )
    metrics = {
        "policy/pg_loss": m["pg_loss"],
        "policy/approxkl": m["approxkl"],
        "policy/clipfrac": m["clipfrac"],
        "policy/ratio": m["ratio_mean"],
    }
    if variant["dual_clip_c"]:
        metrics["policy/dual_clipfrac"] = m["dual_clipfrac"]
    if kl_in_loss:
        metrics["policy/kl_loss"] = m["kl_loss"]
    return loss, metrics


def minibatch_order(rng, *, batch: int, group_size: int, ppo_epochs: int, num_minibatches: int):
    """[E*M, B/M] row indices: one permutation of whole groups per epoch, members kept together."""
    groups = batch // group_size
    perms = jax.vmap(lambda key: jax.random.permutation(key, groups))(jax.random.split(rng, ppo_epochs))  # [E, G]
    rows = perms[:, :, None] * group_size + jnp.arange(group_size)[None, None, :]  # [E, G, K]
    return rows.reshape(ppo_epochs * num_minibatches, batch // num_minibatches)


def update_keys(base_keys, algo: Algorithm):
    """Rollout fields the update reads: PPO's, minus the value ones without a critic, plus the
    reference log-probs and beta when the KL is a loss term."""
    keys = tuple(k for k in base_keys if algo.critic or k not in ("values", "returns"))
    return keys + (("ref_logprobs", "kl_coef") if algo.kl_in_loss else ())


def tree_bytes(tree) -> int:
    """Total bytes of the arrays of a pytree (e.g. the train state: params + optimizer moments)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype")))


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM, Linux) in MiB; nan where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")
