"""NumPy simulations of n workers for the compressed collectives, from docs/algorithms.md, independent of comms/.

`bytegrad` and `onebit` reduce one vector; `per_tensor` runs them on each tensor of a model separately, as
DeepSpeed calls its 1-bit all-reduce once per parameter (own padding, scales and error buffers per tensor).
Everything is float32 and sums over workers run in worker order, so results match bit for bit where the
math allows (MinMaxUInt8), and to float rounding where a norm is involved (1-bit scales).
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def pad(vector: np.ndarray, multiple: int) -> np.ndarray:
    extra = -len(vector) % multiple
    return np.concatenate([vector, np.zeros(extra, vector.dtype)])


def minmax_encode(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """BAGUA MinMaxUInt8 of a 1-D chunk: (codes, min, max)."""
    low, high = x.min(), x.max()
    scale = F32(255) / (high - low + F32(1e-7))
    upper = np.rint(high * scale)
    lower = upper - F32(255)
    return (np.minimum(np.rint(x * scale), upper) - lower).astype(np.uint8), low, high


def minmax_decode(codes: np.ndarray, low, high) -> np.ndarray:
    scale = F32(255) / (high - low + F32(1e-7))
    lower = np.rint(high * scale) - F32(255)
    # (q + lower) / scale, written as a product with (max - min + 1e-7) * (1/255) as comms does.
    return (codes.astype(F32) + lower) * ((high - low + F32(1e-7)) * F32(1 / 255))


def minmax_roundtrip(x: np.ndarray) -> np.ndarray:
    return minmax_decode(*minmax_encode(x))


def onebit_quantize(x: np.ndarray) -> tuple[np.float32, np.ndarray, np.ndarray]:
    """(scale = ||x|| / sqrt(len), sign(x) with sign(0) = +1, error x - scale * sign)."""
    scale = F32(np.sqrt(np.sum(x.astype(np.float64) ** 2)) / np.sqrt(len(x)))
    signs = np.where(x >= 0, F32(1), F32(-1))
    return scale, signs, x - scale * signs


def sum_in_order(rows) -> np.ndarray:
    total = rows[0]
    for row in rows[1:]:
        total = total + row
    return total


def bytegrad(vectors: np.ndarray) -> np.ndarray:
    """[n, P] (P a multiple of n) -> what every worker holds after ByteGrad: [P]."""
    n = len(vectors)
    chunks = vectors.reshape(n, n, -1)  # [worker, server, chunk]
    result = []
    for server in range(n):
        received = [minmax_roundtrip(chunks[worker, server]) for worker in range(n)]
        result.append(minmax_roundtrip(sum_in_order(received) / n))
    return np.concatenate(result)


def onebit(
    vectors: np.ndarray, worker_errors: np.ndarray, server_errors: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSpeed's 1-bit all-reduce of [n, P] with errors [n, P], [n, P/n] -> (result [P], new errors)."""
    n = len(vectors)
    scales, signs, new_worker_errors = zip(*(onebit_quantize(v + e) for v, e in zip(vectors, worker_errors)))
    signs = np.stack(signs).reshape(n, n, -1)  # [worker, server, chunk]
    result, new_server_errors = [], []
    for server in range(n):
        # The server weighs each worker's signs by scale / n, then adds its own error.
        served = sum_in_order([signs[w, server] * (scales[w] / F32(n)) for w in range(n)]) + server_errors[server]
        scale, server_signs, error = onebit_quantize(served)
        result.append(scale * server_signs)
        new_server_errors.append(error)
    return np.concatenate(result), np.stack(new_worker_errors), np.stack(new_server_errors)


def per_tensor(tensors: dict, reduce, multiple: int, *states: dict) -> tuple[dict, ...]:
    """Runs `reduce` ([n, P] vectors, *states -> result [P], *new states) on each tensor of {name: [n, ...]},
    zero-padded to a multiple of `multiple`; returns ({name: [numel] result}, *{name: new state})."""
    results, new_states = {}, [{} for _ in states]
    for name, tensor in tensors.items():
        vectors = tensor.reshape(len(tensor), -1)
        out = reduce(np.stack([pad(v, multiple) for v in vectors]), *(state[name] for state in states))
        out = out if isinstance(out, tuple) else (out,)
        results[name] = out[0][: vectors.shape[1]]
        for new, value in zip(new_states, out[1:]):
            new[name] = value
    return (results, *new_states)


def onebit_zero_errors(tensors: dict, n: int, multiple: int) -> tuple[dict, dict]:
    """Per tensor of {name: [n, ...]}: worker errors [n, P] and server errors [n, P/n], P padded to `multiple`."""
    padded = {name: pad(np.zeros(t[0].size, F32), multiple).size for name, t in tensors.items()}
    return (
        {name: np.zeros((n, size), F32) for name, size in padded.items()},
        {name: np.zeros((n, size // n), F32) for name, size in padded.items()},
    )
