"""The self-supervised process reward model (SPRM): a tiny head on the policy's features, and how steps are scored.

Facts from the released MetaStone-S1 code: the head reads the input to the last decoder layer (before any norm),
is Dense(C -> 2C), ReLU, Dropout(0.5), Dense(2C -> 1), and gives one logit per position. A step ends at the
delimiter `.\\n\\n`; its score is read at the position *before* the delimiter (whose next-token prediction is the
delimiter). A trajectory's score is the geometric mean of its step scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Step scores are clamped away from 0 before the geometric mean (log of 0 would swallow every other step).
MIN_STEP_SCORE = 1e-6


class SPRMHead(nn.Module):
    """Dense(C -> 2C), ReLU, Dropout(0.5), Dense(2C -> 1): features [..., C] -> step logits [...]."""

    hidden_size: int
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, deterministic: bool = True) -> jax.Array:
        def dense(name, features_out, names):
            return nn.Dense(
                features_out,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]),
                name=name,
            )

        h = nn.relu(dense("hidden", 2 * self.hidden_size, ("embed", "mlp"))(features))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return dense("out", 1, ("mlp", None))(h)[..., 0].astype(jnp.float32)


def _shift_right(x: jax.Array, by: int, fill) -> jax.Array:
    """x[:, t - by] at position t (fill where t < by), along the last axis."""
    if by == 0:
        return x
    pad = jnp.full(x.shape[:-1] + (by,), fill, x.dtype)
    return jnp.concatenate([pad, x[..., :-by]], axis=-1)


def _shift_left(x: jax.Array, by: int, fill) -> jax.Array:
    """x[:, t + by] at position t (fill past the end), along the last axis."""
    if by == 0:
        return x
    pad = jnp.full(x.shape[:-1] + (by,), fill, x.dtype)
    return jnp.concatenate([x[..., by:], pad], axis=-1)


def step_score_mask(
    tokens: jax.Array,
    delimiter_ids: Sequence[int],
    think_open_id: int | None = None,
    think_close_id: int | None = None,
    response_mask: jax.Array | None = None,
) -> jax.Array:
    """[batch, seq] bool: True at every position whose step logit scores a reasoning step.

    Rules: a delimiter (the token sequence `delimiter_ids`) ends a step; only the first delimiter of a run counts;
    a delimiter directly after `<think>` does not; only delimiters inside the think span count (after `<think>`,
    before `</think>`; the whole response when neither tag is there). The mark goes on the position just before
    the delimiter. `response_mask` [batch, seq] restricts everything to the response (prompt tokens never count).
    """
    tokens = jnp.asarray(tokens)
    in_response = jnp.ones(tokens.shape, bool) if response_mask is None else jnp.asarray(response_mask, bool)
    width = len(delimiter_ids)
    # starts[t]: a delimiter occupies t .. t+width-1, all inside the response.
    starts = in_response
    for i, token_id in enumerate(delimiter_ids):
        starts = starts & _shift_left((tokens == token_id) & in_response, i, False)
    # Only the first of a run: drop a delimiter that starts exactly where a previous one ended.
    starts = starts & ~_shift_right(starts, width, False)
    # The think span: after the (last) <think> of the response, or from its start when the prompt opened it
    # (as DeepSeek-R1 distills do); up to the first </think> after that, or to the end.
    inside = in_response
    if think_open_id is not None:
        is_open = (tokens == think_open_id) & in_response
        starts = starts & ~_shift_right(is_open, 1, False)
        after_open = (jnp.cumsum(is_open[..., ::-1], axis=-1)[..., ::-1] - is_open) == 0
        inside = jnp.where(is_open.any(axis=-1, keepdims=True), after_open & ~is_open, inside)
    if think_close_id is not None:
        is_close = (tokens == think_close_id) & inside
        inside = inside & (jnp.cumsum(is_close, axis=-1) == 0)
    starts = starts & inside & _shift_left(inside, width - 1, False)
    # Score at the position before the delimiter; a delimiter at position 0 has none.
    return _shift_left(starts, 1, False)


def trajectory_score(step_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """[batch]: geometric mean of the masked step scores (each clamped to >= 1e-6); 0 for a trajectory with no step."""
    log_scores = jnp.log(jnp.clip(jax.nn.sigmoid(step_logits.astype(jnp.float32)), MIN_STEP_SCORE, 1.0))
    count = mask.sum(axis=-1)
    mean_log = jnp.where(mask, log_scores, 0.0).sum(axis=-1) / jnp.maximum(count, 1)
    return jnp.where(count > 0, jnp.exp(mean_log), 0.0)
