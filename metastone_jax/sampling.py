"""Batched generation with the explicit KV cache, reading the SPRM step logits from the same forward passes.

One prefill over the B left-padded prompts fills the cache; the cache is then repeated k times (rows
i*k .. i*k+k-1 sample prompt i) and a `jax.lax.while_loop` decodes one token per row and step until every row has
emitted an EOS or `max_new_tokens` tokens exist. Because prompts are left-padded, all rows write the same cache slot
at each step; rotary positions count real tokens only.

Step logits come for free: prefill gives them for the prompt, and each decode step gives the logit of the token it
feeds. The last generated token of a row is never fed (no extra forward), so its step logit is 0 — it cannot be
scored anyway: a step is scored at the position *before* its delimiter, and that position is always fed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from metastone_jax.config import SamplingConfig
from metastone_jax.models.qwen2 import init_cache
from metastone_jax.models.reflective import ReflectiveModel
from metastone_jax.models.sprm import step_score_mask, trajectory_score


class SampleOutput(NamedTuple):
    sequences: jax.Array  # [B*k, P+N] int32: prompt (left-padded) then response, pad after EOS
    prompt_mask: jax.Array  # [B*k, P+N] bool: real prompt tokens
    response_mask: jax.Array  # [B*k, P+N] bool: generated tokens up to and including the EOS
    step_logits: jax.Array | None  # [B*k, P+N] float32 SPRM logits (0 at pads and at each row's last token)
    lengths: jax.Array  # [B*k] int32 number of generated tokens (EOS included)


def filter_logits(logits: jax.Array, top_p: float = 1.0, top_k: int = 0) -> jax.Array:
    """logits [..., vocab] with tokens outside the top-k and outside the top-p nucleus set to -inf.

    Ties at a threshold are kept. The nucleus is the smallest set of most likely tokens whose probability reaches
    top_p (the most likely token is always in it).
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth_largest, logits, -jnp.inf)
    if top_p < 1.0:
        descending = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(descending, kept - 1, axis=-1)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return logits


def next_tokens(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
    """[rows, vocab] float32 -> [rows] int32: argmax at temperature 0, else a draw from the filtered distribution."""
    if config.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits / config.temperature, config.top_p, config.top_k)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def sample(
    module: ReflectiveModel,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    *,
    config: SamplingConfig,
    eos_ids: Sequence[int],
    pad_id: int,
    num_samples: int = 1,
) -> SampleOutput:
    """Samples `num_samples` responses per LEFT-padded prompt [B, P]; rows i*k .. i*k+k-1 belong to prompt i.

    Jitted; pure in (params, prompts, key). `key` is one key for the call, or [B] keys, one per prompt: row i*k+j
    then draws from fold_in(key[i], j) alone, so a prompt's samples do not depend on the other prompts of the call
    (rollouts sampled in chunks of prompts equal one call). Works under `jax.set_mesh` with sharded params and inside
    a shard_map manual over `data` (there, fold the replica index into `key` for different draws per replica). The
    logical-axis rules in effect at the call (`nn.logical_axis_rules`) are applied inside. Every prompt needs a real
    last token.
    """
    prompt_tokens, prompt_mask = jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(prompt_mask, bool)
    if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_tokens {prompt_tokens.shape} and prompt_mask {prompt_mask.shape} must both be "
            "[batch, prompt_length]"
        )
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be at least 1")
    if len(eos_ids) == 0:
        raise ValueError("eos_ids is empty; pass at least one end-of-sequence token id")
    if key.shape not in ((), prompt_tokens.shape[:1]):
        raise ValueError(f"key of shape {key.shape} must be one key or one per prompt ({prompt_tokens.shape[0]},)")
    # Flax keeps the rules in a thread-local that jit does not see; passing them as a static argument keys the
    # compilation cache on them.
    rules = tuple(
        (name, tuple(target) if isinstance(target, list) else target) for name, target in nn.get_logical_axis_rules()
    )
    # EOS and pad ids are data, not compile-time constants: another tokenizer does not recompile.
    return _sample(
        module,
        params,
        prompt_tokens,
        prompt_mask,
        key,
        jnp.asarray(eos_ids, jnp.int32),
        jnp.asarray(pad_id, jnp.int32),
        config,
        num_samples,
        rules,
    )


class _DecodeState(NamedTuple):
    step: jax.Array  # index of the response token fed in this iteration
    cache: Any
    response: jax.Array  # [rows, N] generated tokens, pad where none yet
    response_logits: jax.Array  # [rows, N] step logit of each fed response token
    done: jax.Array  # [rows] bool: EOS emitted
    lengths: jax.Array  # [rows] int32


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9))
def _sample(module, params, prompt_tokens, prompt_mask, key, eos, pad_id, config, num_samples, rules):
    with nn.logical_axis_rules(rules):
        return _generate(module, params, prompt_tokens, prompt_mask, key, eos, pad_id, config, num_samples)


def _generate(module, params, prompt_tokens, prompt_mask, key, eos, pad_id, config, num_samples):
    batch, prompt_length = prompt_tokens.shape
    new_tokens = config.max_new_tokens
    rows = batch * num_samples

    def forward(tokens, positions, kv_mask, cache, cache_index):
        return module.apply({"params": params}, tokens, positions, kv_mask, cache, cache_index)

    # Rotary position = number of real tokens before; slots of the response are valid once written (the causal
    # mask hides the ones not written yet).
    prompt_positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
    kv_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, new_tokens), bool)], axis=-1)
    cache = init_cache(module.config, batch, prompt_length + new_tokens, module.dtype)
    prefill = forward(prompt_tokens, prompt_positions, kv_mask, cache, 0)

    def repeat(x):
        return jnp.repeat(x, num_samples, axis=0)

    cache = jax.tree.map(lambda x: jnp.repeat(x, num_samples, axis=1), prefill.cache)  # [layers, rows, ...]
    kv_mask = repeat(kv_mask)
    real_prompt_lengths = repeat(prompt_mask.sum(axis=-1).astype(jnp.int32))

    if key.ndim:
        row_keys = jax.vmap(jax.random.fold_in)(repeat(key), jnp.tile(jnp.arange(num_samples), batch))

        def draw(logits, index):  # [rows, vocab] -> [rows]: row r from fold_in(row_keys[r], index)
            keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, index)
            return jax.vmap(lambda row, row_key: next_tokens(row[None], row_key, config)[0])(logits, keys)
    else:

        def draw(logits, index):
            return next_tokens(logits, jax.random.fold_in(key, index), config)

    first = draw(repeat(prefill.logits[:, -1]), 0)
    response = jnp.full((rows, new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    # Initial carries are built *like* arrays computed from the prompts so that, inside a shard_map, they vary over
    # the manual axes as the loop body's outputs do (while_loop demands equal types).
    state = _DecodeState(
        step=jnp.int32(0),
        cache=cache,
        response=response,
        response_logits=jnp.zeros_like(response, jnp.float32),
        done=jnp.isin(first, eos),
        lengths=jnp.ones_like(first),
    )

    def keep_going(state: _DecodeState):
        return (state.step < new_tokens - 1) & ~jnp.all(state.done)

    def decode(state: _DecodeState) -> _DecodeState:
        fed = jax.lax.dynamic_index_in_dim(state.response, state.step, axis=1)  # [rows, 1]
        positions = (real_prompt_lengths + state.step)[:, None]
        out = forward(fed, positions, kv_mask, state.cache, prompt_length + state.step)
        drawn = draw(out.logits[:, 0], state.step + 1)
        token = jnp.where(state.done, pad_id, drawn)
        response_logits = state.response_logits
        if out.step_logits is not None:
            response_logits = jax.lax.dynamic_update_index_in_dim(
                response_logits, out.step_logits[:, 0], state.step, axis=1
            )
        return _DecodeState(
            step=state.step + 1,
            cache=out.cache,
            response=jax.lax.dynamic_update_index_in_dim(state.response, token, state.step + 1, axis=1),
            response_logits=response_logits,
            done=state.done | jnp.isin(token, eos),
            lengths=state.lengths + (~state.done).astype(jnp.int32),
        )

    state = jax.lax.while_loop(keep_going, decode, state)

    response_slots = jnp.arange(new_tokens)[None, :]
    in_response = response_slots < state.lengths[:, None]
    sequences = jnp.concatenate([repeat(prompt_tokens), state.response], axis=-1)
    prompt_mask_out = jnp.concatenate([repeat(prompt_mask), jnp.zeros((rows, new_tokens), bool)], axis=-1)
    response_mask = jnp.concatenate([jnp.zeros((rows, prompt_length), bool), in_response], axis=-1)
    step_logits = None
    if prefill.step_logits is not None:
        # Keep what was fed and followed by a generated token: real prompt positions and all but the last response
        # token (a finished row kept feeding pads, whose logits mean nothing).
        fed_response = response_slots < state.lengths[:, None] - 1
        step_logits = jnp.concatenate(
            [
                repeat(jnp.where(prompt_mask, prefill.step_logits, 0.0)),
                jnp.where(fed_response, state.response_logits, 0.0),
            ],
            axis=-1,
        )
    return SampleOutput(sequences, prompt_mask_out, response_mask, step_logits, state.lengths)


def trajectory_scores(
    output: SampleOutput, delimiter_ids: Sequence[int], think_ids: tuple[int, int] | None = None
) -> tuple[jax.Array, jax.Array]:
    """(step mask [B*k, P+N] bool, trajectory score [B*k]) of sampled responses; think_ids = (<think>, </think>)."""
    if output.step_logits is None:
        raise ValueError("the sampled model has no SPRM head (with_head=False): there are no step logits to score")
    think_open, think_close = think_ids if think_ids is not None else (None, None)
    mask = step_score_mask(output.sequences, tuple(delimiter_ids), think_open, think_close, output.response_mask)
    return mask, trajectory_score(output.step_logits, mask)
