"""Policy-loss variants: asymmetric (DAPO clip-higher) and dual clipping, KL as a loss term, and
the ways per-token losses are aggregated into one scalar.

  ratio     = exp(logp - logp_old)
  pg_t      = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))            (PPO, DAPO)
  dual clip (Ye et al. 2020), for A < 0 only: pg_t = min(pg_t, -c A), c > 1
            (in objective terms max(min(ratio A, clip(ratio) A), c A): a huge ratio on a bad
            token can no longer produce an unbounded loss)
  kl_t      = k3 (or k2, k1) of logp against the reference, with the gradient (GRPO's KL term)
  loss_t    = pg_t + beta kl_t

Aggregation of loss_t over a [B, T] micro-batch with mask m (L_i = number of valid tokens of row i):
  token_mean               sum_{i,t} m loss / sum_{i,t} m          (every token weighs the same;
                                                                   PPO here, DAPO)
  seq_mean_token_mean      mean_i (sum_t m loss / L_i)             (GRPO: each response weighs the
                                                                   same, long ones per token less)
  seq_mean_token_sum       mean_i sum_t m loss                     (no length normalisation)
  seq_mean_token_sum_norm  mean_i sum_t m loss / C, C a constant   (Dr. GRPO; C = max response
                                                                   length by default)
Rows without valid tokens count as sequences with loss 0 in the seq_* modes, so a padded member
dilutes the mean the same way in every micro-batch layout.

Pure keyword-only functions in float32; shapes B = rollouts, T = response length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ppo import losses as L

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def aggregate_loss(token_loss, mask, *, mode: str, norm_constant: float | None = None) -> jax.Array:
    """Scalar loss from per-token losses [B, T] and a mask [B, T] (see the module docstring).

    Args:
      token_loss: [B, T] (padding may hold anything; it is selected away).
      mask: [B, T] 1 on response tokens.
      mode: one of AGGREGATIONS.
      norm_constant: C of 'seq_mean_token_sum_norm'; None = T.

    Returns:
      f32 scalar.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"ppo/objectives.py aggregate_loss: mode={mode!r}; expected one of {AGGREGATIONS}")
    L._check_same_shape(token_loss=token_loss, mask=mask)
    maskf = jnp.asarray(mask, jnp.float32)  # [B, T]
    token_loss = jnp.where(maskf != 0, jnp.asarray(token_loss, jnp.float32) * maskf, 0.0)  # [B, T]
    if mode == "token_mean":
        return L.masked_mean(token_loss, maskf)
    seq_sum = jnp.sum(token_loss, axis=1)  # [B]
    if mode == "seq_mean_token_mean":
        lengths = jnp.sum(maskf, axis=1)  # [B]
        return jnp.mean(seq_sum / jnp.where(lengths > 0, lengths, 1.0))
    if mode == "seq_mean_token_sum":
        return jnp.mean(seq_sum)
    constant = float(token_loss.shape[1] if norm_constant is None else norm_constant)
    if not constant > 0:
        raise ValueError(f"ppo/objectives.py aggregate_loss: norm_constant must be > 0, got {norm_constant}")
    return jnp.mean(seq_sum) / constant


def clipped_token_losses(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip_c: float | None = None,
) -> tuple[jax.Array, dict]:
    """Per-token clipped surrogate losses with asymmetric and optional dual clipping.

    Args:
      logprobs: [B, T] log-probs under the current policy (carries the gradient).
      old_logprobs: [B, T] rollout-time log-probs (constants).
      advantages: [B, T] (constants).
      mask: [B, T] 1 on response tokens.
      clip_eps_low: ratio lower bound is 1 - clip_eps_low.
      clip_eps_high: ratio upper bound is 1 + clip_eps_high.
      dual_clip_c: None/0 = off; else c > 1, loss capped at -c A where A < 0.

    Returns:
      (token_loss [B, T] f32, 0 on padding; per-token indicator arrays [B, T] f32 'clipped'
      (the clipped term is the larger one), 'dual_clipped' (the -c A cap is active), and
      'log_ratio' and 'ratio').
    """
    L._check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if dual_clip_c and not dual_clip_c > 1.0:
        raise ValueError(
            f"ppo/objectives.py clipped_token_losses: dual_clip_c must be > 1 (or 0 = off), got {dual_clip_c}"
        )
    valid = jnp.asarray(mask) != 0  # [B, T]
    old_logprobs = jax.lax.stop_gradient(jnp.asarray(old_logprobs, jnp.float32))
    advantages = jnp.where(valid, jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32)), 0.0)
    log_ratio = jnp.where(valid, jnp.asarray(logprobs, jnp.float32) - old_logprobs, 0.0)  # [B, T]
    ratio = jnp.exp(log_ratio)  # [B, T]
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    loss = jnp.maximum(unclipped, clipped)  # [B, T]
    dual = jnp.zeros_like(loss, dtype=bool)
    if dual_clip_c:
        cap = -dual_clip_c * advantages  # [B, T], > 0 where A < 0
        dual = (advantages < 0) & (loss > cap)
        loss = jnp.where(dual, cap, loss)
    info = {
        "clipped": (clipped > unclipped).astype(jnp.float32),
        "dual_clipped": dual.astype(jnp.float32),
        "log_ratio": log_ratio,
        "ratio": ratio,
    }
    info = jax.tree.map(jax.lax.stop_gradient, info)
    return jnp.where(valid, loss, 0.0), info


def policy_objective(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip_c: float | None = None,
    aggregation: str = "token_mean",
    norm_constant: float | None = None,
    ref_logprobs=None,
    kl_coef=0.0,
    kl_estimator: str = "k3",
) -> tuple[jax.Array, dict]:
    """Aggregated clipped policy loss, plus beta * KL(pi || pi_ref) as a loss term when given.

    Args:
      logprobs, old_logprobs, advantages, mask: [B, T] as in `clipped_token_losses`.
      clip_eps_low, clip_eps_high, dual_clip_c: see `clipped_token_losses`.
      aggregation, norm_constant: see `aggregate_loss` (applies to the KL term too, as in verl).
      ref_logprobs: [B, T] reference log-probs, or None for no KL term.
      kl_coef: beta of the KL term (scalar; may be traced, e.g. an adaptive controller's value).
      kl_estimator: 'k1' | 'k2' | 'k3' per-token estimator of the KL term.

    Returns:
      (loss scalar f32, metrics: pg_loss, kl_loss (unweighted), clipfrac, dual_clipfrac,
      approxkl, ratio_mean, all token means over the mask).
    """
    token_pg, info = clipped_token_losses(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high,
        dual_clip_c=dual_clip_c,
    )
    pg_loss = aggregate_loss(token_pg, mask, mode=aggregation, norm_constant=norm_constant)
    loss = pg_loss
    kl_loss = jnp.float32(0.0)
    if ref_logprobs is not None:
        token_kl = L.kl_penalty(logprobs, jax.lax.stop_gradient(ref_logprobs), estimator=kl_estimator)  # [B, T]
        token_kl = jnp.where(jnp.asarray(mask) != 0, token_kl, 0.0)
        kl_loss = aggregate_loss(token_kl, mask, mode=aggregation, norm_constant=norm_constant)
        loss = loss + jnp.asarray(kl_coef, jnp.float32) * kl_loss
    metrics = {
        "pg_loss": pg_loss,
        "kl_loss": kl_loss,
        "clipfrac": L.masked_mean(info["clipped"], mask),
        "dual_clipfrac": L.masked_mean(info["dual_clipped"], mask),
        "approxkl": L.masked_mean(0.5 * jnp.square(info["log_ratio"]), mask),
        "ratio_mean": L.masked_mean(info["ratio"], mask),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
