"""The model under the train step's sharding: manual over `data`, fsdp/tensor left to the compiler."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import metastone_jax as ms
from metastone_jax.sharding import logical_rules


def test_forward_inside_shard_map_over_data_with_fsdp_and_tensor_equals_unsharded():
    # Regression: a lookup from the fsdp x tensor sharded embedding table used to abort XLA's partitioner here.
    config = ms.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    module = ms.ReflectiveModel(config)
    mesh = ms.make_mesh(ms.MeshConfig(data=2, fsdp=2, tensor=2))
    params = ms.init_params(module, jax.random.key(0), mesh)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 6)))

    def replica_forward(params, tokens):
        with nn.logical_axis_rules(logical_rules(manual_axes=("data",))):
            out = module.apply({"params": params}, tokens)
        return out.logits, out.step_logits

    sharded = jax.jit(
        jax.shard_map(replica_forward, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"), axis_names={"data"})
    )
    with jax.set_mesh(mesh):
        logits, step_logits = sharded(params, tokens)
    reference = module.apply({"params": jax.device_get(params)}, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference.logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(step_logits), np.asarray(reference.step_logits), atol=1e-5)
