"""Bad checkpoints and meshes stop with a sentence that names the problem; nothing half-loaded comes back."""

import json

import pytest
import torch

import metastone_jax as ms
from tests.models.hf_fixtures import random_qwen2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    random_qwen2(0, heads=4, kv_heads=2, tied=False, layers=2).save_pretrained(path)
    return path


def _copy(checkpoint, tmp_path, edit_config=None):
    for file in checkpoint.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    if edit_config:
        config = json.loads((tmp_path / "config.json").read_text())
        edit_config(config)
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ms.load_hf(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ms.load_hf(tmp_path)


def test_missing_weights(checkpoint, tmp_path):
    _copy(checkpoint, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="expected model.safetensors"):
        ms.load_hf(tmp_path)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c.update(model_type="llama"), "model_type='llama' is not supported"),
        (lambda c: c.update(architectures=["Qwen2ForSequenceClassification"]), "Qwen2ForSequenceClassification"),
        (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope scaling 'yarn'"),
        (lambda c: c.update(use_sliding_window=True), "use_sliding_window"),
        (lambda c: c.update(hidden_act="gelu"), "hidden_act='gelu'"),
    ],
)
def test_unsupported_architecture_features_are_named(checkpoint, tmp_path, edit, message):
    _copy(checkpoint, tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        ms.load_hf(tmp_path)


def test_tensor_shape_mismatch_names_the_tensor(checkpoint, tmp_path):
    _copy(checkpoint, tmp_path, lambda c: c.update(intermediate_size=48))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(40, 32\)"):
        ms.load_hf(tmp_path)


def test_missing_head_when_required(checkpoint, tmp_path):
    _copy(checkpoint, tmp_path)
    with pytest.raises(FileNotFoundError, match="no SPRM head"):
        ms.load_hf(tmp_path, with_head=True)


def test_head_with_wrong_width_is_named(checkpoint, tmp_path):
    _copy(checkpoint, tmp_path)
    bad = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(48, 1))
    torch.save(bad.state_dict(), tmp_path / "score_module.pt")
    with pytest.raises(ValueError, match=r"score_module.pt: tensor '0.weight' has shape \(48, 32\)"):
        ms.load_hf(tmp_path)


def test_mesh_that_does_not_fit_the_devices():
    with pytest.raises(ValueError, match="needs 6 devices but 8 are available"):
        ms.make_mesh(ms.MeshConfig(data=2, fsdp=3, tensor=1))
    with pytest.raises(ValueError, match="not divisible"):
        ms.make_mesh(ms.MeshConfig(data=3, fsdp=-1, tensor=1))
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        ms.make_mesh(ms.MeshConfig(data=-1, fsdp=-1, tensor=1))
    assert dict(ms.make_mesh(ms.MeshConfig(data=2, fsdp=-1, tensor=2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
