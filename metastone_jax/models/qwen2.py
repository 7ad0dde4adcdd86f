"""The Qwen2 decoder (policy backbone + LM head) as Flax Linen modules.

Layers are stacked with `nn.scan` (one compiled layer body, parameters with a leading `layers` axis). The scan
carries the input of the layer it just ran next to its output, so after the last layer the carry also holds
the input to the last decoder layer: the SPRM feature (transformers' `hidden_states[-2]`), for free.

The KV cache is an explicit pytree {"k", "v"} of [layers, batch, cache_length, kv_heads, head_dim] arrays.
Cache slots are absolute: a call writes its S tokens at slots [cache_index, cache_index + S) and every query at
slot i attends to key slots j <= i whose `kv_mask` is True (left padding is masked out, not shifted).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from metastone_jax.config import Qwen2Config
from metastone_jax.models.attention import attention
from metastone_jax.models.linear import matmul

Dtype = Any
KVCache = dict[str, jax.Array]


def _init(names: tuple[str | None, ...], init=None, stddev: float = 0.02):
    return nn.with_logical_partitioning(init or nn.initializers.normal(stddev), names)


class RMSNorm(nn.Module):
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", _init(("norm",), nn.initializers.ones), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # Like transformers: normalise in float32, cast back, then scale.
        return scale.astype(self.dtype) * normed.astype(self.dtype)


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates [batch, seq, heads, head_dim] by positions [batch, seq] (the half-split layout of transformers)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, half]
    return _rotate(x, jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :])


@jax.custom_vjp
def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Each pair (x[..., i], x[..., i + half]) rotated by the angle whose cosine and sine are given, in float32."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _rotate_forward(x, cos, sin):
    return _rotate(x, cos, sin), (cos, sin)


def _rotate_backward(residuals, grad):
    # The gradient of a rotation is the inverse rotation: one concatenation, where autodiff would pad both halves.
    cos, sin = residuals
    return _rotate(grad, cos, -sin), None, None


_rotate.defvjp(_rotate_forward, _rotate_backward)


class HeadProjection(nn.Module):
    """x [..., *in] -> [..., *features] with one kernel [*in, *features] (in = the last `contract` axes of x).

    Written out instead of nn.DenseGeneral, whose flattened kernel init loses the logical axis names. The leading
    axes are folded into one before the matmul, whose backward XLA:CPU runs much faster in 2-D than with two
    batch-like axes (BENCHMARKS.md, the model section).
    """

    features: tuple[int, ...]
    names: tuple[str | None, ...]
    contract: int = 1
    use_bias: bool = True
    stddev: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*x.shape[-self.contract :], *self.features)
        kernel = self.param("kernel", _init(self.names, stddev=self.stddev), shape, self.param_dtype)
        leading, contracted = x.shape[: -self.contract], x.shape[-self.contract :]
        flat = x.reshape(-1, math.prod(contracted)).astype(self.dtype)
        y = matmul(flat, kernel.astype(self.dtype).reshape(flat.shape[1], -1)).reshape(*leading, *self.features)
        if self.use_bias:
            bias_names = self.names[self.contract :]
            bias = self.param("bias", _init(bias_names, nn.initializers.zeros), self.features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class Attention(nn.Module):
    """Grouped-query attention with bias on q/k/v, none on o."""

    config: Qwen2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_mask, cache: KVCache | None, cache_index):
        cfg = self.config
        heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        def projection(name, num_heads, logical_heads):
            return HeadProjection(
                (num_heads, head_dim),
                ("embed", logical_heads, "head_dim"),
                use_bias=True,
                stddev=cfg.initializer_range,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )(x)

        q = projection("q_proj", heads, "heads")  # [batch, seq, heads, head_dim]
        k = projection("k_proj", kv_heads, "kv_heads")  # [batch, seq, kv_heads, head_dim]
        v = projection("v_proj", kv_heads, "kv_heads")
        q = nn.with_logical_constraint(
            rotary_embedding(q, positions, cfg.rope_theta), ("act_batch", "act_length", "act_heads", None)
        )
        k = rotary_embedding(k, positions, cfg.rope_theta)

        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1)
            cache = {"k": k, "v": v}
        k = nn.with_logical_constraint(k, ("act_batch", "cache_length", "act_kv_heads", None))
        v = nn.with_logical_constraint(v, ("act_batch", "cache_length", "act_kv_heads", None))

        out = attention(q, k.astype(self.dtype), v.astype(self.dtype), kv_mask, cache_index)
        out = HeadProjection(
            (cfg.hidden_size,),
            ("heads", "head_dim", "embed"),
            contract=2,
            use_bias=False,
            stddev=cfg.initializer_range,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="o_proj",
        )(out)
        return out, cache


class MLP(nn.Module):
    config: Qwen2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config

        def dense(name, features, names):
            return HeadProjection(
                (features,),
                names,
                use_bias=False,
                stddev=cfg.initializer_range,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        gate = dense("gate_proj", cfg.intermediate_size, ("embed", "mlp"))(x)
        up = dense("up_proj", cfg.intermediate_size, ("embed", "mlp"))(x)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        return dense("down_proj", cfg.hidden_size, ("mlp", "embed"))(hidden)


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer; as a scan body it carries (hidden, input of this layer)."""

    config: Qwen2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, carry, cache: KVCache | None, positions, kv_mask, cache_index):
        x, _ = carry
        norm = lambda name: RMSNorm(self.config.rms_norm_eps, self.dtype, self.param_dtype, name=name)  # noqa: E731
        attn_out, cache = Attention(self.config, self.dtype, self.param_dtype, name="self_attn")(
            norm("input_layernorm")(x), positions, kv_mask, cache, cache_index
        )
        h = x + attn_out
        h = h + MLP(self.config, self.dtype, self.param_dtype, name="mlp")(norm("post_attention_layernorm")(h))
        h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_embed"))
        return (h, x), cache


class Qwen2Model(nn.Module):
    """Embedding, the decoder stack and the final norm. Returns (final hidden, input of the last layer, cache)."""

    config: Qwen2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = True  # False unrolls the stack (parameters stay stacked): faster on CPU, slower to compile

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=_init(("vocab", "embed"), stddev=cfg.initializer_range),
        )
        # cache_index (argument 5, counting self) stays static through remat where it is a Python int (training,
        # prefill): traced, it would send those passes down the decoding path, full [seq, kv_len] scores per head,
        # instead of the platform's kernel. A traced index (decoding) stays traced. Unrolled layers need remat's
        # barriers against common-subexpression elimination, which would merge the recomputation with the forward
        # pass (and keep its activations); the scan's loops keep them apart, so scanned layers go without.
        remat = functools.partial(nn.remat, prevent_cse=not self.scan_layers, static_argnums=(5,))
        layer = remat(DecoderLayer) if self.remat else DecoderLayer
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_hidden_layers,
            unroll=1 if self.scan_layers else cfg.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.dtype, self.param_dtype)
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype)

    def __call__(self, tokens, positions, kv_mask, cache: KVCache | None, cache_index):
        # FSDP semantics: gather the table whole before the lookup. (A lookup from the fsdp-sharded table with a
        # batch-sharded result aborts XLA's partitioner inside a shard_map manual over `data`.)
        table = nn.with_logical_constraint(self.embed_tokens.embedding, (None, None))
        x = jnp.take(table, tokens, axis=0).astype(self.dtype)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        (x, last_layer_input), cache = self.layers((x, x), cache, positions, kv_mask, cache_index)
        return self.norm(x), last_layer_input, cache

    def attend(self, hidden):
        return self.embed_tokens.attend(hidden)


def init_cache(config: Qwen2Config, batch: int, length: int, dtype=jnp.float32) -> KVCache:
    """An empty KV cache: {"k", "v"} of [layers, batch, length, kv_heads, head_dim]."""
    shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
