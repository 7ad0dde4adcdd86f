"""torch.save's zip format for a state_dict of tensors (the released SPRM head's `score_module.pt`), read and written
with NumPy alone: importing torch costs a run seconds of its start, only to read four small tensors.

The format (torch >= 1.6): a stored (uncompressed) zip whose one top-level folder holds `data.pkl`, `byteorder`,
`version` and `data/<key>`, the raw bytes of each storage. `data.pkl` is a protocol-2 pickle of the dict whose
values are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` calls, where
`storage` is the persistent id ('storage', torch.<Type>Storage, key, location, numel). Reading unpickles with a
whitelist of exactly those names, so a file can build nothing else (what `torch.load(weights_only=True)` allows).
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2 on a NumPy storage: the strided view, copied (views may share a storage)."""
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], tuple(size), tuple(s * itemsize for s in stride))
    return view.copy()


def _rebuild_parameter(data, requires_grad=False, hooks=None) -> np.ndarray:
    """torch._utils._rebuild_parameter: a saved nn.Parameter is its data."""
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): dtype for name, dtype in STORAGE_DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, folder: str, path: Path):
        super().__init__(archive.open(f"{folder}data.pkl"))
        self.archive, self.folder, self.path = archive, folder, path
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"{self.path}: {module}.{name} is not part of a state_dict of dense tensors")
        return _ALLOWED[module, name]

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, np.dtype):
            raise pickle.UnpicklingError(f"{self.path}: unsupported persistent id {pid!r}")
        if key not in self.storages:
            raw = self.archive.read(f"{self.folder}data/{key}")
            self.storages[key] = np.frombuffer(raw, dtype, count=numel)
        return self.storages[key]


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a state_dict that torch.save wrote to `path`, as NumPy arrays of their dtypes."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a torch.save zip archive (the format of torch >= 1.6)")
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: not a torch.save archive (no <folder>/data.pkl)")
        folder = pickles[0].removesuffix("data.pkl")
        if f"{folder}byteorder" in archive.namelist() and archive.read(f"{folder}byteorder") != b"little":
            raise ValueError(f"{path}: tensors stored big-endian are not supported")
        state = _StateDictUnpickler(archive, folder, path).load()
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors)")
    return dict(state)


def _pickled_state_dict(tensors: dict[str, np.ndarray]) -> bytes:
    """data.pkl for `tensors` (contiguous, storage key i for the i-th), as torch.save pickles a dict of tensors."""
    out = bytearray(b"\x80\x02}(")  # PROTO 2, EMPTY_DICT, MARK

    def text(value: str) -> None:
        encoded = value.encode()
        out.extend(b"X" + struct.pack("<I", len(encoded)) + encoded)  # BINUNICODE

    def integer(value: int) -> None:
        encoded = value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
        out.extend(b"\x8a" + bytes([len(encoded)]) + encoded)  # LONG1

    def integers(values) -> None:
        out.extend(b"(")
        for value in values:
            integer(value)
        out.extend(b"t")  # TUPLE

    def name(module: str, qualname: str) -> None:
        out.extend(f"c{module}\n{qualname}\n".encode())  # GLOBAL

    for key, (tensor_name, array) in enumerate(tensors.items()):
        text(tensor_name)
        name("torch._utils", "_rebuild_tensor_v2")
        out.extend(b"((")  # the arguments, then the storage's persistent id
        text("storage")
        name("torch", STORAGE_NAMES[array.dtype])
        text(str(key))
        text("cpu")
        integer(array.size)
        out.extend(b"tQ")  # TUPLE, BINPERSID
        integer(0)
        integers(array.shape)
        integers(s // array.dtype.itemsize for s in array.strides)
        out.extend(b"\x89")  # NEWFALSE: requires_grad
        name("collections", "OrderedDict")
        out.extend(b")RtR")  # OrderedDict() for the hooks; TUPLE of the arguments; REDUCE
    out.extend(b"u.")  # SETITEMS, STOP
    return bytes(out)


def save_state_dict(tensors: dict[str, np.ndarray], path: str | Path) -> None:
    """Writes `tensors` as torch.save writes a state_dict, so that `torch.load(path, weights_only=True)` reads it."""
    path = Path(path)
    arrays = {}
    for tensor_name, array in tensors.items():
        array = np.asarray(array, order="C")  # (np.ascontiguousarray would make a 0-d tensor 1-d)
        if array.dtype not in STORAGE_NAMES:
            raise ValueError(f"cannot write tensor {tensor_name!r} of dtype {array.dtype} to {path}")
        arrays[tensor_name] = array
    folder = path.stem
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{folder}/data.pkl", _pickled_state_dict(arrays))
        archive.writestr(f"{folder}/byteorder", "little")
        for key, array in enumerate(arrays.values()):
            archive.writestr(f"{folder}/data/{key}", array.tobytes())
        archive.writestr(f"{folder}/version", "3\n")
