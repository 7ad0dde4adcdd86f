import jax.numpy as jnp
import numpy as np
import pytest

from comms import compress
from tests.comms import numpy_reference as ref


def _values(size, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=size).astype(np.float32)
    x[::7] = 0.0  # exact zeros must count as positive signs
    return x


def test_pack_signs_equals_numpy_packbits_of_bit_planes_and_unpacks_back():
    x = _values((3, 64))
    packed = compress.pack_signs(jnp.asarray(x))
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 8)
    # Planar order: bit j (most significant first) of byte i of a row holds value j*8 + i of that row.
    planes = (x >= 0).astype(np.uint8).reshape(3, 8, 8)
    np.testing.assert_array_equal(np.asarray(packed), np.packbits(planes, axis=-2)[:, 0])
    np.testing.assert_array_equal(np.asarray(compress.unpack_signs(packed)), np.where(x >= 0, 1.0, -1.0))


def test_pack_signs_rejects_length_not_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        compress.pack_signs(jnp.ones((12,)))


@pytest.mark.parametrize("numel,multiple,expected", [(38, 16, 48), (64, 64, 64), (1, 8, 8), (65, 64, 128)])
def test_padding_reaches_next_multiple_with_zeros(numel, multiple, expected):
    x = np.arange(1, numel + 1, dtype=np.float32)
    padded = np.asarray(compress.pad_to_multiple(jnp.asarray(x), multiple))
    assert compress.padded_size(numel, multiple) == expected
    np.testing.assert_array_equal(padded, np.concatenate([x, np.zeros(expected - numel, np.float32)]))


def test_onebit_scale_sign_and_error_equal_numpy():
    x = _values((4, 40), seed=1)
    packed, scale, error = compress.onebit_compress(jnp.asarray(x))
    for row in range(4):
        want_scale, want_signs, want_error = ref.onebit_quantize(x[row])
        np.testing.assert_allclose(np.asarray(scale[row]), want_scale, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(compress.unpack_signs(packed[row])), want_signs)
        np.testing.assert_allclose(np.asarray(error[row]), want_error, rtol=1e-6, atol=1e-6 * want_scale)
    decoded = np.asarray(compress.onebit_decompress(packed, scale))
    np.testing.assert_allclose(decoded, x - np.asarray(error), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_onebit_decompress_is_scale_times_sign_exactly(dtype):
    x = _values((3, 48), seed=3)
    scale = np.array([0.0, 0.37, 2.5e3], np.float32)
    decoded = compress.onebit_decompress(compress.pack_signs(jnp.asarray(x)), jnp.asarray(scale, dtype))
    assert decoded.dtype == dtype
    want = np.asarray(jnp.asarray(scale, dtype)).astype(np.float32)[:, None] * np.where(x >= 0, 1.0, -1.0)
    np.testing.assert_array_equal(np.asarray(decoded).astype(np.float32), want)


def test_onebit_keeps_the_l2_norm():
    x = _values((1000,), seed=2)
    packed, scale, _ = compress.onebit_compress(jnp.asarray(x))
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(compress.onebit_decompress(packed, scale))), np.linalg.norm(x), rtol=1e-5
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_minmax_uint8_codes_and_decoding_equal_numpy_bitwise(seed):
    x = _values((5, 97), seed=seed) * (10.0**seed)
    codes, minmax = compress.minmax_uint8_compress(jnp.asarray(x))
    decoded = np.asarray(compress.minmax_uint8_decompress(codes, minmax))
    assert codes.dtype == jnp.uint8
    for row in range(5):
        want_codes, low, high = ref.minmax_encode(x[row])
        np.testing.assert_array_equal(np.asarray(codes[row]), want_codes)
        np.testing.assert_array_equal(np.asarray(minmax[row]), [low, high])
        np.testing.assert_array_equal(decoded[row], ref.minmax_decode(want_codes, low, high))


def test_minmax_uint8_error_is_at_most_one_level_and_uses_the_full_range():
    x = _values((300,), seed=3)
    codes, minmax = compress.minmax_uint8_compress(jnp.asarray(x))
    decoded = np.asarray(compress.minmax_uint8_decompress(codes, minmax))
    level = (x.max() - x.min()) / 255
    assert np.max(np.abs(decoded - x)) <= level * 0.5 + 1e-6
    assert np.asarray(codes).max() == 255 and np.asarray(codes).min() <= 1


def test_minmax_uint8_rounds_half_to_even():
    # With min 0 and max 1 the grid is [0, 255]; pick values whose x * scale is exactly k + 1/2 in float32.
    scale = np.float32(255) / (np.float32(1) + np.float32(1e-7))
    halves = [np.float32((k + 0.5) / scale) for k in range(1, 250)]
    halves = [x for x in halves if x * scale == np.floor(x * scale) + np.float32(0.5)]
    assert len(halves) >= 4
    x = np.array([0.0, 1.0, *halves], np.float32)
    codes = np.asarray(compress.minmax_uint8_compress(jnp.asarray(x))[0])
    floors = np.floor(x[2:] * scale)
    np.testing.assert_array_equal(codes[2:], np.where(floors % 2 == 0, floors, floors + 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int4_codes_packing_and_decoding_equal_numpy_bitwise(seed):
    x = _values((5, 64), seed=seed) * (10.0**seed)
    x[3] = 0.0  # an all-zero block: zero codes, no division by zero
    packed, largest = compress.int4_compress(jnp.asarray(x))
    decoded = np.asarray(compress.int4_decompress(packed, largest))
    assert packed.dtype == jnp.uint8 and packed.shape == (5, 32)
    for row in range(5):
        codes, want_largest = ref.int4_encode(x[row])
        np.testing.assert_array_equal(np.asarray(packed[row]), ref.int4_pack(codes))
        np.testing.assert_array_equal(np.asarray(largest[row]), want_largest)
        np.testing.assert_array_equal(decoded[row], ref.int4_decode(codes, want_largest))
    np.testing.assert_array_equal(decoded[3], np.zeros(64, np.float32))


def test_int4_error_is_at_most_half_a_level_and_the_largest_magnitude_is_kept():
    x = _values((4, 256), seed=4)
    decoded = np.asarray(compress.int4_decompress(*compress.int4_compress(jnp.asarray(x))))
    level = np.abs(x).max(axis=1, keepdims=True) / 7
    assert np.all(np.abs(decoded - x) <= level * (0.5 + 1e-6))
    rows = np.arange(4)
    largest_at = np.abs(x).argmax(axis=1)
    np.testing.assert_allclose(decoded[rows, largest_at], x[rows, largest_at], rtol=1e-6)


def test_int4_rejects_an_odd_block():
    with pytest.raises(ValueError, match="even length"):
        compress.int4_compress(jnp.ones((3,)))
