"""Our Qwen2 equals transformers' Qwen2ForCausalLM on the same weights; export loads back into transformers."""

import numpy as np
import pytest
import torch
import transformers

import metastone_jax as ms
from tests.models.hf_fixtures import hf_reference, random_qwen2, torch_score_module

CONFIGS = [
    # (heads, kv_heads, tied, rope_theta, sharded safetensors)
    pytest.param(4, 4, True, 10000.0, False, id="mha-tied-single"),
    pytest.param(4, 2, False, 10000.0, True, id="gqa2-untied-sharded"),
    pytest.param(8, 2, False, 500.0, False, id="gqa4-untied-theta500"),
]


def _tokens(seed, batch=2, seq=11, vocab=97):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq))


@pytest.mark.parametrize("heads,kv_heads,tied,theta,sharded", CONFIGS)
def test_logits_and_features_equal_transformers(tmp_path, heads, kv_heads, tied, theta, sharded):
    reference = random_qwen2(heads, heads=heads, kv_heads=kv_heads, tied=tied, rope_theta=theta)
    reference.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded

    model = ms.load_hf(tmp_path)
    tokens = _tokens(heads)
    logits, features = hf_reference(reference, tokens)
    out = model(tokens)
    assert out.step_logits is None
    np.testing.assert_allclose(np.asarray(out.logits), logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out.features), features, atol=1e-4, rtol=0)


def test_sharded_forward_on_8_devices_equals_unsharded(tmp_path):
    reference = random_qwen2(1, heads=4, kv_heads=2, tied=False)
    reference.save_pretrained(tmp_path)
    torch.save(torch_score_module(32).state_dict(), tmp_path / "score_module.pt")
    tokens = _tokens(1, batch=4)
    single = ms.load_hf(tmp_path)(tokens)
    mesh = ms.make_mesh(ms.MeshConfig(data=2, fsdp=2, tensor=2))
    sharded_model = ms.load_hf(tmp_path, mesh=mesh)
    kernel = sharded_model.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    sharded = sharded_model(tokens)
    for name in ("logits", "features", "step_logits"):
        np.testing.assert_allclose(np.asarray(getattr(sharded, name)), np.asarray(getattr(single, name)), atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_save_hf_loads_back_into_transformers_with_same_logits(tmp_path, tied):
    reference = random_qwen2(7, heads=4, kv_heads=2, tied=tied, rope_theta=2500.0)
    reference.save_pretrained(tmp_path / "in")
    head = torch_score_module(32, seed=3).state_dict()
    torch.save(head, tmp_path / "in" / "score_module.pt")
    model = ms.load_hf(tmp_path / "in")
    ms.save_hf(model, tmp_path / "out", max_shard_bytes=30_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    tokens = _tokens(7)
    logits, _ = hf_reference(reloaded, tokens)
    reference_logits, _ = hf_reference(reference, tokens)
    np.testing.assert_allclose(logits, reference_logits, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model(tokens).logits), logits, atol=1e-4)
    # The head round-trips through score_module.pt too, in the format torch reads.
    exported_head = torch.load(tmp_path / "out" / "score_module.pt", weights_only=True)
    assert list(exported_head) == list(head)
    assert all(torch.equal(exported_head[name], tensor) for name, tensor in head.items())
    again = ms.load_hf(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(again(tokens).step_logits), np.asarray(model(tokens).step_logits))


def test_score_module_pt_loads_with_transposes_right(tmp_path):
    reference = random_qwen2(3, heads=4, kv_heads=2, tied=False)
    reference.save_pretrained(tmp_path)
    head = torch_score_module(32, seed=5)
    torch.save(head.state_dict(), tmp_path / "score_module.pt")
    model = ms.load_hf(tmp_path)
    tokens = _tokens(3)
    out = model(tokens)
    with torch.no_grad():
        expected = head(torch.from_numpy(np.array(out.features))).squeeze(-1).numpy()
    np.testing.assert_allclose(np.asarray(out.step_logits), expected, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_blocked_attention_logits_and_parameter_gradients_equal_transformers(tmp_path, scan_layers):
    """seq 75 runs attention in query blocks (32, 32, 11); the gradient of a cross entropy equals torch autograd's."""
    import jax
    import jax.numpy as jnp
    import optax
    from safetensors.numpy import load_file

    reference = random_qwen2(11, heads=4, kv_heads=2, tied=False, layers=2)
    reference.save_pretrained(tmp_path / "in")
    model = ms.load_hf(tmp_path / "in", with_head=False, scan_layers=scan_layers)
    tokens = _tokens(11, batch=2, seq=75)
    logits, _ = hf_reference(reference, tokens)
    np.testing.assert_allclose(np.asarray(model(tokens).logits), logits, atol=1e-4, rtol=0)

    torch_tokens = torch.from_numpy(tokens).long()
    reference.zero_grad()
    torch_logits = reference(torch_tokens).logits[:, :-1]
    torch.nn.functional.cross_entropy(torch_logits.reshape(-1, 97), torch_tokens[:, 1:].reshape(-1)).backward()

    def loss(params):
        out = model.module.apply({"params": params}, jnp.asarray(tokens))
        return optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1], jnp.asarray(tokens)[:, 1:]).mean()

    grads = jax.jit(jax.grad(loss))(model.params)
    # save_hf names and transposes our gradient tree as the Hugging Face tensors it belongs to.
    ms.save_hf(ms.Model(model.module, grads), tmp_path / "grads")
    ours = load_file(tmp_path / "grads" / "model.safetensors")
    theirs = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    assert set(ours) == set(theirs)
    for name, grad in theirs.items():
        scale = np.abs(grad).max()
        np.testing.assert_allclose(ours[name], grad, atol=2e-5 * scale + 1e-7, rtol=0, err_msg=name)
