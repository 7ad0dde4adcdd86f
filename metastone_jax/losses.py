"""The training objectives: next-token cross entropy, GRPO with k3 KL and entropy, and the SPR loss.

The formulas, with their sources, are written down in docs/algorithms.md.

Conventions. `logits` [batch, seq, vocab] are float32 and position t predicts token t+1. Every per-token quantity
(log-probabilities, entropies, masks) is in the *token frame*: entry t is about token t, the token being scored, so
a mask marks the tokens whose likelihood counts (e.g. the response). Token 0 has no prediction; its entries are 0
and masks there are ignored. Step logits and step masks [batch, seq] stay in the *position frame* of
`models.sprm.step_score_mask` (the logit at the position before each delimiter).

Averages are per replica: inside a data-parallel step every replica averages over its own tokens (or steps) and
the communication algorithm averages the gradients, as the released MetaStone-S1 / verl code does. Only the SPR
class counts are summed over devices.

Every average is a sum over a total (the tokens' `token_count`, the SPR weights' sum) that can be given: a train
step that splits a replica's slice into micro-batches gives each the whole slice's totals, so that the
micro-batches' losses, and their gradients, add up to the slice's exactly (docs/algorithms.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

import comms
from metastone_jax.config import RLConfig

# The +1e-6 keeps a group whose rewards are all equal at advantage 0 instead of 0/0.
ADVANTAGE_EPS = 1e-6
SPR_EPS = 1e-5
# SPR class balance: positive steps get 1.5x the inverse-frequency weight (released MetaStone-S1 code).
SPR_POSITIVE_BOOST = 1.5


def token_count(mask: jax.Array) -> jax.Array:
    """The number of tokens marked in `mask` [B, T] (token frame), token 0 excluded (never predicted); at least 1."""
    return jnp.maximum(mask.astype(bool)[:, 1:].sum(), 1).astype(jnp.float32)


def token_mean(values: jax.Array, mask: jax.Array, count: jax.Array | None = None) -> jax.Array:
    """The sum of `values` [B, T] over the tokens marked in `mask` (token 0 excluded) over `count` (default
    `token_count(mask)`: their mean; 0 when the mask is empty); masked-out entries never leak NaN or inf."""
    mask = mask.astype(bool).at[:, 0].set(False)
    return jnp.where(mask, values, 0.0).sum() / (token_count(mask) if count is None else count)


def align_next_token(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pairs each prediction with the token it predicts: (logits [B, T-1, ...] from positions 0..T-2, tokens 1..T-1)."""
    return logits[:, :-1], tokens[:, 1:]


def _to_token_frame(per_prediction: jax.Array) -> jax.Array:
    """[B, T-1] values about tokens 1..T-1 -> [B, T] in the token frame, with 0 for token 0 (never predicted)."""
    return jnp.pad(per_prediction, ((0, 0), (1, 0)))


def _target_scores(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log p(target), entropy), each [B, n], of the distributions `logits` [B, n, V], in float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logprobs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return logprobs, -(jnp.exp(log_probs) * log_probs).sum(axis=-1)


def next_token_scores(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log p(token t | tokens < t), entropy of the distribution token t was drawn from), each [B, T] in the token
    frame (0 at t = 0)."""
    return tuple(map(_to_token_frame, _target_scores(*align_next_token(logits, tokens))))


def chunked_next_token_scores(
    hidden: jax.Array, project: Callable[[jax.Array], jax.Array], tokens: jax.Array, chunk: int, unroll: bool = False
) -> tuple[jax.Array, jax.Array]:
    """`next_token_scores(project(hidden), tokens)` without the [B, T, V] logits: `chunk` positions at a time.

    hidden [B, T, C] are the final hidden states and `project` the LM head (ReflectiveModel.project, divided by
    the temperature). Each chunk's logits [B, chunk, V] are recomputed in the backward pass (jax.checkpoint) instead
    of kept, as MaxText's and tunix's chunked cross entropy do, so the loss holds O(B x chunk x V) at a time.
    chunk=0 projects the whole sequence at once. `unroll` unrolls the loop over chunks (same values).
    """
    predicting, targets = align_next_token(hidden, tokens)
    batch, length = targets.shape
    if chunk == 0 or chunk >= length:
        return next_token_scores(project(hidden), tokens)
    chunks = -(-length // chunk)

    def in_chunks(x):  # [B, length, ...] -> [chunks, B, chunk, ...], zero-padded at the end
        x = jnp.pad(x, ((0, 0), (0, chunks * chunk - length)) + ((0, 0),) * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(batch, chunks, chunk, *x.shape[2:]), 0, 1)

    # Unrolled, the chunks need the barriers against common-subexpression elimination that the loop gives rolled.
    scores = jax.checkpoint(lambda h, t: _target_scores(project(h), t), prevent_cse=unroll)
    per_chunk = jax.lax.scan(
        lambda _, pair: (None, scores(*pair)), None, (in_chunks(predicting), in_chunks(targets)), unroll=unroll
    )[1]
    return tuple(_to_token_frame(jnp.swapaxes(x, 0, 1).reshape(batch, -1)[:, :length]) for x in per_chunk)


def sft_loss(logprobs: jax.Array, loss_mask: jax.Array, count: jax.Array | None = None) -> jax.Array:
    """Next-token cross entropy: −`logprobs` [B, T] averaged over the tokens marked in `loss_mask` (token frame)."""
    return token_mean(-logprobs, loss_mask, count)


def group_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """GRPO advantages [B*G]: (r − group mean) / (unbiased group std + 1e-6); a group is G consecutive rewards."""
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards of shape {rewards.shape} are not a flat batch of groups of {group_size}")
    groups = rewards.astype(jnp.float32).reshape(-1, group_size)
    mean = groups.mean(axis=-1, keepdims=True)
    std = groups.std(axis=-1, keepdims=True, ddof=1)
    return ((groups - mean) / (std + ADVANTAGE_EPS)).reshape(-1)


def policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_eps: float = 0.2,
    count: jax.Array | None = None,
) -> jax.Array:
    """PPO-clipped surrogate, token mean: mean over masked tokens of max(−A·ρ, −A·clip(ρ, 1±ε)), ρ = p / p_old."""
    ratio = jnp.exp(logprobs - old_logprobs)
    advantages = advantages[:, None]
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return token_mean(jnp.maximum(unclipped, clipped), mask, count)


def kl_k3(logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array, count: jax.Array | None = None) -> jax.Array:
    """The low-variance KL(policy ‖ reference) estimator exp(ref − lp) − (ref − lp) − 1, token mean over `mask`."""
    log_ratio = ref_logprobs - logprobs
    return token_mean(jnp.exp(log_ratio) - log_ratio - 1.0, mask, count)


def mixed_groups(outcome: jax.Array, group_size: int) -> jax.Array:
    """[B] bool: whether the group of each response (group_size consecutive rows) holds both a right and a wrong one."""
    right = (outcome > 0.5).reshape(-1, group_size)
    return jnp.repeat(right.any(axis=-1) & ~right.all(axis=-1), group_size)


def spr_step_weights(
    step_logits: jax.Array,
    step_mask: jax.Array,
    outcome: jax.Array,
    axis_names: Sequence[str] = (),
    agreement_filter: bool = True,
) -> jax.Array:
    """The SPR loss's weight of each step [B, T] (position frame; docs/algorithms.md): w_pos on the kept steps of
    right trajectories, w_neg on those of wrong ones, 0 elsewhere. No gradient flows through them.

    A step is kept when its prediction agrees with the outcome [B] (1 right, 0 wrong), the released recipe's
    filter; without `agreement_filter` every step in `step_mask` is kept. The class counts are summed
    over `axis_names` (all data-parallel devices), as the released code (dp_actor.py) all-reduces them. Unlike that
    code, which adds 1 on every device before the all-reduce, the +1 is added once to the global count, so the
    weights do not depend on how the batch is split.
    """
    step_logits = jax.lax.stop_gradient(step_logits)
    right = (outcome > 0.5)[:, None]
    kept = step_mask.astype(bool)
    if agreement_filter:
        kept &= jnp.where(right, step_logits > 0, step_logits < 0)
    positive, negative = kept & right, kept & ~right
    pos, neg = positive.sum().astype(jnp.float32), negative.sum().astype(jnp.float32)
    if axis_names:  # two scalars: comms.psum, unlike jax.lax.psum, compiles over a one-replica `data` axis too
        pos, neg = comms.psum((pos, neg), tuple(axis_names))
    pos, neg = pos + 1.0, neg + 1.0
    return jnp.where(positive, SPR_POSITIVE_BOOST * neg / (pos + neg), 0.0) + jnp.where(
        negative, pos / (pos + neg), 0.0
    )


def spr_loss(
    step_logits: jax.Array, weights: jax.Array, outcome: jax.Array, weight_total: jax.Array | None = None
) -> jax.Array:
    """The self-supervised process reward loss (docs/algorithms.md): Σ w·BCEWithLogits(s, y) / (Σ w + 1e-5).

    step_logits / weights [B, T] (position frame, weights from `spr_step_weights`), outcome [B] (1 right, 0 wrong).
    The sums stay local and the gradients are averaged by the communication algorithm, as in the released code.
    `weight_total` replaces Σ w (default: this batch's).
    """
    targets = jnp.broadcast_to((outcome > 0.5)[:, None], step_logits.shape).astype(jnp.float32)
    # BCEWithLogits in its overflow-free form: max(s, 0) − s·y + log(1 + e^−|s|).
    bce = jnp.maximum(step_logits, 0.0) - step_logits * targets + jnp.log1p(jnp.exp(-jnp.abs(step_logits)))
    return (weights * bce).sum() / ((weights.sum() if weight_total is None else weight_total) + SPR_EPS)


class Totals(NamedTuple):
    """The denominators of the RL loss's averages: a replica's whole slice's, shared by its micro-batches."""

    tokens: jax.Array  # token_count(response_mask)
    spr_weights: jax.Array  # the sum of spr_step_weights


def rl_loss(
    logprobs: jax.Array,
    entropies: jax.Array,
    step_logits: jax.Array,
    response_mask: jax.Array,
    advantages: jax.Array,
    ref_logprobs: jax.Array,
    spr_weights: jax.Array,
    outcome: jax.Array,
    config: RLConfig,
    old_logprobs: jax.Array | None = None,
    totals: Totals | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO + SPR in one objective: pg + spr_coef·SPR − entropy_coef·entropy + kl_coef·KL; returns (loss, metrics).

    logprobs, entropies and ref_logprobs [B, T] (token frame, `next_token_scores`) are those of the distribution
    the responses were drawn from (logits / sampling temperature); spr_weights [B, T] come from `spr_step_weights`.
    Without `old_logprobs` the update is on-policy (one update per rollout batch): the old policy is the current
    one, detached, so ρ = 1 and the gradient is −A·∇log p. `totals` (default: this batch's own) divide the sums; a
    micro-batch passes its replica's, so that the micro-batches' losses and metrics add up to the replica's.
    """
    if totals is None:
        totals = Totals(token_count(response_mask), spr_weights.sum())
    if old_logprobs is None:
        old_logprobs = jax.lax.stop_gradient(logprobs)
    pg = policy_loss(logprobs, old_logprobs, advantages, response_mask, config.clip_eps, totals.tokens)
    kl = kl_k3(logprobs, ref_logprobs, response_mask, totals.tokens)
    mean_entropy = token_mean(entropies, response_mask, totals.tokens)
    spr = spr_loss(step_logits, spr_weights, outcome, totals.spr_weights)
    total = pg + config.spr_coef * spr - config.entropy_coef * mean_entropy + config.kl_coef * kl
    ratio = jnp.exp(logprobs - old_logprobs)
    metrics = {
        "loss": total,
        "pg_loss": pg,
        "spr_loss": spr,
        "entropy": mean_entropy,
        "kl": kl,
        "clip_fraction": token_mean(jnp.abs(ratio - 1.0) > config.clip_eps, response_mask, totals.tokens),
    }
    return total, jax.tree.map(jax.lax.stop_gradient, metrics)
