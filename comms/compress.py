"""Compressors whose payloads go over the wire as `uint8`: 1-bit sign+scale, BAGUA's MinMaxUInt8 and block-wise int4.

Every compressor works along the last axis, so a `[chunks, chunk_len]` array compresses chunk by chunk (block by
block). Only the small per-chunk headers (a scale, min and max, or the largest magnitude) stay float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# Planar bit order: a row of 8*m values packs into m bytes, and bit j (most significant first) of byte i holds
# value j*m + i, i.e. numpy.packbits over the rows of x.reshape(8, m). Every bit plane is then a contiguous slice,
# so packing and unpacking are whole-vector shifts that vectorize (8 adjacent values per byte do not, on CPU).
_BIT_SHIFTS = np.arange(7, -1, -1, dtype=np.uint8)[:, None]  # NumPy: importing comms must not start a backend
# MinMaxUInt8 keeps a zero range from dividing by zero (BAGUA's constant).
_MINMAX_EPS = 1e-7
_LEVELS = 255.0
# Symmetric 4-bit codes -7..7 (15 levels, zero exact), stored as code + 8 in a nibble.
_INT4_LEVELS = 7
_INT4_OFFSET = 8


def padded_size(numel: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that holds `numel` values."""
    return math.ceil(numel / multiple) * multiple


def pad_to_multiple(flat: jax.Array, multiple: int) -> jax.Array:
    """Appends zeros to a 1-D vector so that its length is a multiple of `multiple`."""
    return jnp.pad(flat, (0, padded_size(flat.shape[0], multiple) - flat.shape[0]))


def signs(x: jax.Array) -> jax.Array:
    """+1 where x >= 0 (zero counts as positive, as in DeepSpeed), -1 elsewhere, in x's dtype."""
    return jnp.where(x >= 0, 1, -1).astype(x.dtype)


def pack_signs(x: jax.Array) -> jax.Array:
    """Packs the signs of x ([..., 8*m]) into bytes ([..., m] uint8, planar bit order); a set bit means x >= 0."""
    if x.shape[-1] % 8:
        raise ValueError(f"pack_signs needs a last axis that is a multiple of 8, got shape {x.shape}")
    bits = (x >= 0).astype(jnp.uint8).reshape(*x.shape[:-1], 8, -1)
    return jnp.sum(bits << _BIT_SHIFTS, axis=-2, dtype=jnp.uint8)


def unpack_signs(packed: jax.Array, dtype=jnp.float32) -> jax.Array:
    """The inverse of `pack_signs`: [..., m] uint8 -> [..., 8*m] of +1/-1."""
    return onebit_decompress(packed, jnp.ones(packed.shape[:-1], dtype))


def onebit_scale(x: jax.Array) -> jax.Array:
    """The 1-bit scale ||x||_2 / sqrt(len) over the last axis, so that scale * sign(x) keeps x's norm."""
    return jnp.linalg.norm(x, axis=-1) / jnp.sqrt(jnp.asarray(x.shape[-1], x.dtype))


def onebit_compress(x: jax.Array, scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """1-bit compression of [..., 8*m]: (packed signs [..., m] uint8, scales [...], error x - decoded).

    The scale is `onebit_scale` of each row unless given (one for several rows: a shape that broadcasts to [...]).
    """
    scale = onebit_scale(x) if scale is None else scale
    error = x - scale[..., None] * signs(x)
    return pack_signs(x), scale, error


def onebit_decompress(packed: jax.Array, scale: jax.Array) -> jax.Array:
    """scale * sign, from packed signs [..., m] and non-negative scales [...] (floats).

    Built as the scale with its sign bit set where the packed bit is clear: exact, and on CPU several times
    cheaper than widening bytes to floats and multiplying.
    """
    width = jnp.dtype(scale.dtype).itemsize * 8
    uint = jnp.dtype(f"uint{width}")
    clear = (~packed.astype(uint)[..., None, :] >> _BIT_SHIFTS.astype(uint)) & 1  # [..., 8, m]: 1 = negative
    bits = jax.lax.bitcast_convert_type(scale, uint)[..., None, None] | (clear << (width - 1))
    return jax.lax.bitcast_convert_type(bits, scale.dtype).reshape(*packed.shape[:-1], -1)


def _minmax_grid(minmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(scale, upper, lower) of the MinMaxUInt8 grid for [..., 2] (min, max); both ends compute it alike."""
    low, high = minmax[..., 0:1], minmax[..., 1:2]
    scale = _LEVELS / (high - low + _MINMAX_EPS)
    upper = jnp.rint(high * scale)
    return scale, upper, upper - _LEVELS


def minmax_uint8_compress(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """BAGUA's MinMaxUInt8 over the last axis: (codes uint8 like x, header [..., 2] float (min, max))."""
    minmax = jnp.stack([jnp.min(x, axis=-1), jnp.max(x, axis=-1)], axis=-1)
    scale, upper, lower = _minmax_grid(minmax)
    # rint rounds half to even, like the reference; min() keeps rounding at the top inside 255 levels.
    codes = jnp.minimum(jnp.rint(x * scale), upper) - lower
    return codes.astype(jnp.uint8), minmax


def minmax_uint8_decompress(codes: jax.Array, minmax: jax.Array) -> jax.Array:
    """(q + lower) / scale, with the grid recomputed from the (min, max) header."""
    _, _, lower = _minmax_grid(minmax)
    # Dividing by scale is multiplying by (max - min + 1e-7) / 255. Compilers rewrite divisions by a broadcast
    # (XLA turns them into products with a reciprocal, folded in whatever order it likes); this explicit product
    # with the constant 1/255 is left alone, so every backend and the NumPy reference round alike.
    inverse_scale = (minmax[..., 1:2] - minmax[..., 0:1] + _MINMAX_EPS) * (1 / _LEVELS)
    return (codes.astype(minmax.dtype) + lower) * inverse_scale


def int4_compress(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric 4-bit quantization of each row of [..., 2*m]: (packed codes [..., m] uint8, largest magnitude [...]).

    code = rint(x * 7 / max|x|) in -7..7, so the row's largest value is exact and zero stays zero. Nibbles in planar
    order, as the signs: byte i holds value i in its low nibble and value m + i in its high one.
    """
    if x.shape[-1] % 2:
        raise ValueError(f"int4_compress needs a last axis of even length, got shape {x.shape}")
    largest = jnp.max(jnp.abs(x), axis=-1)
    # An all-zero row has no scale; its codes are zero (the unused branch's inf is never read).
    inverse = jnp.where(largest > 0, _INT4_LEVELS / largest, 0).astype(x.dtype)
    # |x * inverse| <= 7 up to two roundings, so rint never reaches 8: no clipping needed.
    codes = (jnp.rint(x * inverse[..., None]).astype(jnp.int32) + _INT4_OFFSET).astype(jnp.uint8)
    low, high = jnp.split(codes, 2, axis=-1)
    return low | (high << 4), largest


def int4_decompress(packed: jax.Array, largest: jax.Array) -> jax.Array:
    """The inverse of `int4_compress`: code * (max|x| * (1/7)) as [..., 2*m] in `largest`'s dtype."""
    codes = jnp.concatenate([packed & 15, packed >> 4], axis=-1).astype(largest.dtype) - _INT4_OFFSET
    # A product with the constant 1/7, not a division, for the reason given in `minmax_uint8_decompress`.
    return codes * (largest * (1 / _INT4_LEVELS))[..., None]
