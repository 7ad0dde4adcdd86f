"""Attention on TPU: Pallas splash attention (flash attention with block-sparse masks), run per shard of a mesh.

The causal mask is by absolute slot (`CausalMask` with the cache index as offset); valid and masked key slots are two
segments (ids 1 and 0) and every query is in segment 1, so a query sees exactly the valid slots at or before its own.
Lengths are padded to whole blocks, padded key slots masked like invalid ones.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from metastone_jax.sharding import fit_spec

# Tiles: the lane width of a TPU vector register divides every block; 512 is MaxText's default block.
LANES = 128
BLOCK = 512


def splash_attention(q, k, v, kv_mask, cache_index: int, *, interpret: bool = False):
    """q [B, S, H, D] at slots cache_index + [0, S), k/v [B, T, K, D], kv_mask [B, T] -> [B, S, H, D].

    `interpret` runs the kernel in Pallas' interpreter (on any platform).
    """
    batch, seq, heads, head_dim = q.shape
    kv_len = k.shape[1]
    block_q, block_kv = (min(BLOCK, _round_up(n, LANES)) for n in (seq, kv_len))
    seq_padded, kv_padded = _round_up(seq, block_q), _round_up(kv_len, block_kv)

    def heads_major(x, length):  # [B, L, heads, D] -> [B, heads, padded L, D]
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    q = heads_major(q * jnp.asarray(head_dim**-0.5, q.dtype), seq_padded)
    k, v = heads_major(k, kv_padded), heads_major(v, kv_padded)
    segments = splash.SegmentIds(
        q=jnp.ones((batch, seq_padded), jnp.int32),
        kv=jnp.pad(kv_mask.astype(jnp.int32), ((0, 0), (0, kv_padded - kv_len))),
    )
    layout = _ShardLayout.of(q, k)
    blocks = dict.fromkeys(("block_q", "block_q_dkv", "block_q_dq"), block_q)
    blocks.update(dict.fromkeys(("block_kv", "block_kv_compute", "block_kv_dkv", "block_kv_dkv_compute"), block_kv))
    mask = splash.CausalMask((seq_padded, kv_padded), offset=cache_index)
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([mask] * (heads // layout.head_shards)),
        block_sizes=splash.BlockSizes(**blocks, block_kv_dq=block_kv),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    out = layout.apply(kernel, q, k, v, segments)
    return out[:, :, :seq].transpose(0, 2, 1, 3)


def _local(kernel, q, k, v, segments):
    return jax.vmap(kernel, in_axes=(0, 0, 0, splash.SegmentIds(0, 0)))(q, k, v, segments)


class _ShardLayout:
    """How the kernel runs on a mesh: per shard, in a shard_map over the mesh's automatic axes with batch and heads
    split as the logical rules say (`act_batch`, `act_heads`) where those axes divide them. XLA cannot partition a
    Pallas call: left to it, every device would compute attention for the whole batch.
    """

    def __init__(self, auto: set[str], batch, heads, head_shards: int, varying: tuple[str, ...]):
        self.auto, self.batch, self.heads, self.head_shards, self.varying = auto, batch, heads, head_shards, varying

    @classmethod
    def of(cls, q, k) -> _ShardLayout | None:
        mesh = jax.sharding.get_abstract_mesh()
        manual = jax.sharding.AxisType.Manual
        auto = set() if mesh.empty else {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t != manual}

        def axes(logical, size):
            if not auto:
                return None
            spec = nn.logical_to_mesh_axes((logical,))
            names = tuple(a for a in _names(spec[0]) if a in auto) or None
            return fit_spec(P(names), (size,), mesh)[0]

        batch = axes("act_batch", q.shape[0])
        heads = axes("act_heads", q.shape[1])
        if heads != axes("act_heads", k.shape[1]):  # query and key heads split alike, or not at all
            heads = None
        head_shards = math.prod(mesh.shape[a] for a in _names(heads))
        return cls(auto, batch, heads, head_shards, tuple(jax.typeof(q).manual_axis_type.varying))

    def apply(self, kernel, q, k, v, segments):
        if not self.auto:
            return _local(kernel, q, k, v, segments)
        qkv, rows = P(self.batch, self.heads), P(self.batch)
        specs = (jax.tree.map(lambda _: P(), kernel), qkv, qkv, qkv, splash.SegmentIds(rows, rows))

        @jax.custom_vjp
        def attend(kernel, q, k, v, segments):
            return self._sharded(_local, (kernel, q, k, v, segments), specs, qkv)

        def attend_forward(*args):
            return attend(*args), args

        def attend_backward(residuals, grad):
            def local_grads(kernel, q, k, v, segments, grad):
                return jax.vjp(lambda q, k, v: _local(kernel, q, k, v, segments), q, k, v)[1](grad)

            grads = self._sharded(local_grads, (*residuals, grad), (*specs, qkv), (qkv, qkv, qkv))
            return (None, *grads, None)

        attend.defvjp(attend_forward, attend_backward)
        return attend(kernel, q, k, v, segments)

    def _sharded(self, fn, args, in_specs, out_specs):
        """fn under the shard_map. The kernel's outputs carry no manual-axis types (check_vma=False), and its custom
        VJP wants the types of its gradients to equal its inputs'. Inside a shard_map manual over other axes (the
        train step's `data`) the arguments come in typed as varying over them: cast to `unreduced` they enter typed
        as nothing, and the results are cast back to varying. The casts move no data, and they sit in the rules of
        the custom VJP above, so autodiff never transposes them (the cast to varying would transpose to a psum)."""
        args = jax.tree.map(_untyped, args)
        out = jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, axis_names=self.auto, check_vma=False)(*args)
        return jax.lax.pcast(out, self.varying, to="varying") if self.varying else out


def _untyped(x):
    varying = tuple(jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(x, varying, to="unreduced") if varying else x


def _names(axes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
