"""PPO rollouts: sample responses, score them, and compute per-token rewards and advantages.

One rollout (all inside one jitted function, frozen models passed as arguments):
  1. sample responses from the policy (models/sampling.py, KV cache, compiled decode loop);
  2. one forward pass of the policy, the reference and the value model over prompt + response:
     log-probs of the response tokens with logits / temperature (the distribution sampled
     from), values at the positions that predict each response token, token entropies;
  3. the reward model scores prompt + response truncated at the stop token (the response
     mask ends there), normalised with the RM's gain/bias; responses that never emitted EOS
     lose `missing_eos_penalty`;
  4. per-token reward r_t = -beta * kl_t, plus the score at the last response token;
     optional reward whitening; GAE advantages (whitened) and returns. Critic-free estimators
     (settings['advantage'] = rloo | grpo | dr_grpo | reinforce_pp | reinforce_baseline,
     ppo/advantages.py) use the groups of `group_size` consecutive rows (one prompt's samples)
     instead of a value model; with settings['kl_in_loss'] the KL leaves the reward (it is a
     loss term of the update, ppo/objectives.py).

Shapes: B rollouts, P prompt slots (left-padded), N = max_new_tokens.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from models.heads import ScalarHead
from models.lm_head import token_logprobs_from_hidden
from models.lora import strip_lora
from models.sampling import make_generate_fn
from models.transformer import Transformer, TransformerConfig
from ppo import advantages as A
from ppo import losses as L
from rm.ensemble import combine_member_scores
from rm.model import RewardModel, compute_rewards


@flax.struct.dataclass
class Rollout:
    query_ids: jax.Array  # [B, P] left-padded prompts
    query_mask: jax.Array  # [B, P]
    response_ids: jax.Array  # [B, N]
    response_mask: jax.Array  # [B, N] 1 up to and including the stop token
    logprobs: jax.Array  # [B, N] policy log-probs (tempered) at sampling time
    ref_logprobs: jax.Array  # [B, N]
    values: jax.Array  # [B, N]
    rewards: jax.Array  # [B, N] per-token rewards (KL penalty + score)
    advantages: jax.Array  # [B, N] whitened
    returns: jax.Array  # [B, N]
    scores: jax.Array  # [B] normalised RM scores after the EOS penalty
    raw_scores: jax.Array  # [B] RM scores before normalisation and penalty
    kl: jax.Array  # [B, N] per-token KL estimate (masked)
    entropy: jax.Array  # [B, N] per-token policy entropy (masked)
    ended_with_eos: jax.Array  # [B] bool
    kl_coef: jax.Array  # [B] the KL coefficient beta of this rollout (the update's KL loss term reads it)


@flax.struct.dataclass
class ModelSpecs:
    """Static description of the models in a PPO run (hashable, closed over by jit)."""

    policy: TransformerConfig = flax.struct.field(pytree_node=False)
    reward: TransformerConfig = flax.struct.field(pytree_node=False)
    value: TransformerConfig = flax.struct.field(pytree_node=False)  # unused when value_head_on_policy
    value_head_on_policy: bool = flax.struct.field(pytree_node=False, default=False)
    # The reference policy's config when it is a separate tree (e.g. an int8 copy); None = `policy`'s.
    reference: Optional[TransformerConfig] = flax.struct.field(pytree_node=False, default=None)
    # True: the reference is the policy's own params with the LoRA adapters ignored (its frozen
    # base), so no second copy of the base is held and the rollout's `ref_params` is unused.
    reference_adapters_off: bool = flax.struct.field(pytree_node=False, default=False)
    # False for critic-free estimators: no value model exists (no params, no forward, values are 0).
    critic: bool = flax.struct.field(pytree_node=False, default=True)

    def reference_config(self) -> TransformerConfig:
        """Config the reference forward runs with."""
        if self.reference_adapters_off:
            return self.policy.replace(lora_rank=0)  # plain (or int8) projections read only the base
        return self.reference or self.policy


def response_logits_and_values(
    specs: ModelSpecs,
    params: dict,
    query_ids,
    query_mask,
    response_ids,
    response_mask,
    dropout_rng=None,
    *,
    return_logits: bool = True,
):
    """Policy logits [B, N, V] for the response tokens and values [B, N], one forward each.

    With `dropout_rng` (PPO updates), models with lora_dropout > 0 drop adapter inputs; rollouts
    pass none, so the old log-probs and values come from the deterministic model. With
    return_logits=False the first output is the policy's hidden states [B, N, d] at the same
    positions instead (for models/lm_head.py's chunked log-probs)."""

    def rngs(config, i):
        if dropout_rng is None or config.lora_dropout <= 0:
            return None
        return {"dropout": jax.random.fold_in(dropout_rng, i)}

    ids = jnp.concatenate([query_ids, response_ids], axis=1)  # [B, P+N]
    mask = jnp.concatenate([query_mask, response_mask], axis=1)
    p, n = query_ids.shape[1], response_ids.shape[1]
    out = Transformer(specs.policy).apply(
        {"params": params["policy"]}, ids, mask, rngs=rngs(specs.policy, 0), return_logits=return_logits
    )
    logits = (out.logits if return_logits else out.hidden_states)[:, p - 1 : p + n - 1]  # t predicts token t+1
    if not specs.critic:
        return logits, None
    if specs.value_head_on_policy:
        values = ScalarHead(param_dtype=specs.policy.param_dtype).apply(
            {"params": params["value_head"]}, out.hidden_states
        )[:, p - 1 : p + n - 1]
    else:
        values = response_values(specs, params, query_ids, query_mask, response_ids, response_mask, dropout_rng)
    return logits, values


def response_values(
    specs: ModelSpecs, params: dict, query_ids, query_mask, response_ids, response_mask, dropout_rng=None
):
    """Values [B, N] of the separate value model (specs.value on params['value']) alone, the same
    forward `response_logits_and_values` runs for them (its LoRA dropout key: fold_in(rng, 1))."""
    if specs.value_head_on_policy or not specs.critic:
        raise ValueError("response_values: needs a separate value model (value.init='reward' and a critic)")
    rngs = None
    if dropout_rng is not None and specs.value.lora_dropout > 0:
        rngs = {"dropout": jax.random.fold_in(dropout_rng, 1)}
    ids = jnp.concatenate([query_ids, response_ids], axis=1)  # [B, P+N]
    mask = jnp.concatenate([query_mask, response_mask], axis=1)
    p, n = query_ids.shape[1], response_ids.shape[1]
    values = RewardModel(specs.value).apply({"params": params["value"]}, ids, mask, per_token=True, rngs=rngs)
    return values[:, p - 1 : p + n - 1]


def response_logprobs_and_values(
    specs: ModelSpecs,
    params: dict,
    query_ids,
    query_mask,
    response_ids,
    response_mask,
    dropout_rng=None,
    *,
    temperature,
    with_entropy=True,
):
    """(log-probs [B, N], entropies [B, N] or None, values [B, N]) of the tempered policy.

    With `specs.policy.logits_chunk` > 0 they come from the hidden states over sequence chunks
    (models/lm_head.py: no [B, N, V] float32 logits held); with 0 from the full logits."""
    if specs.policy.logits_chunk:
        hidden, values = response_logits_and_values(
            specs, params, query_ids, query_mask, response_ids, response_mask, dropout_rng, return_logits=False
        )
        stats = token_logprobs_from_hidden(
            specs.policy, params["policy"], hidden, response_ids, temperature=temperature, with_entropy=with_entropy
        )
        return stats["logprobs"], stats.get("entropy"), values
    logits, values = response_logits_and_values(
        specs, params, query_ids, query_mask, response_ids, response_mask, dropout_rng
    )
    tempered = logits / temperature
    entropy = L.entropy_from_logits(tempered) if with_entropy else None
    return L.logprobs_from_logits(tempered, response_ids), entropy, values


def reference_logprobs(
    config: TransformerConfig, ref_params, query_ids, query_mask, response_ids, response_mask, *, temperature
):
    ids = jnp.concatenate([query_ids, response_ids], axis=1)
    mask = jnp.concatenate([query_mask, response_mask], axis=1)
    p, n = query_ids.shape[1], response_ids.shape[1]
    if config.logits_chunk:  # log-probs over chunks of the hidden states (models/lm_head.py)
        out = Transformer(config).apply({"params": ref_params}, ids, mask, return_logits=False)
        return token_logprobs_from_hidden(
            config, ref_params, out.hidden_states[:, p - 1 : p + n - 1], response_ids, temperature=temperature
        )["logprobs"]
    logits = Transformer(config).apply({"params": ref_params}, ids, mask).logits[:, p - 1 : p + n - 1]
    return L.logprobs_from_logits(logits / temperature, response_ids)


def make_rollout_fn(specs: ModelSpecs, settings):
    """Jittable `fn(params, ref_params, reward_params, norm, beta, query_ids, query_mask, rng) -> Rollout`.

    params: the full trainable + frozen tree {'policy', 'value' | 'value_head'} ({'policy'} alone
    when not specs.critic). ref_params is
    ignored (pass None) when `specs.reference_adapters_off`: the reference is then
    params['policy'] without its adapters.

    settings: a dict of static values: max_new_tokens, temperature, top_k, top_p, eos_token_id,
    stop_token_ids, missing_eos_penalty, kl_estimator, gamma, lam, whiten_rewards, and optionally
    advantage ('gae' default, or a critic-free kind of ppo/advantages.py), group_size (K, default 1),
    group_eps (GRPO's std epsilon), kl_in_loss (default False: the KL is in the reward) and
    length_penalty (default 0: subtracted from the score per response token).
    norm: [2] array (gain, bias) of the reward model; or [K, 2] for an ensemble of K members, whose
    reward_params are then stacked [K, ...] and whose normalised scores combine by settings'
    reward_objective ('mean' | 'wco' | 'uwo', rm/ensemble.py) and uwo_lambda.

    The function's two stages are also attributes, to be jitted and timed apart (ppo/train.py's
    time/generation_s and time/scoring_s): `fn.generate(params, query_ids, query_mask, rng) ->
    SampleOutput` and `fn.score(params, ref_params, reward_params, norm, beta, query_ids,
    query_mask, sample) -> Rollout`; fn is score(generate(...)).
    """
    s = dict(settings)
    advantage, group_size = s.get("advantage", "gae"), int(s.get("group_size", 1))
    if advantage not in A.ADVANTAGE_KINDS:
        raise ValueError(f"ppo/rollout.py: advantage={advantage!r}; expected one of {A.ADVANTAGE_KINDS}")
    if (advantage == "gae") != specs.critic:
        raise ValueError(
            f"ppo/rollout.py: advantage={advantage!r} with specs.critic={specs.critic}: GAE needs "
            "the value model and the critic-free estimators have none"
        )
    generate = make_generate_fn(
        specs.policy,
        max_new_tokens=s["max_new_tokens"],
        temperature=s["temperature"],
        top_k=s["top_k"],
        top_p=s["top_p"],
        eos_token_id=s["eos_token_id"],
        stop_token_ids=tuple(s["stop_token_ids"]),
    )

    def generate_stage(params, query_ids, query_mask, rng):
        return generate(params["policy"], query_ids, query_mask, rng)

    def score_stage(params, ref_params, reward_params, norm, beta, query_ids, query_mask, sample):
        response_ids, response_mask = sample.response_ids, sample.response_mask
        maskf = response_mask.astype(jnp.float32)

        logprobs, entropy, values = response_logprobs_and_values(
            specs, params, query_ids, query_mask, response_ids, response_mask, temperature=s["temperature"]
        )
        logprobs, entropy = logprobs * maskf, entropy * maskf
        ref_tree = strip_lora(params["policy"]) if specs.reference_adapters_off else ref_params
        ref_logprobs = (
            reference_logprobs(
                specs.reference_config(),
                ref_tree,
                query_ids,
                query_mask,
                response_ids,
                response_mask,
                temperature=s["temperature"],
            )
            * maskf
        )
        values = jnp.zeros_like(maskf) if values is None else values * maskf

        # Reward-model score of prompt + response (the mask stops at the stop token).
        ids = jnp.concatenate([query_ids, response_ids], axis=1)
        mask = jnp.concatenate([query_mask, response_mask], axis=1)
        if norm.ndim == 2:  # an ensemble: reward_params stacked [K, ...], norm [K, 2]; reward.objective combines
            member_raw = jax.vmap(compute_rewards, in_axes=(None, 0, None, None))(
                specs.reward, reward_params, ids, mask
            )
            raw_scores = jnp.mean(member_raw, axis=0)  # [B] (reported only)
            scores = combine_member_scores(
                norm[:, :1] * member_raw + norm[:, 1:],  # [K, B] each member normalised by its own gain / bias
                objective=s.get("reward_objective", "mean"),
                uwo_lambda=float(s.get("uwo_lambda", 1.0)),
            )
        else:
            raw_scores = compute_rewards(specs.reward, reward_params, ids, mask)  # [B]
            scores = norm[0] * raw_scores + norm[1]
        scores = jnp.where(sample.ended_with_eos, scores, scores - s["missing_eos_penalty"])
        # Optional length penalty against verbosity hacking: score - c * response tokens (EOS included).
        length_penalty = float(s.get("length_penalty", 0.0))
        if length_penalty:
            scores = scores - length_penalty * jnp.sum(maskf, axis=1)

        kl = L.kl_penalty(logprobs, ref_logprobs, estimator=s["kl_estimator"]) * maskf  # [B, N]
        reward_beta = 0.0 if s.get("kl_in_loss", False) else beta  # in the loss: the update adds beta * KL
        if advantage == "gae":
            rewards = -reward_beta * kl
            last = jnp.maximum(sample.response_lengths - 1, 0)  # [B]
            at_last = jax.nn.one_hot(last, response_ids.shape[1]) * (sample.response_lengths > 0)[:, None]
            rewards = rewards + at_last * scores[:, None]
            if s["whiten_rewards"]:
                rewards = L.masked_whiten(rewards, maskf, shift_mean=False)
            advantages, returns = L.gae(rewards, values, maskf, gamma=s["gamma"], lam=s["lam"])
            advantages = L.masked_whiten(advantages, maskf)
        else:
            rewards = A.kl_shaped_rewards(kl, scores, maskf, beta=reward_beta)
            advantages, returns = A.critic_free_advantages(
                kind=advantage,
                scores=scores,
                kl=kl,
                mask=maskf,
                beta=reward_beta,
                group_size=group_size,
                eps=s.get("group_eps", 1e-6),
            )
        return Rollout(
            query_ids=query_ids,
            query_mask=query_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
            rewards=rewards,
            advantages=advantages,
            returns=returns,
            scores=scores,
            raw_scores=raw_scores,
            kl=kl,
            entropy=entropy,
            ended_with_eos=sample.ended_with_eos,
            kl_coef=jnp.full(scores.shape, beta, jnp.float32),
        )

    def rollout(params, ref_params, reward_params, norm, beta, query_ids, query_mask, rng):
        sample = generate_stage(params, query_ids, query_mask, rng)
        return score_stage(params, ref_params, reward_params, norm, beta, query_ids, query_mask, sample)

    rollout.generate, rollout.score = generate_stage, score_stage
    return rollout


def rollout_metrics(r: Rollout, beta, *, critic: bool = True, group_size: int = 1) -> dict:
    """Per-iteration statistics (TRL's names where they exist). KL and entropy are per-sequence sums.

    Without a critic the value statistics are left out; with groups (group_size K > 1) two more:
    the mean within-group std of the scores and the fraction of groups whose K scores are all
    equal (no learning signal for the group estimators)."""
    maskf = r.response_mask.astype(jnp.float32)
    kl_sum = jnp.sum(r.kl, axis=1)
    lengths = jnp.sum(maskf, axis=1)
    out = {
        "objective/scores": jnp.mean(r.scores),
        "objective/raw_scores": jnp.mean(r.raw_scores),
        "objective/kl": jnp.mean(kl_sum),
        "objective/non_score_reward": jnp.mean(-beta * kl_sum),
        "objective/rlhf_reward": jnp.mean(r.scores - beta * kl_sum),
        "objective/entropy": jnp.mean(jnp.sum(r.entropy, axis=1)),
        "objective/entropy_per_token": L.masked_mean(r.entropy, maskf),
        "rollout/eos_fraction": jnp.mean(r.ended_with_eos.astype(jnp.float32)),
        "rollout/response_length": jnp.mean(lengths),
    }
    if critic:
        out["val/mean"] = L.masked_mean(r.values, maskf)
        out["val/advantage_mean_raw_returns"] = L.masked_mean(r.returns, maskf)
    if group_size > 1:
        grouped = r.scores.reshape(-1, group_size)  # [G, K]
        out["group/score_std"] = jnp.mean(jnp.std(grouped, axis=1))
        out["group/zero_std_fraction"] = jnp.mean((jnp.max(grouped, 1) == jnp.min(grouped, 1)).astype(jnp.float32))
    return out
