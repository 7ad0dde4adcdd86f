"""The training objectives: next-token cross entropy, GRPO with k3 KL and entropy, and the SPR loss.

The formulas, with their sources, are written down in docs/algorithms.md.

Conventions. `logits` [batch, seq, vocab] are float32 and position t predicts token t+1. Every per-token quantity
(`token_logprobs`, masks) is in the *token frame*: entry t is about token t, the token being scored, so a mask
marks the tokens whose likelihood counts (e.g. the response). Token 0 has no prediction; its entries are 0 and
masks there are ignored. Step logits and step masks [batch, seq] stay in the *position frame* of
`models.sprm.step_score_mask` (the logit at the position before each delimiter).

Averages are per replica: inside a data-parallel step every replica averages over its own tokens (or steps) and
the communication algorithm averages the gradients, as the released MetaStone-S1 / verl code does. Only the SPR
class counts are summed over devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

import comms
from metastone_jax.config import RLConfig

# The +1e-6 keeps a group whose rewards are all equal at advantage 0 instead of 0/0.
ADVANTAGE_EPS = 1e-6
SPR_EPS = 1e-5
# SPR class balance: positive steps get 1.5x the inverse-frequency weight (released MetaStone-S1 code).
SPR_POSITIVE_BOOST = 1.5


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` where `mask` (0 when the mask is empty); masked-out entries never leak NaN or inf."""
    mask = mask.astype(bool)
    total = jnp.where(mask, values, 0.0).sum()
    return total / jnp.maximum(mask.sum(), 1).astype(total.dtype)


def token_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """`masked_mean` over the tokens marked in `mask` [B, T] (token frame), token 0 excluded (never predicted)."""
    return masked_mean(values, mask.astype(bool).at[:, 0].set(False))


def align_next_token(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pairs each prediction with the token it predicts: (logits [B, T-1, V] from positions 0..T-2, tokens 1..T-1)."""
    return logits[:, :-1], tokens[:, 1:]


def _to_token_frame(per_prediction: jax.Array) -> jax.Array:
    """[B, T-1] values about tokens 1..T-1 -> [B, T] in the token frame, with 0 for token 0 (never predicted)."""
    return jnp.pad(per_prediction, ((0, 0), (1, 0)))


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """[B, T]: log p(token t | tokens < t) in the token frame (0 at t = 0)."""
    predicting, targets = align_next_token(logits, tokens)
    log_probs = jax.nn.log_softmax(predicting.astype(jnp.float32), axis=-1)
    return _to_token_frame(jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0])


def token_entropy(logits: jax.Array) -> jax.Array:
    """[B, T]: entropy of the distribution each token was drawn from, in the token frame (0 at t = 0)."""
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return _to_token_frame(-(jnp.exp(log_probs) * log_probs).sum(axis=-1))


def sft_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Next-token cross entropy, averaged over the tokens marked in `loss_mask` [B, T] (token frame)."""
    return token_mean(-token_logprobs(logits, tokens), loss_mask)


def entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Token-mean entropy of the predictive distributions of the tokens marked in `mask` [B, T]."""
    return token_mean(token_entropy(logits), mask)


def group_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """GRPO advantages [B*G]: (r − group mean) / (unbiased group std + 1e-6); a group is G consecutive rewards."""
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards of shape {rewards.shape} are not a flat batch of groups of {group_size}")
    groups = rewards.astype(jnp.float32).reshape(-1, group_size)
    mean = groups.mean(axis=-1, keepdims=True)
    std = groups.std(axis=-1, keepdims=True, ddof=1)
    return ((groups - mean) / (std + ADVANTAGE_EPS)).reshape(-1)


def policy_loss(
    logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, mask: jax.Array, clip_eps: float = 0.2
) -> jax.Array:
    """PPO-clipped surrogate, token mean: mean over masked tokens of max(−A·ρ, −A·clip(ρ, 1±ε)), ρ = p / p_old."""
    ratio = jnp.exp(logprobs - old_logprobs)
    advantages = advantages[:, None]
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return token_mean(jnp.maximum(unclipped, clipped), mask)


def kl_k3(logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
    """The low-variance KL(policy ‖ reference) estimator exp(ref − lp) − (ref − lp) − 1, token mean over `mask`."""
    log_ratio = ref_logprobs - logprobs
    return token_mean(jnp.exp(log_ratio) - log_ratio - 1.0, mask)


def _kept_steps(
    step_logits: jax.Array, step_mask: jax.Array, outcome: jax.Array, axis_names: Sequence[str] = ()
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(positive mask, negative mask, pos, neg): kept steps of right / wrong trajectories and their counts.

    A step is kept when its prediction agrees with the outcome; the counts are summed over `axis_names`, + 1 each.
    """
    right = (outcome > 0.5)[:, None]
    agrees = jnp.where(right, step_logits > 0, step_logits < 0)
    kept = step_mask.astype(bool) & agrees
    positive, negative = kept & right, kept & ~right
    pos, neg = positive.sum().astype(jnp.float32), negative.sum().astype(jnp.float32)
    if axis_names:  # two scalars: comms.psum, unlike jax.lax.psum, compiles over a one-replica `data` axis too
        pos, neg = comms.psum((pos, neg), tuple(axis_names))
    return positive, negative, pos + 1.0, neg + 1.0


def spr_loss(
    step_logits: jax.Array, step_mask: jax.Array, outcome: jax.Array, axis_names: Sequence[str] = ()
) -> jax.Array:
    """The self-supervised process reward loss (docs/algorithms.md): class-balanced BCE on the steps that agree
    with the outcome.

    step_logits / step_mask [B, T] (position frame), outcome [B] (1 right, 0 wrong). The class counts are summed
    over `axis_names` (all data-parallel devices); the weighted BCE sum and the weight sum stay local, and the
    gradients are averaged by the communication algorithm, as in the released code (dp_actor.py all-reduces only
    the counts). Unlike that code, which adds 1 on every device before the all-reduce, the +1 is added once to the
    global count, so the weights do not depend on how the batch is split.
    """
    positive, negative, pos, neg = _kept_steps(step_logits, step_mask, outcome, axis_names)
    weights = jnp.where(positive, SPR_POSITIVE_BOOST * neg / (pos + neg), 0.0) + jnp.where(
        negative, pos / (pos + neg), 0.0
    )
    targets = jnp.broadcast_to((outcome > 0.5)[:, None], step_logits.shape).astype(jnp.float32)
    # BCEWithLogits in its overflow-free form: max(s, 0) − s·y + log(1 + e^−|s|).
    bce = jnp.maximum(step_logits, 0.0) - step_logits * targets + jnp.log1p(jnp.exp(-jnp.abs(step_logits)))
    return (weights * bce).sum() / (weights.sum() + SPR_EPS)


def rl_loss(
    logits: jax.Array,
    step_logits: jax.Array,
    tokens: jax.Array,
    response_mask: jax.Array,
    advantages: jax.Array,
    ref_logprobs: jax.Array,
    step_mask: jax.Array,
    outcome: jax.Array,
    config: RLConfig,
    temperature: float = 1.0,
    old_logprobs: jax.Array | None = None,
    axis_names: Sequence[str] = (),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO + SPR in one objective: pg + spr_coef·SPR − entropy_coef·entropy + kl_coef·KL; returns (loss, metrics).

    logits are divided by the sampling `temperature` first: log-probabilities and entropy are those of the
    distribution the responses were drawn from. Without `old_logprobs` the update is on-policy (one update
    per rollout batch): the old policy is the current one, detached, so ρ = 1 and the gradient is −A·∇log p.
    `ref_logprobs` must come from the reference policy at the same temperature.
    """
    logits = logits / temperature
    logprobs = token_logprobs(logits, tokens)
    if old_logprobs is None:
        old_logprobs = jax.lax.stop_gradient(logprobs)
    pg = policy_loss(logprobs, old_logprobs, advantages, response_mask, config.clip_eps)
    kl = kl_k3(logprobs, ref_logprobs, response_mask)
    mean_entropy = entropy(logits, response_mask)
    spr = spr_loss(step_logits, step_mask, outcome, axis_names)
    total = pg + config.spr_coef * spr - config.entropy_coef * mean_entropy + config.kl_coef * kl
    ratio = jnp.exp(logprobs - old_logprobs)
    metrics = {
        "loss": total,
        "pg_loss": pg,
        "spr_loss": spr,
        "entropy": mean_entropy,
        "kl": kl,
        "clip_fraction": token_mean(jnp.abs(ratio - 1.0) > config.clip_eps, response_mask),
    }
    return total, jax.tree.map(jax.lax.stop_gradient, metrics)
