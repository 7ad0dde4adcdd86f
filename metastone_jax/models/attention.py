"""Causal grouped-query attention by platform, behind one function: `attention(q, k, v, kv_mask, cache_index)`.

Queries sit at cache slots cache_index + [0, S); a query at slot i attends to the key slots j <= i whose kv_mask is
True (left padding is masked key slots, causality is by absolute slot). The paths build their masks from kv_mask
[batch, kv_len] where they need them: none on TPU (the kernel masks by block and by segment), one per query block on
CPU, one [batch, 1, seq, kv_len] on GPU (the only form cuDNN takes), never one per head.

- TPU: Pallas splash attention (flash attention with block-sparse causal masks; kv_mask as segment ids), in
  `models/splash.py`.
- GPU: `jax.nn.dot_product_attention`, cuDNN's fused kernel for half precision where cuDNN takes the shapes.
- CPU: blocked attention: query blocks each against only the key slots they can see, with hand-written backward
  passes that keep XLA:CPU on its fast matmul paths.
- Decoding (a traced cache_index): one masked pass over the cache on every platform; it has one or a few queries.

The platform is the one the traced program runs on: that of the mesh in context (a shard_map's, or `jax.set_mesh`),
else JAX's default backend, so that a CPU host compiling ahead of time for TPU devices traces the TPU path.
(`jax.lax.platform_dependent` would trace and differentiate every path: the residuals of a switch are joined over
its branches, so the TPU program would carry zero-filled copies of the CPU path's saved probabilities, and the
cuDNN path cannot be traced at all on a host without cuDNN.)
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp

from metastone_jax.models.splash import splash_attention

GPU_PLATFORMS = ("gpu", "cuda", "rocm")
# Causal attention on CPU runs in this many query blocks, each against only the keys it can see: about half the work
# of the full [seq, kv_len] scores, and tiles that stay in cache (on CPU this is what closes the gap to torch's fused
# SDPA kernel).
QUERY_BLOCKS = 8
MIN_QUERY_BLOCK = 32


def attention(q, k, v, kv_mask, cache_index):
    """Grouped-query causal attention: q [B, S, H, D] at slots cache_index + [0, S), k/v [B, T, K, D], kv_mask [B, T].

    Returns [B, S, H, D]. A query whose slot sees no valid key (left padding) gets an arbitrary finite output.
    """
    if not isinstance(cache_index, int):
        return _attention_block(q, k, v, visible_keys(kv_mask, q.shape[1], cache_index))
    platform = _platform()
    if platform == "tpu":
        return splash_attention(q, k, v, kv_mask, cache_index)
    if platform in GPU_PLATFORMS:
        return gpu_attention(q, k, v, kv_mask, cache_index)
    return blocked_attention(q, k, v, kv_mask, cache_index)


def _platform() -> str:
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def visible_keys(kv_mask: jax.Array, seq: int, first_slot) -> jax.Array:
    """[batch, seq, kv_len] bool: query slot first_slot + s sees key slot t iff t <= that slot and kv_mask[t]."""
    causal = jnp.arange(kv_mask.shape[-1])[None, :] <= first_slot + jnp.arange(seq)[:, None]
    return causal[None] & kv_mask[:, None, :].astype(bool)


# ----------------------------------------------------------------------------------------------- GPU


def gpu_attention(q, k, v, kv_mask, cache_index: int, implementation: str | None = "cudnn"):
    """`jax.nn.dot_product_attention` with a [B, 1, S, T] mask (cuDNN takes masks whole: its bias must be [S, T]).

    cuDNN's fused kernel runs in half precision and a subset of shapes; where it refuses (or there is no cuDNN),
    XLA's implementation computes the same. Starting at slot 0 the causal mask is also declared, so that cuDNN skips
    the blocks above the diagonal.
    """
    mask = visible_keys(kv_mask, q.shape[1], cache_index)[:, None]

    def attend(implementation):
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=cache_index == 0, implementation=implementation
        )

    if implementation != "cudnn":
        return attend(implementation)
    try:
        return attend("cudnn")
    except (RuntimeError, ValueError, NotImplementedError):  # no cuDNN, or a dtype/shape it does not take
        return attend(None)


# ----------------------------------------------------------------------------------------------- CPU


def blocked_attention(q, k, v, kv_mask, cache_index: int):
    """The queries split into blocks, each against only the key slots up to its last query's slot (later slots are
    causally masked anyway), with hand-written backward passes."""
    seq, kv_len = q.shape[1], k.shape[1]
    block = max(MIN_QUERY_BLOCK, -(-seq // QUERY_BLOCKS))
    starts = range(0, seq, block)
    sizes = tuple(min(block, seq - start) for start in starts)
    keys = tuple(min(kv_len, cache_index + start + size) for start, size in zip(starts, sizes))
    blocks = zip(starts, sizes, keys, _split(q, sizes), _prefixes(k, keys, kv_len), _prefixes(v, keys, kv_len))
    outputs = [
        _attention_block(qb, kb, vb, visible_keys(kv_mask[:, :t], n, cache_index + s)) for s, n, t, qb, kb, vb in blocks
    ]
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
