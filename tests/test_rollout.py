"""The RL sampler: rollouts sampled in chunks of prompts equal one call, each prompt sampled by its replica."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metastone_jax.config import MeshConfig, Qwen2Config, SamplingConfig
from metastone_jax.models.reflective import ReflectiveModel, init_params
from metastone_jax.rollout import make_replica_sampler, replica_params
from metastone_jax.sampling import sample
from metastone_jax.sharding import make_mesh

CONFIG = Qwen2Config(
    vocab_size=40,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    initializer_range=0.3,
)
MODULE = ReflectiveModel(CONFIG)
SAMPLING = SamplingConfig(max_new_tokens=6, temperature=1.0)
EOS, PAD, GROUP = 3, 0, 2


def _prompts(count=4, width=5, seed=0):
    rng = np.random.default_rng(seed)
    lengths = 1 + np.arange(count) % width
    tokens = np.where(np.arange(width) >= width - lengths[:, None], rng.integers(4, 40, (count, width)), PAD)
    return tokens.astype(np.int32), tokens != PAD


def test_rollouts_in_chunks_of_prompts_equal_one_call_and_each_prompt_sampled_alone_by_its_replica():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=1), jax.devices()[:4])
    params = init_params(MODULE, jax.random.key(0))
    # Replicas with different parameters, as decentralized algorithms leave them.
    other = jax.tree.map(lambda x: x * 1.1, init_params(MODULE, jax.random.key(1)))
    state_params = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, other)
    tokens, mask = _prompts()
    key = jax.random.key(7)
    outputs = {
        size: make_replica_sampler(MODULE, mesh, SAMPLING, (EOS,), PAD, GROUP, size)(state_params, tokens, mask, key)
        for size in (0, 2)  # all 4 prompts at once; 2 at a time (one per replica)
    }
    for name in ("sequences", "response_mask", "lengths"):
        np.testing.assert_array_equal(getattr(outputs[2], name), getattr(outputs[0], name))
    np.testing.assert_allclose(outputs[2].step_logits, outputs[0].step_logits, atol=1e-5)
    lengths = np.asarray(outputs[0].lengths)
    assert lengths.min() < SAMPLING.max_new_tokens  # some rows stopped at EOS
    for prompt in range(4):  # prompts 0, 1 on replica 0, prompts 2, 3 on replica 1; prompt p draws from fold_in(key, p)
        alone = sample(
            MODULE,
            replica_params(state_params, prompt // 2),
            tokens[prompt : prompt + 1],
            mask[prompt : prompt + 1],
            jax.random.fold_in(key, prompt)[None],
            config=SAMPLING,
            eos_ids=(EOS,),
            pad_id=PAD,
            num_samples=GROUP,
        )
        rows = slice(GROUP * prompt, GROUP * prompt + GROUP)
        np.testing.assert_array_equal(np.asarray(outputs[0].sequences)[rows], np.asarray(alone.sequences))


def test_rollout_batch_size_that_does_not_split_the_prompts_over_the_replicas_is_named():
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=1), jax.devices()[:2])
    tokens, mask = _prompts()
    for size in (3, 1):  # does not divide the 4 prompts; not a multiple of the 2 replicas
        sampler = make_replica_sampler(MODULE, mesh, SAMPLING, (EOS,), PAD, GROUP, size)
        with pytest.raises(ValueError, match=f"rollout_batch_size={size} must divide the 4 prompts and be a multiple"):
            sampler(None, tokens, mask, jax.random.key(0))
