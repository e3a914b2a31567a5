"""Critic-free advantage estimators: RLOO, GRPO, Dr. GRPO, REINFORCE++ (and its group baseline).

The rollout batch holds K samples of each prompt, kept together: rows [g*K, (g+1)*K) are the
group of prompt g (ppo/train.py repeats each prompt K times with `np.repeat`). With one scalar
score r_i per response (the normalised reward-model score, and with the KL placed in the reward
minus beta * sum_t kl_t):

  rloo                A_i = r_i - (sum_j r_j - r_i) / (K - 1)       (leave-one-out baseline)
  grpo                A_i = (r_i - mean_j r_j) / (std_j r_j + eps)   (std with Bessel's correction,
                                                                      as torch.std in TRL/OpenRLHF)
  dr_grpo             A_i = r_i - mean_j r_j                         (no std; the loss then divides
                                                                      token sums by a constant)
  reinforce_baseline  A_i = r_i - mean_j r_j, used as the final-token reward of REINFORCE++
                      (KL-shaped token rewards, gamma=1 returns, batch whitening)

and REINFORCE++ (Hu 2025) needs no group: per-token rewards -beta kl_t plus the score on the last
token, returns summed with gamma = 1 (G_t = sum_{s >= t} r_s), whitened over the whole batch.

Groups may contain invalid members (`valid` = False, e.g. a padded row or a filtered sample): they
are left out of every group statistic, get advantage 0, and K above counts only valid members.
A group with a single valid member has advantage 0 for rloo/grpo/dr_grpo (no baseline exists).

Pure keyword-only functions, float32, jit-compatible. Shapes: B = rollouts (G groups of K),
T = response length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ppo import losses as L

GROUP_KINDS = ("rloo", "grpo", "dr_grpo", "reinforce_baseline")
ADVANTAGE_KINDS = ("gae", "reinforce_pp") + GROUP_KINDS
CRITIC_FREE = ("rloo", "grpo", "dr_grpo", "reinforce_pp", "reinforce_baseline")


def _grouped(x, group_size: int, where: str):
    b = x.shape[0]
    if group_size < 1 or b % group_size:
        raise ValueError(
            f"ppo/advantages.py {where}: batch of {b} rows does not split into groups of "
            f"group_size={group_size} (rows [g*K, (g+1)*K) must be one prompt's samples)"
        )
    return x.reshape(b // group_size, group_size)


def group_advantages(scores, *, group_size: int, kind: str, valid=None, eps: float = 1e-6) -> jax.Array:
    """Per-response advantages from the scores of groups of `group_size` samples of one prompt.

    Args:
      scores: [B] scalar reward per response, B = G * K, rows of one group contiguous.
      group_size: K.
      kind: 'rloo' | 'grpo' | 'dr_grpo' | 'reinforce_baseline' (the last equals dr_grpo here:
        the group mean baseline; REINFORCE++ turns it into token returns afterwards).
      valid: optional [B] bool/0-1 mask of real members; invalid ones are ignored and get 0.
      eps: added to the group std (grpo).

    Returns:
      [B] f32 advantages (0 on invalid members and in groups with fewer than 2 valid members).
    """
    if kind not in GROUP_KINDS:
        raise ValueError(f"ppo/advantages.py group_advantages: kind={kind!r}; expected one of {GROUP_KINDS}")
    scores = jnp.asarray(scores, jnp.float32)
    if scores.ndim != 1:
        raise ValueError(f"ppo/advantages.py group_advantages: scores must be [B], got shape {scores.shape}")
    valid = jnp.ones(scores.shape, bool) if valid is None else jnp.asarray(valid) != 0
    r = _grouped(scores, group_size, "group_advantages")  # [G, K]
    m = _grouped(valid, group_size, "group_advantages").astype(jnp.float32)  # [G, K]
    r = jnp.where(m > 0, r, 0.0)  # invalid slots may hold anything (nan included)
    count = jnp.sum(m, axis=1, keepdims=True)  # [G, 1] valid members per group
    total = jnp.sum(r, axis=1, keepdims=True)  # [G, 1]
    enough = count > 1
    if kind == "rloo":
        baseline = (total - r) / jnp.where(enough, count - 1.0, 1.0)  # mean of the other members
        adv = r - baseline
    else:
        mean = total / jnp.maximum(count, 1.0)  # [G, 1]
        adv = r - mean
        if kind == "grpo":
            var = jnp.sum(jnp.square(adv) * m, axis=1, keepdims=True) / jnp.where(enough, count - 1.0, 1.0)
            adv = adv / (jnp.sqrt(var) + eps)
    adv = jnp.where((m > 0) & enough, adv, 0.0)  # [G, K]
    return adv.reshape(-1)  # [B]


def discounted_returns(rewards, mask, *, gamma: float = 1.0) -> jax.Array:
    """G_t = sum_{s >= t, valid} gamma^(number of valid steps between) r_s; 0 on padding.

    With gamma = 1 (REINFORCE++) this is the reverse cumulative sum of the valid rewards.

    Args:
      rewards: [B, T] per-token rewards.
      mask: [B, T] 1 on response tokens.
      gamma: discount.

    Returns:
      [B, T] f32 returns.
    """
    L._check_same_shape(rewards=rewards, mask=mask)
    valid = jnp.asarray(mask) != 0  # [B, T]
    rewards = jnp.where(valid, jnp.asarray(rewards, jnp.float32), 0.0)

    def step(next_return, inputs):
        reward_t, valid_t = inputs  # [B], [B]
        ret = reward_t + gamma * next_return
        return jnp.where(valid_t, ret, next_return), jnp.where(valid_t, ret, 0.0)

    init = jnp.zeros(rewards.shape[:1], jnp.float32)
    _, returns_tm = jax.lax.scan(step, init, (rewards.T, valid.T), reverse=True)  # [T, B]
    return returns_tm.T  # [B, T]


def kl_shaped_rewards(kl, scores, mask, *, beta) -> jax.Array:
    """Per-token rewards -beta * kl_t, plus `scores` on each row's last valid token.

    Args:
      kl: [B, T] per-token KL estimates (0 where the KL sits in the loss: pass beta = 0).
      scores: [B] final reward of each response.
      mask: [B, T] 1 on response tokens (a prefix per row).
      beta: KL coefficient.

    Returns:
      [B, T] f32 rewards, 0 on padding; a row without valid tokens gets no score.
    """
    maskf = jnp.asarray(mask, jnp.float32)
    lengths = jnp.sum(maskf, axis=1).astype(jnp.int32)  # [B]
    at_last = jax.nn.one_hot(jnp.maximum(lengths - 1, 0), maskf.shape[1]) * (lengths > 0)[:, None]  # [B, T]
    rewards = (
        -jnp.asarray(beta, jnp.float32) * jnp.asarray(kl, jnp.float32)
        + at_last * jnp.asarray(scores, jnp.float32)[:, None]
    )
    return jnp.where(maskf != 0, rewards, 0.0)


def critic_free_advantages(
    *, kind: str, scores, kl, mask, beta, group_size: int, eps: float = 1e-6, valid=None
) -> tuple[jax.Array, jax.Array]:
    """Token advantages and returns of a critic-free estimator (no value model).

    Args:
      kind: one of CRITIC_FREE.
      scores: [B] normalised RM scores (after the missing-EOS penalty).
      kl: [B, T] per-token KL estimates of the rollout policy against the reference.
      mask: [B, T] response mask.
      beta: KL coefficient in the reward; pass 0 when the KL is a loss term.
      group_size: K samples per prompt (rows of a group contiguous).
      eps: GRPO's std epsilon.
      valid: optional [B] mask of real rollouts.

    Returns:
      (advantages [B, T], returns [B, T]) f32, 0 on padding. For rloo/grpo/dr_grpo the sequence
      reward is score - beta * sum_t kl_t and the group advantage is broadcast to every token
      (returns = that sequence reward); for reinforce_pp / reinforce_baseline the returns are
      the gamma = 1 sums of the KL-shaped token rewards and the advantages are the returns
      whitened over the batch's valid tokens.
    """
    if kind not in CRITIC_FREE:
        raise ValueError(f"ppo/advantages.py critic_free_advantages: kind={kind!r}; expected one of {CRITIC_FREE}")
    maskf = jnp.asarray(mask, jnp.float32)  # [B, T]
    if valid is not None:
        maskf = maskf * (jnp.asarray(valid) != 0)[:, None]
    kl = jnp.where(maskf != 0, jnp.asarray(kl, jnp.float32), 0.0)
    scores = jnp.asarray(scores, jnp.float32)  # [B]
    beta = jnp.asarray(beta, jnp.float32)
    if kind in ("rloo", "grpo", "dr_grpo"):
        seq_reward = scores - beta * jnp.sum(kl, axis=1)  # [B]
        adv = group_advantages(seq_reward, group_size=group_size, kind=kind, valid=valid, eps=eps)  # [B]
        return adv[:, None] * maskf, seq_reward[:, None] * maskf
    if kind == "reinforce_baseline":
        scores = group_advantages(scores, group_size=group_size, kind=kind, valid=valid)
    returns = discounted_returns(kl_shaped_rewards(kl, scores, maskf, beta=beta), maskf, gamma=1.0)  # [B, T]
    return L.masked_whiten(returns, maskf), returns
