"""Causal grouped-query attention, behind one function: `attention(q, k, v, mask, cache_index)`.

The implementation here is blocked: the queries are split into blocks, each against only the key slots it can see,
with hand-written backward passes that keep XLA:CPU on its fast matmul paths.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp

# Causal attention runs in this many query blocks, each against only the keys it can see: about half the work of
# the full [seq, kv_len] scores, and tiles that stay in cache (on CPU this is what closes the gap to torch's fused
# SDPA kernel).
QUERY_BLOCKS = 8
MIN_QUERY_BLOCK = 32


def attention(q, k, v, mask, cache_index):
    """Grouped-query causal attention. q [B, S, H, D] at slots cache_index + [0, S), k/v [B, T, K, D], mask [B, S, T].

    With a static `cache_index` the queries are split into blocks and each block reads only key slots up to its last
    query's slot (the mask is causal, so later slots are masked anyway); a traced one (decoding) reads all T.
    """
    seq, kv_len = q.shape[1], k.shape[1]
    if not isinstance(cache_index, int):
        return _attention_block(q, k, v, mask)
    block = max(MIN_QUERY_BLOCK, -(-seq // QUERY_BLOCKS))
    starts = range(0, seq, block)
    sizes = tuple(min(block, seq - start) for start in starts)
    keys = tuple(min(kv_len, cache_index + start + size) for start, size in zip(starts, sizes))
    blocks = zip(starts, sizes, keys, _split(q, sizes), _prefixes(k, keys, kv_len), _prefixes(v, keys, kv_len))
    outputs = [_attention_block(qb, kb, vb, mask[:, s : s + n, :t]) for s, n, t, qb, kb, vb in blocks]
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)


# The query blocks and key prefixes are slices of the sequence axis. Their own gradients would pad every block's
# gradient back to the full length and add them all up (one pass over [B, S, ...] per block); these assemble it
# with one concatenation instead.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _split(x: jax.Array, sizes: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """x split along axis 1 into consecutive pieces of `sizes`."""
    bounds = itertools.accumulate(sizes, initial=0)
    return tuple(jax.lax.slice_in_dim(x, lo, hi, axis=1) for lo, hi in itertools.pairwise(bounds))


def _split_forward(x, sizes):
    return _split(x, sizes), None


def _split_backward(sizes, _, grads):
    return (jnp.concatenate(grads, axis=1),)


_split.defvjp(_split_forward, _split_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _prefixes(x: jax.Array, lengths: tuple[int, ...], length: int) -> tuple[jax.Array, ...]:
    """x[:, :n] for each n of the non-decreasing `lengths` (x.shape[1] == length)."""
    return tuple(jax.lax.slice_in_dim(x, 0, n, axis=1) for n in lengths)


def _prefixes_forward(x, lengths, length):
    return _prefixes(x, lengths, length), None


def _prefixes_backward(lengths, length, _, grads):
    # Slots [lengths[j-1], lengths[j]) are in prefixes j, j+1, ...: sum those, then concatenate the segments.
    segments = []
    for j, (lo, hi) in enumerate(itertools.pairwise((0, *lengths))):
        if hi > lo:
            segments.append(sum(jax.lax.slice_in_dim(g, lo, hi, axis=1) for g in grads[j:]))
    if lengths[-1] < length:  # slots no prefix reads
        last = grads[-1]
        segments.append(jnp.zeros((last.shape[0], length - lengths[-1], *last.shape[2:]), last.dtype))
    return (jnp.concatenate(segments, axis=1),)


_prefixes.defvjp(_prefixes_forward, _prefixes_backward)


def _attention_block(q, k, v, mask):
    """Grouped-query attention as batched matmuls with one batch axis (batch x kv_heads).

    q [B, S, H, D], k/v [B, T, K, D], mask [B, S, T] -> [B, S, H, D]; softmax in float32. One batch axis keeps
    XLA:CPU on its fast batched-matmul path (its backward of 4-D einsums is several times slower).
    """
    batch, seq, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    # [B, S, K, G, D] -> [B*K, G*S, D]
    q = q.reshape(batch, seq, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch * kv_heads, groups * seq, head_dim)
    k = k.transpose(0, 2, 1, 3).reshape(batch * kv_heads, kv_len, head_dim)
    v = v.transpose(0, 2, 1, 3).reshape(batch * kv_heads, kv_len, head_dim)
    scores = _scores(q, k) * head_dim**-0.5
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]  # [B, 1, 1, S, T]
    scores = scores.reshape(batch, kv_heads, groups, seq, kv_len) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(batch * kv_heads, groups * seq, kv_len)
    out = _mix_values(probs, v).reshape(batch, kv_heads, groups, seq, head_dim)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, heads, head_dim)


# The key and value gradients of attention contract the query axis of both operands (ds^T q, p^T do). XLA:CPU runs
# such a batched dot much slower than one contracting the last axis of its left operand (BENCHMARKS.md, the model
# section), so on CPU these two backward passes compute (b^T a)^T instead, with only the small [n, q, head_dim]
# operand and result transposed.
@jax.custom_vjp
def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """q [n, q, d] . k [n, t, d] -> [n, q, t] in float32."""
    return jnp.einsum("nqd,ntd->nqt", q, k, preferred_element_type=jnp.float32)


def _scores_forward(q, k):
    return _scores(q, k), (q, k)


def _scores_backward(residuals, grad):
    q, k = residuals
    dq = jnp.einsum("nqt,ntd->nqd", grad, k, preferred_element_type=jnp.float32)
    return dq.astype(q.dtype), _contract_queries(grad, q).astype(k.dtype)


_scores.defvjp(_scores_forward, _scores_backward)


@jax.custom_vjp
def _mix_values(p: jax.Array, v: jax.Array) -> jax.Array:
    """p [n, q, t] . v [n, t, d] -> [n, q, d]."""
    return jnp.einsum("nqt,ntd->nqd", p, v)


def _mix_values_forward(p, v):
    return _mix_values(p, v), (p, v)


def _mix_values_backward(residuals, grad):
    p, v = residuals
    dp = jnp.einsum("nqd,ntd->nqt", grad, v, preferred_element_type=jnp.float32)
    return dp.astype(p.dtype), _contract_queries(p, grad).astype(v.dtype)


_mix_values.defvjp(_mix_values_forward, _mix_values_backward)


def _contract_queries(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [n, q, x], b [n, q, y] -> a^T b [n, x, y] in float32, for a small y."""

    def cpu(a, b):
        # The barriers keep XLA from folding the transposes back into the dot's dimension numbers.
        bt = jax.lax.optimization_barrier(jnp.swapaxes(b, 1, 2))
        out = jnp.einsum("nyq,nqx->nyx", bt, a, preferred_element_type=jnp.float32)
        return jnp.swapaxes(jax.lax.optimization_barrier(out), 1, 2)

    def default(a, b):
        return jnp.einsum("nqx,nqy->nxy", a, b, preferred_element_type=jnp.float32)

    return jax.lax.platform_dependent(a, b, cpu=cpu, default=default)
