"""The SPRM head and the step rules, against hand-written cases and NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metastone_jax.config import Qwen2Config
from metastone_jax.models.reflective import ReflectiveModel
from metastone_jax.models.sprm import MIN_STEP_SCORE, SPRMHead, step_score_mask, token_dropout, trajectory_score

# Token ids for the hand-written cases: DELIM = a one-token delimiter, OPEN/CLOSE = <think>/</think>, others are words.
DELIM, OPEN, CLOSE = 9, 7, 8


def _mask(tokens, delimiter=(DELIM,), response=None, open_id=OPEN, close_id=CLOSE):
    tokens = jnp.asarray([tokens])
    response = None if response is None else jnp.asarray([response], bool)
    return np.flatnonzero(np.asarray(step_score_mask(tokens, delimiter, open_id, close_id, response)[0])).tolist()


def test_score_is_read_at_the_position_before_each_delimiter():
    assert _mask([1, 2, DELIM, 3, DELIM, 4]) == [1, 3]


def test_only_the_first_delimiter_of_a_run_counts():
    assert _mask([1, DELIM, DELIM, DELIM, 2, DELIM]) == [0, 4]


def test_delimiter_directly_after_think_is_dropped():
    assert _mask([OPEN, DELIM, 1, DELIM, 2, DELIM, CLOSE]) == [2, 4]


def test_only_delimiters_inside_the_think_span_count():
    #             0  1  2  3  4  5  6  7  8
    assert _mask([1, DELIM, OPEN, 2, DELIM, CLOSE, 3, DELIM, 4]) == [3]


def test_without_think_tags_the_whole_response_counts():
    assert _mask([1, DELIM, 2, DELIM]) == [0, 2]


def test_think_opened_in_the_prompt_span_runs_to_close():
    # R1-style: the prompt ends with <think>, so the response has only </think>.
    tokens = [5, OPEN, 1, DELIM, 2, DELIM, CLOSE, 3, DELIM]
    response = [0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert _mask(tokens, response=response) == [2, 4]


def test_prompt_delimiters_never_count():
    tokens = [1, DELIM, 2, 3, DELIM, 4]
    response = [0, 0, 0, 1, 1, 1]
    assert _mask(tokens, response=response) == [3]


def test_multi_token_delimiter_and_runs():
    # Delimiter (5, 6): a run "5 6 5 6" counts once; a lone 5 or 6 does not.
    tokens = [1, 5, 6, 5, 6, 2, 5, 3, 6, 4, 5, 6]
    assert _mask(tokens, delimiter=(5, 6), open_id=None, close_id=None) == [0, 9]


def test_head_parameter_count_is_2c2_plus_4c_plus_1():
    for hidden in (8, 24, 64):
        variables = jax.eval_shape(SPRMHead(hidden).init, jax.random.key(0), jnp.zeros((1, hidden)))
        count = sum(x.value.size if hasattr(x, "value") else x.size for x in jax.tree.leaves(variables))
        assert (
            count
            == 2 * hidden * hidden + 4 * hidden + 1
            == Qwen2Config(
                vocab_size=8,
                hidden_size=hidden,
                intermediate_size=8,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
            ).sprm_parameter_count
        )
    assert Qwen2Config(hidden_size=1536).sprm_parameter_count == 4_724_737  # the 1.5B head: 4.7M


def test_trajectory_score_is_geometric_mean_of_clamped_step_scores():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6)).astype(np.float32) * 3
    logits[1, 2] = -40.0  # sigmoid underflows: clamped to 1e-6
    mask = np.array([[1, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
    scores = np.clip(1 / (1 + np.exp(-logits.astype(np.float64))), MIN_STEP_SCORE, 1.0)
    expected = [np.prod(scores[i][mask[i]]) ** (1 / mask[i].sum()) if mask[i].any() else 0.0 for i in range(3)]
    np.testing.assert_allclose(
        np.asarray(trajectory_score(jnp.asarray(logits), jnp.asarray(mask))), expected, rtol=1e-5
    )


@pytest.mark.parametrize(
    "scale", [pytest.param(0.0, marks=pytest.mark.slow), pytest.param(1e-4, marks=pytest.mark.slow), 0.5]
)
def test_spr_gradient_reaches_the_backbone_scaled(scale):
    config = Qwen2Config(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    module = ReflectiveModel(config)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 5)))
    params = module.init(jax.random.key(0), tokens)["params"]

    def head_loss(params, s):
        return module.apply({"params": params}, tokens, sprm_backbone_grad_scale=s).step_logits.sum()

    full = jax.grad(head_loss)(params, 1.0)
    scaled = jax.grad(head_loss)(params, scale)
    for a, b in zip(jax.tree.leaves(full["model"]), jax.tree.leaves(scaled["model"])):
        np.testing.assert_allclose(np.asarray(b), scale * np.asarray(a), rtol=1e-5, atol=1e-12)
    for a, b in zip(jax.tree.leaves(full["sprm"]), jax.tree.leaves(scaled["sprm"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)


def test_dropout_mask_of_a_token_does_not_depend_on_the_padding_around_it():
    hidden, rows, length, pad_left, pad_right = 16, 3, 10, 4, 6
    head = SPRMHead(hidden)
    features = jax.random.normal(jax.random.key(0), (rows, length, hidden))
    variables = head.init(jax.random.key(1), features)
    positions = jnp.broadcast_to(jnp.arange(length), (rows, length))
    padded_features = jnp.pad(features, ((0, 0), (pad_left, pad_right), (0, 0)))
    # Rotary positions of a left-padded row: pads repeat position 0, real tokens count from 0.
    padded_positions = jnp.pad(positions, ((0, 0), (pad_left, pad_right)), mode="edge")
    dropout = {"dropout": jax.random.key(2)}
    got = head.apply(variables, features, positions, deterministic=False, rngs=dropout)
    padded = head.apply(variables, padded_features, padded_positions, deterministic=False, rngs=dropout)
    np.testing.assert_allclose(padded[:, pad_left : pad_left + length], got, rtol=1e-6)
    assert not np.allclose(got, head.apply(variables, features))  # dropout is on


def test_dropout_keeps_half_the_units_and_doubles_them():
    hidden, rows, length = 64, 4, 32
    features = jnp.ones((rows, length, 2 * hidden))
    positions = jnp.broadcast_to(jnp.arange(length), (rows, length))
    dropped = np.asarray(token_dropout(jax.random.key(0), features, 0.5, positions))
    assert set(np.unique(dropped)) == {0.0, 2.0}
    kept = (dropped == 2.0).mean()
    assert abs(kept - 0.5) < 0.02  # 16,384 draws: 5 standard deviations is 0.02
    assert not np.array_equal(dropped[0], dropped[1])  # rows draw apart
