"""Lazy safetensors reading (memory-mapped, slice by slice, bfloat16 included) and writing.

The `safetensors` package's NumPy API cannot represent bfloat16, which is what real checkpoints hold; the
format is a JSON header plus raw little-endian bytes, so we map it with NumPy and `ml_dtypes` directly.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
NAMES = {v: k for k, v in DTYPES.items()}


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
    return header, 8 + length


class SafetensorsFiles:
    """Every tensor of one or several safetensors files, readable by name and slice without loading the rest."""

    def __init__(self, paths: list[Path]):
        self._entries: dict[str, tuple[Path, np.dtype, tuple[int, ...], int]] = {}
        self._maps: dict[Path, np.memmap] = {}
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"weights file {path} is missing")
            header, data_start = _read_header(path)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in DTYPES:
                    raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
                begin, _ = info["data_offsets"]
                self._entries[name] = (path, DTYPES[info["dtype"]], tuple(info["shape"]), data_start + begin)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def read(self, name: str, index=()) -> np.ndarray:
        """tensor[name][index] as a NumPy array; only the pages the slice touches are read."""
        path, dtype, shape, offset = self._entries[name]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        count = int(np.prod(shape, dtype=np.int64))
        flat = self._maps[path][offset : offset + count * dtype.itemsize].view(dtype)
        return np.array(flat.reshape(shape)[index])


def save_file(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` as one safetensors file (metadata format "pt", as transformers expects)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in NAMES:
            raise ValueError(f"cannot write tensor {name!r} of dtype {array.dtype} to safetensors")
        header[name] = {
            "dtype": NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays:
            f.write(array.reshape(-1).view(np.uint8).data)
