"""Each platform's attention equals a plain softmax attention written out here, forward and backward: splash
attention (TPU) in Pallas' interpreter, `jax.nn.dot_product_attention` (GPU) through XLA's implementation standing
in for cuDNN, and the decoding path with a traced cache index. Compiling the TPU path for abstract TPU devices needs
libtpu (`pip install -e '.[tpu]'`)."""

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metastone_jax.models import attention, splash


def plain_attention(q, k, v, kv_mask, cache_index):
    """Grouped-query attention with the heads repeated and one [S, T] score matrix: query slot cache_index + s sees
    key slot t iff t <= cache_index + s and kv_mask[t]."""
    seq, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[-1]
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bshd,bthd->bhst", q, k) / np.sqrt(head_dim)
    causal = np.arange(kv_len)[None, :] <= cache_index + np.arange(seq)[:, None]
    visible = causal[None, None] & np.asarray(kv_mask)[:, None, None, :]
    # A finite fill keeps the gradients of rows that see no key finite (their loss weight is 0).
    probs = jax.nn.softmax(jnp.where(visible, scores, -1e30), axis=-1)
    return jnp.einsum("bhst,bthd->bshd", probs, v)


def inputs(batch, seq, kv_len, heads, kv_heads, head_dim, cache_index, left_padding, seed=0):
    """q, k, v, kv_mask with rows left-padded by `left_padding[b]` slots and a few masked slots inside, and loss
    weights that are 0 on queries that see no valid key (their output is arbitrary)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seq, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_len, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_len, kv_heads, head_dim)).astype(np.float32)
    kv_mask = rng.random((batch, kv_len)) > 0.1
    for row, pad in enumerate(left_padding):
        kv_mask[row, :pad] = False
    first_valid = np.argmax(kv_mask, axis=1)
    sees_a_key = first_valid[:, None] <= cache_index + np.arange(seq)[None, :]
    weights = rng.standard_normal(q.shape).astype(np.float32) * sees_a_key[:, :, None, None]
    return q, k, v, kv_mask, weights


def assert_forward_and_backward_equal(ours, q, k, v, kv_mask, cache_index, weights, rtol=2e-5):
    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, kv_mask, cache_index) * weights)

    got = jax.jit(lambda q, k, v: ours(q, k, v, kv_mask, cache_index))(q, k, v)
    want = plain_attention(q, k, v, kv_mask, cache_index)
    rows = weights[..., :1, :1] != 0  # queries that see a key
    got, want = np.where(rows, got, 0), np.where(rows, want, 0)
    np.testing.assert_allclose(got, want, atol=rtol * np.abs(want).max())
    got_grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
    want_grads = jax.grad(loss(plain_attention), argnums=(0, 1, 2))(q, k, v)
    for name, got, want in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(got, want, atol=rtol * np.abs(want).max(), rtol=0, err_msg=f"d{name}")


CASES = [
    # batch, seq, kv_len, heads, kv_heads, cache_index, left padding per row
    pytest.param(2, 128, 128, 4, 2, 0, (0, 37), id="gqa-left-padding"),
    pytest.param(1, 40, 96, 2, 1, 16, (5,), id="mqa-prefill-into-longer-cache-unaligned"),
    pytest.param(2, 200, 200, 2, 2, 0, (130, 0), id="mha-two-blocks-padding-past-a-block"),
]


@pytest.mark.parametrize("batch,seq,kv_len,heads,kv_heads,cache_index,left_padding", CASES)
def test_splash_attention_in_interpret_mode_equals_plain_attention(
    batch, seq, kv_len, heads, kv_heads, cache_index, left_padding
):
    args = inputs(batch, seq, kv_len, heads, kv_heads, 64, cache_index, left_padding)
    q, k, v, kv_mask, weights = args

    def interpreted(q, k, v, kv_mask, cache_index):
        return splash.splash_attention(q, k, v, kv_mask, cache_index, interpret=True)

    assert_forward_and_backward_equal(interpreted, q, k, v, kv_mask, cache_index, weights)


@pytest.mark.parametrize("batch,seq,kv_len,heads,kv_heads,cache_index,left_padding", CASES)
def test_gpu_attention_through_xla_equals_plain_attention(
    batch, seq, kv_len, heads, kv_heads, cache_index, left_padding
):
    q, k, v, kv_mask, weights = inputs(batch, seq, kv_len, heads, kv_heads, 16, cache_index, left_padding)

    def gpu(q, k, v, kv_mask, cache_index):
        return attention.gpu_attention(q, k, v, kv_mask, cache_index, implementation="xla")

    assert_forward_and_backward_equal(gpu, q, k, v, kv_mask, cache_index, weights)


requires_gpu = pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="needs a GPU: run with JAX_PLATFORMS=cuda,cpu on a machine with one"
)


@requires_gpu
@pytest.mark.parametrize("cache_index,left_padding", [(0, (0, 37)), (16, (5, 0))], ids=["prefill", "into-cache"])
def test_attention_on_a_gpu_runs_cudnn_and_equals_plain_attention(cache_index, left_padding):
    # A 1.5B-like head layout in bfloat16, where cuDNN's fused kernel applies; the reference runs in float32 on the
    # same bfloat16-rounded inputs, so the tolerance is bfloat16's.
    seq = 512 - cache_index
    q, k, v, kv_mask, weights = inputs(2, seq, 512, 12, 2, 128, cache_index, left_padding)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    compiled = jax.jit(lambda q, k, v: attention.attention(q, k, v, kv_mask, cache_index)).lower(q, k, v).compile()
    assert "cudnn" in compiled.as_text().lower(), "the GPU path did not use cuDNN's fused attention"

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, kv_mask, cache_index).astype(jnp.float32) * weights)

    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    rows = weights[..., :1, :1] != 0
    got = np.asarray(compiled(q, k, v), np.float32)
    want = np.asarray(plain_attention(q32, k32, v32, kv_mask, cache_index))
    np.testing.assert_allclose(np.where(rows, got, 0), np.where(rows, want, 0), atol=2e-2 * np.abs(want).max())
    got_grads = jax.jit(jax.grad(loss(attention.attention), argnums=(0, 1, 2)))(q, k, v)
    want_grads = jax.grad(loss(plain_attention), argnums=(0, 1, 2))(q32, k32, v32)
    for name, got, want in zip("qkv", got_grads, want_grads):
        want = np.asarray(want)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2 * np.abs(want).max(), err_msg=name)


def test_decoding_with_a_traced_cache_index_equals_plain_attention():
    q, k, v, kv_mask, weights = inputs(3, 1, 64, 4, 2, 16, 0, (0, 9, 20))
    for slot in (20, 41, 63):
        got = jax.jit(attention.attention)(q, k, v, kv_mask, jnp.int32(slot))
        want = plain_attention(q, k, v, kv_mask, slot)
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="watches the CPU kernel (blocked attention)")
def test_remat_keeps_the_kernel_path_and_the_values(monkeypatch):
    """remat traces the layer's arguments, the cache index among them: the forward without a cache, and the
    sampler's prefill, must still take the platform's path with a static offset (on this CPU the blocked
    attention), not the decoding path's full scores, and give what the model without remat gives."""
    from metastone_jax.config import Qwen2Config
    from metastone_jax.models.reflective import ReflectiveModel, init_params
    from metastone_jax.sampling import SamplingConfig, sample

    offsets = []
    blocked = attention.blocked_attention
    monkeypatch.setattr(attention, "blocked_attention", lambda *args: offsets.append(args[-1]) or blocked(*args))
    config = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    plain, remat = ReflectiveModel(config), ReflectiveModel(config, remat=True)
    params = init_params(plain, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 1, 64)
    mask = jnp.arange(40)[None, :] >= jnp.array([[0], [7]])

    def loss(module):
        return lambda params: jnp.sum(module.apply({"params": params}, tokens, None, mask).logits[:, -5:] ** 2)

    want, want_grads = jax.jit(jax.value_and_grad(loss(plain)))(params)
    offsets.clear()
    got, got_grads = jax.jit(jax.value_and_grad(loss(remat)))(params)
    assert offsets and all(offset == 0 and isinstance(offset, int) for offset in offsets), offsets
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got_grads, want_grads)

    def draw(module):
        options = {"config": SamplingConfig(max_new_tokens=4, temperature=1.0), "eos_ids": (-1,), "pad_id": 0}
        return sample(module, params, tokens[:, :8], mask[:, :8], jax.random.key(2), **options)

    offsets.clear()
    got = draw(remat)
    assert offsets and all(isinstance(offset, int) for offset in offsets), offsets  # the prefill
    np.testing.assert_array_equal(got.sequences, draw(plain).sequences)


requires_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed: the TPU compiler is needed to compile for abstract TPU devices "
    "(pip install -e '.[tpu]')",
)


@requires_libtpu
def test_the_model_compiles_splash_attention_for_abstract_tpu_devices():
    from jax.experimental import topologies

    from metastone_jax.config import Qwen2Config
    from metastone_jax.models.reflective import ReflectiveModel, init_params, param_shardings
    from metastone_jax.sharding import LOGICAL_RULES, MeshConfig, make_mesh

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices=devices)
    config = Qwen2Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    module = ReflectiveModel(config, dtype=jnp.bfloat16)
    batch, seq = 8, 1024
    shardings = param_shardings(module, mesh)
    params = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        jax.eval_shape(lambda: init_params(module, jax.random.key(0))),
        shardings,
    )
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=rows)
    kv_mask = jax.ShapeDtypeStruct((batch, seq), jnp.bool_, sharding=rows)

    import flax.linen as nn

    def loss(params, tokens, kv_mask):
        with nn.logical_axis_rules(LOGICAL_RULES):
            out = module.apply({"params": params}, tokens, None, kv_mask)
        return jnp.mean(out.logits)

    # Mosaic refuses the test suite's float32 matmul precision (conftest) for bfloat16 operands.
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        compiled = jax.jit(jax.grad(loss)).lower(params, tokens, kv_mask).compile()
    text = compiled.as_text()
    # Forward and both backward kernels, each on its chip's 2 of the 8 sequences: 4 query heads, 2 key-value heads.
    for kernel, heads in (("splash_mha_fwd", 4), ("splash_mha_dq", 4), ("splash_mha_dkv", 2)):
        pattern = rf"%{kernel}[\w.]* = .*bf16\[2,{heads},{seq},64\].*custom_call_target=\"tpu_custom_call\""
        assert re.search(pattern, text), kernel
    assert not re.search(rf"\[[\d,]*{seq},[\d,]*{seq}[\d,]*\]", text), "a [seq, seq] array is materialised"
