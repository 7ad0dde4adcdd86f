"""torch.save's state_dict format without torch: files that torch writes read back equal, files we write torch reads."""

import pickle
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from metastone_jax.torch_io import load_state_dict, save_state_dict


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    base = torch.randn(6, 4)
    return {
        "0.weight": torch.randn(16, 8),
        "0.bias": torch.randn(16),
        "bfloat16": torch.randn(3, 5).to(torch.bfloat16),
        "float16": torch.randn(7).to(torch.float16),
        "float64": torch.randn(2, 3, dtype=torch.float64),
        "transposed": base.T,  # strides (1, 4) into a storage shared with the next view
        "rows_2_to_4": base[2:4],  # a storage offset
        "int64": torch.arange(5),
        "int8": torch.tensor([-3, 7], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "parameter": torch.nn.Parameter(torch.ones(2)),
    }


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """torch's values as NumPy, bfloat16 through its bit pattern (NumPy has no bfloat16 of torch's)."""
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def test_reads_what_torch_save_wrote_with_dtypes_shapes_and_views(tmp_path):
    expected = _state_dict()
    torch.save(expected, tmp_path / "score_module.pt")
    ours = load_state_dict(tmp_path / "score_module.pt")
    assert list(ours) == list(expected)
    for name, tensor in expected.items():
        reference = _numpy(tensor)
        assert ours[name].dtype == reference.dtype and ours[name].shape == reference.shape, name
        np.testing.assert_array_equal(ours[name], reference, err_msg=name)


def test_torch_load_reads_what_we_wrote_bitwise(tmp_path):
    arrays = {name: _numpy(tensor) for name, tensor in _state_dict().items()}
    save_state_dict(arrays, tmp_path / "score_module.pt")
    for loaded in (
        torch.load(tmp_path / "score_module.pt", weights_only=True),
        torch.load(tmp_path / "score_module.pt", weights_only=True, mmap=True),
    ):
        assert list(loaded) == list(arrays)
        for name, tensor in _state_dict().items():
            assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
            assert torch.equal(loaded[name], tensor.detach()), name


def test_reading_does_not_import_torch(tmp_path):
    torch.save({"0.weight": torch.ones(2, 2)}, tmp_path / "score_module.pt")
    program = (
        "import sys; from metastone_jax.torch_io import load_state_dict; "
        f"load_state_dict({str(tmp_path / 'score_module.pt')!r}); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", program], check=True)


class _Payload:
    def __reduce__(self):
        return (print, ("not a tensor",))


def test_a_pickle_that_builds_anything_else_is_refused(tmp_path):
    torch.save({"0.weight": torch.ones(2)}, tmp_path / "score_module.pt")
    # The same archive with a data.pkl that calls print, which torch's weights_only loader refuses too.
    with zipfile.ZipFile(tmp_path / "score_module.pt") as source, zipfile.ZipFile(tmp_path / "bad.pt", "w") as bad:
        for item in source.infolist():
            data = pickle.dumps({"x": _Payload()}, protocol=2) if item.filename.endswith("data.pkl") else None
            bad.writestr(item.filename, data if data is not None else source.read(item))
    with pytest.raises(pickle.UnpicklingError, match=r"bad.pt: __builtin__\.print is not part of a state_dict"):
        load_state_dict(tmp_path / "bad.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "bad.pt", weights_only=True)


def test_not_a_zip_archive_is_named(tmp_path):
    (tmp_path / "score_module.pt").write_bytes(pickle.dumps({"0.weight": [1.0]}))
    with pytest.raises(ValueError, match=r"score_module.pt: not a torch.save zip archive"):
        load_state_dict(tmp_path / "score_module.pt")
