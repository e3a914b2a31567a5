"""PPO maths for RLHF: GAE, log-probs/entropy, masked statistics, KL estimators, losses.

Every function here is pure, keyword-only after its array arguments, jit-compatible and
computes in float32 whatever the input dtype (bf16 activations are cast on entry), so
that the small differences PPO depends on (log-ratio of two nearly equal policies, KL of
a few hundredths of a nat) are not lost to bf16 rounding.

Shapes: B = batch (sequences), T = response length (time), V = vocabulary size.
`mask` is 1.0 on real response tokens and 0.0 on padding; it may be bool, int or float.
Padded positions may hold any value (even inf/nan, e.g. log-probs of pad tokens): they
are selected away with `jnp.where` before any arithmetic so they never reach a result
or a gradient.

Formulas: Schulman et al. 2016 for GAE, Schulman et al. 2017 for the clipped objectives,
Ziegler et al. 2019 / Schulman's "Approximating KL divergence" note for the k1/k2/k3 estimators.
"""

from typing import Optional, Union

import jax
import jax.numpy as jnp

Array = jax.Array
Axis = Optional[Union[int, tuple[int, ...]]]

KL_ESTIMATORS = ("k1", "k2", "k3")


def _f32(x) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def _mask_f32(mask) -> Array:
    return jnp.asarray(mask).astype(jnp.float32)


def _check_same_shape(**arrays) -> None:
    """Static (trace-time) shape check with a message naming the offending arguments."""
    shapes = {name: tuple(jnp.shape(a)) for name, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        desc = ", ".join(f"{name}{list(s)}" for name, s in shapes.items())
        raise ValueError(f"ppo/losses.py: expected equal shapes, got {desc}")


# ----------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------


def masked_mean(x, mask, axis: Axis = None) -> Array:
    """Mean of `x` over entries where `mask` is non-zero (mask values act as weights).

    Args:
      x: array, e.g. [B, T].
      mask: same shape as `x` (or broadcastable to it).
      axis: axis/axes to reduce; None reduces everything.

    Returns:
      f32 array with `axis` reduced. Where nothing is valid the result is 0 (not nan), so
      an all-padding minibatch contributes a zero loss and zero gradient.
    """
    x = _f32(x)
    mask = jnp.broadcast_to(_mask_f32(mask), x.shape)
    # where() (not x * mask) so that inf/nan in padded slots cannot turn into nan.
    total = jnp.sum(jnp.where(mask != 0, x * mask, 0.0), axis=axis)
    count = jnp.sum(mask, axis=axis)
    # Safe denominator instead of where(count > 0, total / count, 0): the latter has a nan
    # gradient through the unselected branch when count == 0.
    return total / jnp.where(count > 0, count, 1.0)


def masked_var(x, mask, *, unbiased: bool = True) -> Array:
    """Variance of `x` over all valid entries (a scalar).

    With `unbiased=True` applies Bessel's correction n / (n - 1), n = number of valid
    entries (sum of the mask). With a single valid entry the variance is 0 (the correction
    is skipped rather than dividing by zero); with none it is 0.
    """
    x = _f32(x)
    mask = jnp.broadcast_to(_mask_f32(mask), x.shape)
    mean = masked_mean(x, mask)
    centered = jnp.where(mask != 0, x - mean, 0.0)
    var = masked_mean(jnp.square(centered), mask)
    if unbiased:
        n = jnp.sum(mask)
        var = var * jnp.where(n > 1, n / jnp.maximum(n - 1.0, 1.0), 1.0)
    return var


def masked_whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """Normalise `x` to mean 0 and (unbiased) std 1 over the valid entries.

    Statistics come from valid entries only, so padding does not pull the mean towards 0.
    With `shift_mean=False` the original mean is added back (only the scale changes), as
    is done for rewards in some PPO variants. Masked entries are returned as 0.
    """
    x = _f32(x)
    mask = jnp.broadcast_to(_mask_f32(mask), x.shape)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask != 0, whitened, 0.0)


# ----------------------------------------------------------------------------------
# Generalised advantage estimation
# ----------------------------------------------------------------------------------


def gae(rewards, values, mask, *, gamma: float, lam: float) -> tuple[Array, Array]:
    """Generalised advantage estimation (Schulman et al. 2016) over ragged sequences.

    For a row whose valid tokens are contiguous (right padding):
      delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
      A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    i.e. the value after the last valid token is bootstrapped as 0 (the episode ends with
    the response). Returns = A + V (the lambda-return, the value-function target).

    Masks that are not a prefix are tolerated by treating masked positions as absent: the
    recursion skips over them and links each valid token to the next *valid* token, as if
    the padding were squeezed out of the row. For prefix masks this is exactly the formula
    above. Rewards and values at masked positions are ignored.

    Implemented as one reverse `lax.scan` over time, carrying (V, A) of the next valid
    token for every row, so it jits to a single loop with no Python unrolling.

    Args:
      rewards: [B, T] per-token rewards (e.g. -beta * kl_t plus the score at the end).
      values: [B, T] value estimates V(s_t).
      mask: [B, T] 1 on response tokens, 0 on padding.
      gamma: discount (may be a traced scalar).
      lam: GAE lambda (may be a traced scalar).

    Returns:
      (advantages, returns), both [B, T] f32, zero where mask == 0.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    if jnp.ndim(rewards) != 2:
        raise ValueError(f"ppo/losses.py gae: expected [B, T] arrays, got shape {jnp.shape(rewards)}")
    rewards = _f32(rewards)  # [B, T]
    values = _f32(values)  # [B, T]
    valid = _mask_f32(mask) != 0  # [B, T] bool
    gamma = _f32(gamma)
    lam = _f32(lam)

    def step(carry, inputs):
        next_value, next_adv = carry  # [B], [B]: of the next valid token (0 past the end)
        reward_t, value_t, valid_t = inputs  # [B] each
        delta = reward_t + gamma * next_value - value_t
        adv = delta + gamma * lam * next_adv
        # At a masked position emit 0 and pass the carry through unchanged (absent token).
        new_carry = (jnp.where(valid_t, value_t, next_value), jnp.where(valid_t, adv, next_adv))
        return new_carry, jnp.where(valid_t, adv, 0.0)

    batch = rewards.shape[0]
    init = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.float32))
    # Time-major inputs: scan iterates over the leading axis.
    _, adv_tm = jax.lax.scan(step, init, (rewards.T, values.T, valid.T), reverse=True)  # [T, B]
    advantages = adv_tm.T  # [B, T]
    returns = jnp.where(valid, advantages + values, 0.0)  # [B, T]
    return advantages, returns


# ----------------------------------------------------------------------------------
# Log-probabilities and entropy
# ----------------------------------------------------------------------------------


def logprobs_from_logits(logits, tokens) -> Array:
    """Log-probability of `tokens` under `logits`, in f32.

    log_softmax(logits)[token] computed as logits[token] - logsumexp(logits), which is the
    same quantity without materialising the full [B, T, V] log-softmax.

    Args:
      logits: [B, T, V] (any float dtype; cast to f32).
      tokens: [B, T] integer ids in [0, V).

    Returns:
      [B, T] f32 log-probabilities.
    """
    if jnp.shape(logits)[:-1] != jnp.shape(tokens):
        raise ValueError(
            f"ppo/losses.py logprobs_from_logits: logits {jnp.shape(logits)} must be tokens {jnp.shape(tokens)} + [V]"
        )
    logits = _f32(logits)  # [B, T, V]
    tokens = jnp.asarray(tokens).astype(jnp.int32)  # [B, T]
    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]  # [B, T]
    return picked - jax.nn.logsumexp(logits, axis=-1)  # [B, T]


def entropy_from_logits(logits) -> Array:
    """Per-token entropy H = -sum_v p_v log p_v of softmax(logits), in f32.

    Logits of -inf (vocabulary masked out, e.g. by top-k) contribute 0, not nan.

    Args:
      logits: [B, T, V].

    Returns:
      [B, T] f32 entropies (nats).
    """
    logits = _f32(logits)  # [B, T, V]
    logp = jax.nn.log_softmax(logits, axis=-1)  # [B, T, V]
    probs = jnp.exp(logp)  # [B, T, V]
    # 0 * -inf would be nan; replacing -inf by 0 keeps both value and gradient finite.
    safe_logp = jnp.where(jnp.isfinite(logp), logp, 0.0)
    return -jnp.sum(probs * safe_logp, axis=-1)  # [B, T]


# ----------------------------------------------------------------------------------
# KL penalty
# ----------------------------------------------------------------------------------


def kl_penalty(logprobs, ref_logprobs, *, estimator: str = "k1") -> Array:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

    With l = ref_logprobs - logprobs (log of the ratio pi_ref / pi at the sampled token):
      k1 = -l                   unbiased, high variance, can be negative per token;
      k2 = l^2 / 2              biased, low variance, >= 0;
      k3 = exp(l) - 1 - l       unbiased, low variance, >= 0 (computed as expm1(l) - l,
                                or its Taylor series for |l| < 0.1, to keep full f32
                                relative precision when the policies are close).

    Args:
      logprobs: [B, T] log pi(token) of the policy that sampled the tokens.
      ref_logprobs: [B, T] log pi_ref(token) of the reference policy.
      estimator: one of 'k1', 'k2', 'k3'.

    Returns:
      [B, T] f32 per-token KL estimates (not masked).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"ppo/losses.py kl_penalty: unknown estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}"
        )
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_ratio = _f32(ref_logprobs) - _f32(logprobs)  # [B, T]
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * jnp.square(log_ratio)
    # expm1(l) - l cancels catastrophically in f32 for small |l| (the common case: the
    # policy stays close to the reference), so there use the Taylor series
    # l^2/2 + l^3/6 + l^4/24 + l^5/120 (truncation error < 3e-7 relative at |l| = 0.1).
    small = jnp.abs(log_ratio) < 0.1
    l_small = jnp.where(small, log_ratio, 0.0)
    series = jnp.square(l_small) * (0.5 + l_small * (1.0 / 6 + l_small * (1.0 / 24 + l_small / 120)))
    return jnp.where(small, series, jnp.expm1(log_ratio) - log_ratio)


# ----------------------------------------------------------------------------------
# PPO losses
# ----------------------------------------------------------------------------------


def policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_eps: float) -> tuple[Array, dict]:
    """Clipped PPO surrogate (Schulman et al. 2017), as a loss to minimise.

      ratio = exp(logp - logp_old)
      loss  = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))

    Args:
      logprobs: [B, T] log-probs under the current policy (carries the gradient).
      old_logprobs: [B, T] log-probs under the rollout policy (treated as constants).
      advantages: [B, T] (usually whitened), treated as constants.
      mask: [B, T] 1 on response tokens.
      clip_eps: clipping range eps.

    Returns:
      (loss scalar f32, metrics) with metrics
        'clipfrac':   fraction of valid tokens where the clipped term is the larger one
                      (i.e. the gradient of that token is cut off),
        'approxkl':   masked mean of 0.5 * (logp - logp_old)^2,
        'ratio_mean': masked mean of the ratio.
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    valid = _mask_f32(mask) != 0  # [B, T]
    old_logprobs = jax.lax.stop_gradient(_f32(old_logprobs))
    advantages = jax.lax.stop_gradient(_f32(advantages))
    # Zero the log-ratio on padding first so exp() cannot overflow there.
    log_ratio = jnp.where(valid, _f32(logprobs) - old_logprobs, 0.0)  # [B, T]
    advantages = jnp.where(valid, advantages, 0.0)
    ratio = jnp.exp(log_ratio)  # [B, T]
    unclipped = -advantages * ratio  # [B, T]
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # [B, T]
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approxkl": masked_mean(0.5 * jnp.square(log_ratio), mask),
        "ratio_mean": masked_mean(ratio, mask),
    }
    metrics = jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)
    return loss, metrics


def value_loss(values, old_values, returns, mask, *, clip_eps: float) -> tuple[Array, dict]:
    """Clipped value loss (as in OpenAI baselines / lm-human-preferences).

      V_clip = V_old + clip(V - V_old, -eps, eps)
      loss   = 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))

    Args:
      values: [B, T] current value predictions (carries the gradient).
      old_values: [B, T] value predictions at rollout time (constants).
      returns: [B, T] value targets, e.g. GAE returns (constants).
      mask: [B, T] 1 on response tokens.
      clip_eps: value clipping range (absolute, in reward units).

    Returns:
      (loss scalar f32, metrics) with 'vf_clipfrac': fraction of valid tokens where the
      clipped error is the larger one.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    valid = _mask_f32(mask) != 0  # [B, T]
    values = jnp.where(valid, _f32(values), 0.0)  # [B, T]
    old_values = jnp.where(valid, jax.lax.stop_gradient(_f32(old_values)), 0.0)
    returns = jnp.where(valid, jax.lax.stop_gradient(_f32(returns)), 0.0)
    values_clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)  # [B, T]
    unclipped = jnp.square(values - returns)  # [B, T]
    clipped = jnp.square(values_clipped - returns)  # [B, T]
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        # Count only tokens whose value really moved past the clip range: in float32
        # V_old + (V - V_old) can differ from V by rounding, which would flip the comparison.
        "vf_clipfrac": jax.lax.stop_gradient(
            masked_mean(((jnp.abs(values - old_values) > clip_eps) & (clipped > unclipped)).astype(jnp.float32), mask)
        ),
    }
    return loss, metrics
