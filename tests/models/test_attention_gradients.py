"""The hand-written backward passes of attention (query blocks, key prefixes, rotary, the two batched matmuls)
equal JAX's autodiff of a plain single-block attention written out here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metastone_jax.models import attention, qwen2


def _plain_attention(q, k, v, kv_mask, cache_index, theta):
    """Rotary + grouped-query causal softmax attention in one block, heads repeated: no custom gradient anywhere."""
    seq, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[-1]
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (np.arange(half) * 2.0 / head_dim)

    def rotate(x, positions):
        angles = positions[:, None] * inv_freq
        cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    q = rotate(q, cache_index + np.arange(seq, dtype=np.float32))
    k = rotate(k, np.arange(kv_len, dtype=np.float32))
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bshd,bthd->bhst", q, k) / np.sqrt(head_dim)
    visible = (np.arange(kv_len)[None, :] <= cache_index + np.arange(seq)[:, None])[None, None] & kv_mask[:, None, None]
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhst,bthd->bshd", probs, v)


def _ours(q, k, v, kv_mask, cache_index, theta):
    seq, kv_len = q.shape[1], k.shape[1]
    q_positions = jnp.broadcast_to(cache_index + jnp.arange(seq), q.shape[:2])
    k_positions = jnp.broadcast_to(jnp.arange(kv_len), k.shape[:2])
    q = qwen2.rotary_embedding(q, q_positions, theta)
    k = qwen2.rotary_embedding(k, k_positions, theta)
    return attention.attention(q, k, v, kv_mask, cache_index)


@pytest.mark.parametrize(
    "seq,kv_len,cache_index,heads,kv_heads",
    [
        pytest.param(75, 75, 0, 4, 2, id="blocks-32-32-11"),
        pytest.param(256, 256, 0, 8, 2, id="8-blocks-gqa4"),
        pytest.param(40, 96, 16, 2, 2, id="prefill-into-longer-cache"),
        pytest.param(20, 20, 0, 4, 1, id="one-block-mqa"),
    ],
)
def test_attention_gradients_equal_autodiff_of_plain_attention(seq, kv_len, cache_index, heads, kv_heads):
    rng = np.random.default_rng(seq)
    batch, head_dim, theta = 2, 8, 500.0
    q = rng.standard_normal((batch, seq, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_len, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_len, kv_heads, head_dim)).astype(np.float32)
    weights = rng.standard_normal((batch, seq, heads, head_dim)).astype(np.float32)
    kv_mask = rng.random((batch, kv_len)) > 0.2
    kv_mask[:, 0] = True  # every query sees at least one key

    def loss(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v, kv_mask, cache_index, theta) * weights)

    np.testing.assert_allclose(
        _ours(q, k, v, kv_mask, cache_index, theta), _plain_attention(q, k, v, kv_mask, cache_index, theta), atol=1e-5
    )
    ours = jax.jit(jax.grad(loss(_ours), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.jit(jax.grad(loss(_plain_attention), argnums=(0, 1, 2)))(q, k, v)
    for name, got, want in zip("qkv", ours, expected):
        np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0, err_msg=f"d{name}")


def test_attention_gradients_in_bfloat16_keep_the_input_dtypes_and_track_float32():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in [(2, 70, 4, 8), (2, 70, 2, 8), (2, 70, 2, 8)])
    kv_mask = np.ones((2, 70), bool)

    def loss(q, k, v):
        return jnp.sum(_ours(q, k, v, kv_mask, 0, 10000.0).astype(jnp.float32) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    low = grad(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
    full = grad(q, k, v)
    for got, want in zip(low, full):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.03 * np.abs(want).max(), rtol=0)
