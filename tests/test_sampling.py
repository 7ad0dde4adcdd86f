"""The sampler: cached decoding equals full forwards, greedy equals naive and transformers' decoding, EOS per row,
the filters draw from the right distribution, sharded runs equal unsharded ones."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

import metastone_jax as ms
from metastone_jax.config import Qwen2Config
from metastone_jax.models.reflective import ReflectiveModel, init_params
from metastone_jax.sampling import SampleOutput, SamplingConfig, filter_logits, next_tokens, sample, trajectory_scores
from metastone_jax.sharding import LOGICAL_RULES, logical_rules
from tests.models.hf_fixtures import random_qwen2

CONFIG = Qwen2Config(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.3,
)
NEW_TOKENS = 7
PAD = 0
NO_EOS = (-1, -1)  # ids no row can draw: every row runs to max_new_tokens
# Tests share prompt shapes, sample counts and the number of EOS ids so that they share compilations.
LENGTHS, WIDTH = [5, 2, 7], 7


@pytest.fixture(scope="module")
def model():
    module = ReflectiveModel(CONFIG)
    return module, init_params(module, jax.random.key(0))


def left_padded_prompts(lengths, width, seed=0, vocab=50):
    """[len(lengths), width] tokens (real tokens from 1, pads 0 on the left) and their mask."""
    rng = np.random.default_rng(seed)
    tokens = np.full((len(lengths), width), PAD, np.int32)
    mask = np.zeros((len(lengths), width), bool)
    for row, length in enumerate(lengths):
        tokens[row, width - length :] = rng.integers(1, vocab, length)
        mask[row, width - length :] = True
    return tokens, mask


def sample_prompts(module, params, seed, eos_ids, **options):
    tokens, mask = left_padded_prompts(LENGTHS, WIDTH)
    return sample(
        module,
        params,
        tokens,
        mask,
        jax.random.key(seed),
        config=SamplingConfig(NEW_TOKENS, **options),
        eos_ids=eos_ids,
        pad_id=PAD,
        num_samples=2,
    )


def full_forward(module, params, tokens, valid):
    """Forward without cache over whole (left-padded) sequences, positions counted over valid tokens only."""
    positions = np.maximum(np.cumsum(valid, axis=-1) - 1, 0)
    return module.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid))


def test_step_logits_from_decoding_equal_full_forward_over_finished_sequences(model):
    module, params = model
    out = sample_prompts(module, params, 3, eos_ids=(5, 6))
    assert int(out.lengths.min()) < NEW_TOKENS  # some row stopped early, so pads follow its EOS
    valid = np.asarray(out.prompt_mask | out.response_mask)
    reference = np.asarray(full_forward(module, params, np.asarray(out.sequences), valid).step_logits)
    # Fed positions: real prompt tokens and every generated token but the last of its row.
    last = WIDTH + np.asarray(out.lengths) - 1
    fed = valid & (np.arange(WIDTH + NEW_TOKENS)[None] != last[:, None])
    step_logits = np.asarray(out.step_logits)
    np.testing.assert_allclose(step_logits[fed], reference[fed], atol=1e-5, rtol=0)
    assert np.all(step_logits[~fed] == 0.0)


@functools.partial(jax.jit, static_argnums=0)
def full_logits(module, params, tokens):
    return module.apply({"params": params}, tokens).logits


def naive_greedy(module, params, prompt, new_tokens, eos_ids):
    """Re-runs the full forward (no cache) on the unpadded sequence each step and appends the argmax.

    The sequence sits at the start of a fixed-width buffer (one compilation); causal attention makes the tail
    irrelevant to the logits at the sequence's last position.
    """
    buffer = np.zeros((1, WIDTH + new_tokens), np.int32)
    sequence = list(prompt)
    for _ in range(new_tokens):
        buffer[0, : len(sequence)] = sequence
        logits = np.asarray(full_logits(module, params, jnp.asarray(buffer)))
        sequence.append(int(np.argmax(logits[0, len(sequence) - 1])))
        if sequence[-1] in eos_ids:
            break
    return sequence[len(prompt) :]


def test_greedy_equals_naive_full_forward_loop_with_left_padding(model):
    module, params = model
    tokens, _ = left_padded_prompts(LENGTHS, WIDTH)
    prompts = [tokens[row, WIDTH - length :] for row, length in enumerate(LENGTHS)]
    # Two EOS ids: the 3rd greedy token of prompt 0 and the 5th of prompt 2, so that rows stop early.
    eos = (naive_greedy(module, params, prompts[0], 3, ())[2], naive_greedy(module, params, prompts[2], 5, ())[4])
    out = sample_prompts(module, params, 0, eos_ids=eos, temperature=0.0)
    for row, prompt in enumerate(prompts):
        expected = naive_greedy(module, params, prompt, NEW_TOKENS, eos)
        padded = expected + [PAD] * (NEW_TOKENS - len(expected))
        for sample_row in (2 * row, 2 * row + 1):
            assert int(out.lengths[sample_row]) == len(expected)
            np.testing.assert_array_equal(np.asarray(out.sequences[sample_row, WIDTH:]), padded)
    assert int(out.lengths[0]) <= 3 and int(out.lengths[4]) <= 5


def test_eos_stops_rows_independently_and_pads_after(model):
    module, params = model
    free = sample_prompts(module, params, 7, eos_ids=NO_EOS)
    free_response = np.asarray(free.sequences[:, WIDTH:])
    eos_ids = (int(free_response[0, 1]), int(free_response[4, 4]))
    out = sample_prompts(module, params, 7, eos_ids=eos_ids)
    offsets = np.arange(WIDTH + NEW_TOKENS) - WIDTH
    for row in range(len(LENGTHS) * 2):
        hits = np.flatnonzero(np.isin(free_response[row], eos_ids))
        length = hits[0] + 1 if hits.size else NEW_TOKENS
        expected = np.where(np.arange(NEW_TOKENS) < length, free_response[row], PAD)
        np.testing.assert_array_equal(np.asarray(out.sequences[row, WIDTH:]), expected)
        assert int(out.lengths[row]) == length
        np.testing.assert_array_equal(np.asarray(out.response_mask[row]), (offsets >= 0) & (offsets < length))
    assert int(out.lengths[0]) <= 2 and int(out.lengths[4]) <= 5
    _, mask = left_padded_prompts(LENGTHS, WIDTH)
    np.testing.assert_array_equal(np.asarray(out.prompt_mask[:, :WIDTH]), np.repeat(mask, 2, axis=0))
    assert not np.asarray(out.prompt_mask[:, WIDTH:]).any()


def test_top_k_1_equals_greedy(model):
    module, params = model
    greedy = sample_prompts(module, params, 11, eos_ids=NO_EOS, temperature=0.0).sequences
    top_1 = sample_prompts(module, params, 11, eos_ids=NO_EOS, temperature=1.5, top_k=1).sequences
    np.testing.assert_array_equal(np.asarray(top_1), np.asarray(greedy))


def test_same_key_same_samples_and_other_key_other_samples(model):
    module, params = model

    def run(seed):
        return np.asarray(sample_prompts(module, params, seed, eos_ids=NO_EOS).sequences)

    first = run(5)
    np.testing.assert_array_equal(run(5), first)
    assert not np.array_equal(run(6), first)
    # The samples of one prompt are independent draws, not copies.
    assert not np.array_equal(first[0], first[1])


def test_with_a_key_per_prompt_each_prompts_samples_do_not_depend_on_the_other_prompts(model):
    module, params = model
    tokens, mask = left_padded_prompts(LENGTHS, WIDTH)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(3), jnp.arange(len(LENGTHS)))
    kwargs = dict(config=SamplingConfig(NEW_TOKENS), eos_ids=NO_EOS, pad_id=PAD, num_samples=2)
    together = np.asarray(sample(module, params, tokens, mask, keys, **kwargs).sequences)
    for prompt in range(len(LENGTHS)):
        alone = sample(
            module, params, tokens[prompt : prompt + 1], mask[prompt : prompt + 1], keys[prompt : prompt + 1], **kwargs
        )
        np.testing.assert_array_equal(together[2 * prompt : 2 * prompt + 2], np.asarray(alone.sequences))
        assert not np.array_equal(together[2 * prompt], together[2 * prompt + 1])
    with pytest.raises(ValueError, match=r"one key or one per prompt \(3,\)"):
        sample(module, params, tokens, mask, keys[:2], **kwargs)


def numpy_filtered_probs(logits, temperature, top_p, top_k):
    """Reference: softmax(logits / T) restricted to the top-k, then to the smallest prefix of mass >= top_p."""
    scaled = logits / temperature
    order = np.argsort(-scaled)
    keep = np.zeros(len(logits), bool)
    if top_k:
        keep[order[:top_k]] = True
    else:
        keep[:] = True
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    nucleus = np.zeros(len(logits), bool)
    mass = 0.0
    for index in order:
        if keep[index] and mass < top_p:
            nucleus[index] = True
            mass += probs[index]
    probs = np.where(nucleus, probs, 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("top_p,top_k", [(1.0, 0), (1.0, 3), (0.7, 0), (0.8, 4)])
def test_filter_logits_keeps_exactly_the_reference_support(top_p, top_k):
    logits = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32) * 2
    filtered = np.asarray(filter_logits(jnp.asarray(logits), top_p, top_k))
    for row in range(5):
        support = numpy_filtered_probs(logits[row], 1.0, top_p, top_k) > 0
        np.testing.assert_array_equal(np.isfinite(filtered[row]), support)
        np.testing.assert_array_equal(filtered[row][support], logits[row][support])


def test_sampled_frequencies_match_temperature_top_k_top_p_distribution():
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0], np.float32)
    config = SamplingConfig(1, temperature=0.7, top_p=0.9, top_k=4)
    draws = np.asarray(next_tokens(jnp.tile(jnp.asarray(logits), (40_000, 1)), jax.random.key(0), config))
    frequencies = np.bincount(draws, minlength=6) / draws.size
    expected = numpy_filtered_probs(logits.astype(np.float64), 0.7, 0.9, 4)
    np.testing.assert_array_equal(frequencies == 0, expected == 0)
    np.testing.assert_allclose(frequencies, expected, atol=0.012)


def sharded_params(mesh_config):
    mesh = ms.make_mesh(mesh_config)
    return mesh, init_params(ReflectiveModel(CONFIG), jax.random.key(0), mesh)


def test_sampling_on_mesh_with_sharded_params_equals_unsharded(model):
    module, params = model
    mesh, params_on_mesh = sharded_params(ms.MeshConfig(data=2, fsdp=2, tensor=2))
    kernel = params_on_mesh["model"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert not kernel.sharding.is_fully_replicated
    tokens, mask = left_padded_prompts([3, 5], 5, seed=5)
    kwargs = dict(config=SamplingConfig(NEW_TOKENS), eos_ids=(4,), pad_id=PAD, num_samples=2)
    single = sample(module, params, tokens, mask, jax.random.key(2), **kwargs)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        sharded = sample(module, params_on_mesh, tokens, mask, jax.random.key(2), **kwargs)
    np.testing.assert_array_equal(np.asarray(sharded.sequences), np.asarray(single.sequences))
    np.testing.assert_allclose(np.asarray(sharded.step_logits), np.asarray(single.step_logits), atol=1e-5)


def test_sampling_inside_shard_map_manual_over_data_equals_per_replica_unsharded(model):
    module, params = model
    # fsdp and tensor together crash XLA's partitioner on the embedding gather inside a partial-manual shard_map
    # (jax 0.10.2), whatever the sampler does; each alone works.
    mesh, params_on_mesh = sharded_params(ms.MeshConfig(data=2, fsdp=4, tensor=1))
    tokens, mask = left_padded_prompts([3, 5, 1, 4], 5, seed=6)
    kwargs = dict(config=SamplingConfig(NEW_TOKENS), eos_ids=(4,), pad_id=PAD, num_samples=2)

    def per_replica(params, tokens, mask, key):
        out = sample(module, params, tokens, mask, key, **kwargs)
        return out.sequences, out.step_logits

    replicas = jax.jit(
        jax.shard_map(
            per_replica, mesh=mesh, in_specs=(P(), P("data"), P("data"), P()), out_specs=P("data"), axis_names={"data"}
        )
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules(("data",))):
        sequences, step_logits = replicas(params_on_mesh, tokens, mask, jax.random.key(9))
    for replica in range(2):
        half = slice(2 * replica, 2 * replica + 2)
        expected = sample(module, params, tokens[half], mask[half], jax.random.key(9), **kwargs)
        rows = slice(4 * replica, 4 * replica + 4)
        np.testing.assert_array_equal(np.asarray(sequences[rows]), np.asarray(expected.sequences))
        np.testing.assert_allclose(np.asarray(step_logits[rows]), np.asarray(expected.step_logits), atol=1e-5)


def test_greedy_equals_transformers_generate_on_same_weights(tmp_path):
    reference = random_qwen2(4, heads=4, kv_heads=2, tied=False)
    reference.save_pretrained(tmp_path)
    loaded = ms.load_hf(tmp_path)
    tokens, mask = left_padded_prompts([4, 7, 2], 7, seed=7, vocab=97)
    new_tokens = 8

    def ours(eos_ids):
        return sample(
            loaded.module,
            loaded.params,
            tokens,
            mask,
            jax.random.key(0),
            config=SamplingConfig(new_tokens, temperature=0.0),
            eos_ids=eos_ids,
            pad_id=PAD,
        )

    free = np.asarray(ours(NO_EOS).sequences[:, 7:])
    eos = [int(free[1, 3]), int(free[0, 5])]  # greedy tokens of prompts 1 and 0, so that rows stop early
    out = ours(tuple(eos))
    assert out.step_logits is None  # no score_module.pt: a model without head
    with torch.no_grad():
        generated = reference.generate(
            torch.from_numpy(tokens).long(),
            attention_mask=torch.from_numpy(mask).long(),
            do_sample=False,
            max_new_tokens=new_tokens,
            eos_token_id=eos,
            pad_token_id=PAD,
        ).numpy()[:, 7:]
    expected = np.full((3, new_tokens), PAD)
    expected[:, : generated.shape[1]] = generated
    np.testing.assert_array_equal(np.asarray(out.sequences[:, 7:]), expected)
    assert int(out.lengths[1]) <= 4 and int(out.lengths[0]) <= 6


def test_trajectory_scores_are_geometric_means_over_think_steps():
    delimiter, think_open, think_close, eos = 7, 1, 2, 3
    sequences = np.array(
        [
            [9, 9, think_open, 7, 5, 7, 7, 5, 6, 7, think_close, 5, 7, eos],  # steps end after 5 and after 6
            [9, 9, think_open, 5, 5, 5, think_close, 5, 7, eos, 0, 0, 0, 0],  # no step inside <think>
        ]
    )
    response_mask = np.zeros_like(sequences, bool)
    response_mask[0, 2:] = True
    response_mask[1, 2:10] = True
    logits = np.random.default_rng(0).normal(size=sequences.shape).astype(np.float32)
    output = SampleOutput(
        jnp.asarray(sequences),
        jnp.asarray(~response_mask),
        jnp.asarray(response_mask),
        jnp.asarray(logits),
        jnp.asarray(response_mask.sum(-1)),
    )
    mask, scores = trajectory_scores(output, (delimiter,), (think_open, think_close))
    expected_mask = np.zeros_like(sequences, bool)
    expected_mask[0, [4, 8]] = True  # the delimiter right after <think> and the second of a run do not count
    np.testing.assert_array_equal(np.asarray(mask), expected_mask)
    sigmoid = 1 / (1 + np.exp(-logits[0, [4, 8]].astype(np.float64)))
    np.testing.assert_allclose(np.asarray(scores), [np.sqrt(sigmoid.prod()), 0.0], rtol=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(max_new_tokens=4, temperature=-1.0)
