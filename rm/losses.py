"""Pairwise reward-model losses.

The reward model scores a chosen and a rejected completion of the same prompt;
the Bradley-Terry model says the chosen one wins with probability
sigmoid(r_chosen - r_rejected). Training maximises the log-likelihood of the
observed preferences:

  L = -mean(log_sigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)

* margin (Llama 2 style): a per-pair (or scalar) offset that asks for a larger
  reward gap on pairs the annotators marked as clearly better.
* centering (Eisenstein et al. 2023, "Helping or herding"): the BT likelihood
  only sees differences, so the reward offset drifts freely; a small penalty on
  (r_c + r_r)^2 pins the rewards near zero mean, which keeps the scale
  comparable across checkpoints and ensemble members. Typical coefficient 0.01.

* soft labels: with y in [0, 1] the probability that chosen is preferred (e.g. the
  annotator's probability; y = 0.5 a tie), the loss is the BT cross-entropy
  -(y log sigmoid(z) + (1 - y) log sigmoid(-z)), z = r_c - r_r - margin; y = 1 is the
  loss above exactly. label_smoothing eps flips each label with probability eps
  (y -> (1 - eps) y + eps (1 - y); the conservative-DPO convention).
* ties (Rao and Kupper 1967): with theta > 1, P(c > r) = sigmoid(z - log theta),
  P(r > c) = sigmoid(-z - log theta) and P(tie) = 1 - P(c > r) - P(r > c), which is
  (theta^2 - 1) sigmoid(z - log theta) sigmoid(-z - log theta); rows with y = 0.5 are
  ties and score -log P(tie), the others the cross-entropy on the two win terms.

All maths is in float32 whatever the input dtype (bf16 logits lose too much
precision in log_sigmoid), and every function is jit-friendly.
"""

import jax
import jax.numpy as jnp


def _check_pair_shapes(chosen_rewards, rejected_rewards, margin, mask):
    """Raises ValueError unless rewards are [B] and margin/mask broadcast as [B]."""
    if chosen_rewards.ndim != 1:
        raise ValueError(f"rm/losses.py: chosen_rewards must have shape [B], got shape {tuple(chosen_rewards.shape)}.")
    if rejected_rewards.shape != chosen_rewards.shape:
        raise ValueError(
            f"rm/losses.py: rejected_rewards shape {tuple(rejected_rewards.shape)} "
            f"does not match chosen_rewards shape {tuple(chosen_rewards.shape)}."
        )
    batch = chosen_rewards.shape[0]
    if margin is not None and jnp.shape(margin) not in ((), (batch,)):
        raise ValueError(
            f"rm/losses.py: margin must be a scalar or have shape [{batch}], got shape {tuple(jnp.shape(margin))}."
        )
    if mask is not None and jnp.shape(mask) != (batch,):
        raise ValueError(
            f"rm/losses.py: mask must have shape [{batch}] (1 = real pair, "
            f"0 = padding), got shape {tuple(jnp.shape(mask))}."
        )


def _masked_mean(values, mask, denominator):
    """Mean of values over entries where mask is True; denominator >= 1."""
    return jnp.sum(jnp.where(mask, values, 0.0)) / denominator


def bradley_terry_probability(chosen_rewards, rejected_rewards):
    """Model probability that chosen is preferred: sigmoid(r_c - r_r), float32.

    Args:
      chosen_rewards: [...] rewards of the chosen completions.
      rejected_rewards: [...] rewards of the rejected completions (same shape).

    Returns:
      [...] float32 probabilities in [0, 1].
    """
    chosen = jnp.asarray(chosen_rewards, jnp.float32)
    rejected = jnp.asarray(rejected_rewards, jnp.float32)
    return jax.nn.sigmoid(chosen - rejected)


def bradley_terry_loss(
    chosen_rewards,
    rejected_rewards,
    *,
    margin=None,
    center_coef: float = 0.0,
    mask=None,
    labels=None,
    label_smoothing: float = 0.0,
    tie_model: str = "none",
    tie_theta: float = 1.5,
):
    """Bradley-Terry pairwise loss with optional margin, centering and mask.

    loss = -mean(log_sigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)

    Args:
      chosen_rewards: [B] rewards of the preferred completions (any float dtype).
      rejected_rewards: [B] rewards of the dispreferred completions.
      margin: None (no margin), a scalar, or [B] per-pair margins that the reward
        gap must exceed (Llama 2 "margin" loss).
      center_coef: weight of the centering penalty mean((r_c + r_r)^2).
      mask: optional [B] 0/1 (or bool) array; 0 marks padded pairs, which are
        excluded from every mean (loss, gradients and metrics). Values at masked
        entries are ignored even if they are inf/nan. An all-zero mask gives a
        loss of 0 and zero gradients rather than nan.
      labels: optional [B] probabilities in [0, 1] that chosen is preferred
        (soft labels; 0.5 = tie). None = 1 for every pair (the plain BT loss).
      label_smoothing: eps in [0, 0.5): labels become (1 - eps) y + eps (1 - y).
      tie_model: 'none' (ties are soft labels 0.5) or 'rao_kupper' (rows with
        label 0.5 score -log P(tie) under Rao-Kupper with `tie_theta`).
      tie_theta: Rao-Kupper theta > 1 (larger = ties more likely); a fixed
        hyperparameter, not learned.

    Returns:
      (loss, metrics): loss is a float32 scalar; metrics is a dict of float32
      scalars (means over unmasked pairs):
        'loss'            the total loss (same as the returned loss),
        'bt_loss'         the Bradley-Terry term alone (with margin, no centering),
        'centering'       mean((r_c + r_r)^2), before center_coef,
        'accuracy'        mean(r_c > r_r); ties count as wrong,
        'margin'          mean(r_c - r_r), the reward gap (not the margin input),
        'chosen_reward'   mean(r_c),
        'rejected_reward' mean(r_r),
        'n_pairs'         number of unmasked pairs.
    """
    chosen = jnp.asarray(chosen_rewards).astype(jnp.float32)  # [B]
    rejected = jnp.asarray(rejected_rewards).astype(jnp.float32)  # [B]
    _check_pair_shapes(chosen, rejected, margin, mask)

    if mask is None:
        valid = jnp.ones(chosen.shape, bool)  # [B]
    else:
        valid = jnp.asarray(mask) != 0  # [B]
    # Clean padded entries before any maths: masking after log_sigmoid would let
    # a nan/inf in a padded slot leak into the gradient (0 * nan = nan).
    chosen = jnp.where(valid, chosen, 0.0)  # [B]
    rejected = jnp.where(valid, rejected, 0.0)  # [B]
    if margin is None:
        margin = jnp.zeros((), jnp.float32)
    margin = jnp.where(valid, jnp.asarray(margin, jnp.float32), 0.0)  # [B]

    # max(., 1): with no valid pair every sum is 0, so all means become 0.
    n_pairs = jnp.sum(valid.astype(jnp.float32))
    denominator = jnp.maximum(n_pairs, 1.0)

    reward_gap = chosen - rejected  # [B]
    # log_sigmoid is computed as -softplus(-x): finite for |x| ~ 1e4 and beyond,
    # unlike log(sigmoid(x)) which gives -inf once sigmoid underflows.
    if labels is None and label_smoothing == 0.0 and tie_model == "none":
        log_likelihood = jax.nn.log_sigmoid(reward_gap - margin)  # [B]
    else:
        log_likelihood = _soft_log_likelihood(
            reward_gap - margin,
            labels,
            valid,
            label_smoothing=label_smoothing,
            tie_model=tie_model,
            tie_theta=tie_theta,
        )  # [B]
    bt_loss = -_masked_mean(log_likelihood, valid, denominator)
    centering = _masked_mean(jnp.square(chosen + rejected), valid, denominator)
    loss = bt_loss + jnp.asarray(center_coef, jnp.float32) * centering

    metrics = {
        "loss": loss,
        "bt_loss": bt_loss,
        "centering": centering,
        "accuracy": _masked_mean((reward_gap > 0).astype(jnp.float32), valid, denominator),
        "margin": _masked_mean(reward_gap, valid, denominator),
        "chosen_reward": _masked_mean(chosen, valid, denominator),
        "rejected_reward": _masked_mean(rejected, valid, denominator),
        "n_pairs": n_pairs,
    }
    return loss, metrics


TIE_MODELS = ("none", "rao_kupper")


def _soft_log_likelihood(z, labels, valid, *, label_smoothing, tie_model, tie_theta):
    """[B] log-likelihood of (soft) labels at z = r_c - r_r - margin."""
    if tie_model not in TIE_MODELS:
        raise ValueError(f"rm/losses.py: tie_model must be one of {TIE_MODELS}, got {tie_model!r}.")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"rm/losses.py: label_smoothing must be in [0, 0.5), got {label_smoothing}.")
    if labels is None:
        labels = jnp.ones(z.shape, jnp.float32)
    labels = jnp.asarray(labels, jnp.float32)
    if labels.shape != z.shape:
        raise ValueError(f"rm/losses.py: labels must have shape {tuple(z.shape)}, got {tuple(labels.shape)}.")
    labels = jnp.where(valid, labels, 1.0)  # [B]
    eps = jnp.asarray(label_smoothing, jnp.float32)
    smoothed = (1.0 - eps) * labels + eps * (1.0 - labels)  # [B]
    if tie_model == "none":
        return smoothed * jax.nn.log_sigmoid(z) + (1.0 - smoothed) * jax.nn.log_sigmoid(-z)  # [B]
    if not tie_theta > 1.0:
        raise ValueError(
            f"rm/losses.py: tie_theta must be > 1 for Rao-Kupper ties (theta = 1 gives P(tie) = 0), got {tie_theta}."
        )
    log_theta = jnp.log(jnp.asarray(tie_theta, jnp.float32))
    log_win = jax.nn.log_sigmoid(z - log_theta)  # [B] log P(c > r)
    log_loss = jax.nn.log_sigmoid(-z - log_theta)  # [B] log P(r > c)
    # P(tie) = 1 - P(c > r) - P(r > c) = (theta^2 - 1) P(c > r) P(r > c): the
    # product form stays finite in log space where 1 - p - q would cancel.
    log_tie = jnp.log(jnp.asarray(tie_theta**2 - 1.0, jnp.float32)) + log_win + log_loss
    is_tie = jnp.abs(labels - 0.5) < 1e-6  # [B]
    decided = smoothed * log_win + (1.0 - smoothed) * log_loss  # [B]
    return jnp.where(is_tie, log_tie, decided)
