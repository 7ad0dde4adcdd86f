"""The objectives of metastone_jax.losses against NumPy re-implementations written here (float64, explicit loops)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from metastone_jax import losses
from metastone_jax.config import RLConfig

B, T, V = 4, 7, 11


def _random_inputs(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(B, T, V)).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = rng.random((B, T)) < 0.6
    return rng, logits, tokens, mask


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_token_logprobs(logits, tokens):
    """lp[b, t] = log p(tokens[b, t] | logits at position t - 1); 0 at t = 0."""
    out = np.zeros(tokens.shape)
    log_probs = np_log_softmax(logits)
    for b in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            out[b, t] = log_probs[b, t - 1, tokens[b, t]]
    return out


def np_token_mean(values, mask):
    """Mean over masked tokens 1..T-1 (token 0 is never predicted); 0 when nothing is masked."""
    mask = np.asarray(mask, bool).copy()
    mask[:, 0] = False
    count = mask.sum()
    return 0.0 if count == 0 else float(np.asarray(values, np.float64)[mask].sum() / count)


def np_entropy_per_token(logits):
    out = np.zeros(logits.shape[:2])
    log_probs = np_log_softmax(logits)
    out[:, 1:] = -(np.exp(log_probs) * log_probs).sum(axis=-1)[:, :-1]
    return out


def np_spr_loss(step_logits, step_mask, outcome, global_counts=None, agreement_filter=True):
    """The SPR loss of docs/algorithms.md with explicit loops; `global_counts` (pos, neg) before the +1 replace
    the local ones; without `agreement_filter` every masked step is kept."""
    pos = neg = 0
    kept = []
    for b in range(step_logits.shape[0]):
        y = 1.0 if outcome[b] > 0.5 else 0.0
        for t in range(step_logits.shape[1]):
            s = float(step_logits[b, t])
            agrees = (s > 0 and y == 1.0) or (s < 0 and y == 0.0)
            if step_mask[b, t] and (agrees or not agreement_filter):
                kept.append((s, y))
                pos, neg = pos + (y == 1.0), neg + (y == 0.0)
    if global_counts is not None:
        pos, neg = global_counts
    pos, neg = pos + 1, neg + 1
    numerator = denominator = 0.0
    for s, y in kept:
        weight = 1.5 * neg / (pos + neg) if y == 1.0 else pos / (pos + neg)
        probability = 1.0 / (1.0 + np.exp(-s))
        bce = -(y * np.log(probability) + (1 - y) * np.log(1 - probability))
        numerator, denominator = numerator + weight * bce, denominator + weight
    return numerator / (denominator + 1e-5)


def spr_loss(step_logits, step_mask, outcome, axis_names=(), agreement_filter=True):
    step_logits, step_mask, outcome = map(jnp.asarray, (step_logits, step_mask, outcome))
    weights = losses.spr_step_weights(step_logits, step_mask, outcome, axis_names, agreement_filter)
    return losses.spr_loss(step_logits, weights, outcome)


def np_kept_counts(step_logits, step_mask, outcome):
    right = np.asarray(outcome)[:, None] > 0.5
    kept = step_mask & np.where(right, step_logits > 0, step_logits < 0)
    return int((kept & right).sum()), int((kept & ~right).sum())


def test_next_token_scores_are_each_tokens_logprob_and_its_distributions_entropy():
    _, logits, tokens, _ = _random_inputs()
    logprobs, entropies = map(np.asarray, losses.next_token_scores(jnp.asarray(logits), jnp.asarray(tokens)))
    np.testing.assert_allclose(logprobs, np_token_logprobs(logits, tokens), atol=1e-5)
    np.testing.assert_allclose(entropies, np_entropy_per_token(logits), atol=1e-5)
    assert np.all(logprobs[:, 0] == 0.0) and np.all(entropies[:, 0] == 0.0)


def test_sft_loss_is_the_token_mean_cross_entropy_over_the_mask():
    _, logits, tokens, mask = _random_inputs(1)
    logprobs, _ = losses.next_token_scores(jnp.asarray(logits), jnp.asarray(tokens))
    got = losses.sft_loss(logprobs, jnp.asarray(mask))
    np.testing.assert_allclose(got, np_token_mean(-np_token_logprobs(logits, tokens), mask), rtol=1e-5)


def test_empty_masks_give_zero_losses_not_nan():
    _, logits, tokens, _ = _random_inputs(3)
    empty = jnp.zeros((B, T), bool)
    lp, entropies = losses.next_token_scores(jnp.asarray(logits), jnp.asarray(tokens))
    assert float(losses.sft_loss(lp, empty)) == 0.0
    assert float(losses.token_mean(entropies, empty)) == 0.0
    assert float(losses.policy_loss(lp, lp + 0.3, jnp.ones((B,)), empty)) == 0.0
    assert float(losses.kl_k3(lp, lp - 1.0, empty)) == 0.0
    step_logits, outcome = jnp.ones((B, T)), jnp.ones((B,))
    assert float(losses.spr_loss(step_logits, losses.spr_step_weights(step_logits, empty, outcome), outcome)) == 0.0


def test_group_advantages_normalise_each_group_by_its_unbiased_std():
    rewards = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1], np.float32)  # group 2 all equal
    got = np.asarray(losses.group_advantages(jnp.asarray(rewards), 4))
    want = np.empty(12)
    for g in range(3):
        group = rewards[4 * g : 4 * g + 4].astype(np.float64)
        want[4 * g : 4 * g + 4] = (group - group.mean()) / (np.std(group, ddof=1) + 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(got[4:8] == 0.0)


def test_group_advantages_refuse_a_batch_that_is_not_whole_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        losses.group_advantages(jnp.zeros((6,)), 4)


def np_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps):
    per_token = np.zeros(logprobs.shape)
    for b in range(logprobs.shape[0]):
        for t in range(logprobs.shape[1]):
            ratio = np.exp(float(logprobs[b, t]) - float(old_logprobs[b, t]))
            clipped = min(max(ratio, 1 - clip_eps), 1 + clip_eps)
            per_token[b, t] = max(-advantages[b] * ratio, -advantages[b] * clipped)
    return np_token_mean(per_token, mask)


def test_policy_loss_is_the_token_mean_ppo_clipped_surrogate():
    rng, _, _, mask = _random_inputs(4)
    logprobs = -rng.random((B, T)).astype(np.float32) * 3
    old_logprobs = logprobs + rng.normal(scale=0.4, size=(B, T)).astype(np.float32)  # many ratios outside 1±0.2
    advantages = rng.normal(size=(B,)).astype(np.float32)
    got = losses.policy_loss(*map(jnp.asarray, (logprobs, old_logprobs, advantages, mask)), clip_eps=0.2)
    np.testing.assert_allclose(got, np_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2), rtol=1e-5)


def test_policy_loss_ignores_nonfinite_values_on_masked_out_tokens():
    logprobs = jnp.array([[0.0, -1.0, -np.inf]])
    old = jnp.array([[0.0, -1.2, 0.0]])
    mask = jnp.array([[False, True, False]])
    got = losses.policy_loss(logprobs, old, jnp.array([2.0]), mask)
    np.testing.assert_allclose(got, -2.0 * min(np.exp(0.2), 1.2), rtol=1e-6)


def test_kl_k3_is_the_token_mean_low_variance_estimator():
    rng, _, _, mask = _random_inputs(5)
    logprobs = -rng.random((B, T)) * 3
    ref = logprobs + rng.normal(scale=0.5, size=(B, T))
    per_token = np.exp(ref - logprobs) - (ref - logprobs) - 1
    got = losses.kl_k3(jnp.asarray(logprobs, jnp.float32), jnp.asarray(ref, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(got, np_token_mean(per_token, mask), rtol=1e-5)
    assert float(losses.kl_k3(jnp.asarray(logprobs), jnp.asarray(logprobs), jnp.asarray(mask))) == 0.0


@pytest.mark.parametrize("agreement_filter", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spr_loss_matches_the_class_balanced_filtered_bce_of_the_spec(seed, agreement_filter):
    rng = np.random.default_rng(seed)
    step_logits = rng.normal(scale=2.0, size=(6, 9)).astype(np.float32)
    step_mask = rng.random((6, 9)) < 0.5
    outcome = np.array([1, 0, 1, 1, 0, 0], np.float32)
    got = spr_loss(step_logits, step_mask, outcome, agreement_filter=agreement_filter)
    want = np_spr_loss(step_logits, step_mask, outcome, agreement_filter=agreement_filter)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_spr_loss_keeps_only_steps_whose_prediction_agrees_with_the_outcome():
    # Right trajectory: s = +2 agrees, s = −3 does not (dropped); wrong trajectory: s = −1 agrees, s = +4 does not.
    step_logits = jnp.array([[2.0, -3.0], [-1.0, 4.0]])
    step_mask = jnp.ones((2, 2), bool)
    got = spr_loss(step_logits, step_mask, jnp.array([1.0, 0.0]))
    pos = neg = 2.0  # one kept step of each class, + 1
    w_pos, w_neg = 1.5 * neg / (pos + neg), pos / (pos + neg)
    bce_pos, bce_neg = np.log1p(np.exp(-2.0)), np.log1p(np.exp(-1.0))
    np.testing.assert_allclose(got, (w_pos * bce_pos + w_neg * bce_neg) / (w_pos + w_neg + 1e-5), rtol=1e-6)


def test_spr_loss_without_the_agreement_filter_keeps_every_masked_step():
    # The same steps as above; all four count now, a masked-out fifth (s = 9 in the wrong trajectory) does not.
    step_logits = jnp.array([[2.0, -3.0, 0.0], [-1.0, 4.0, 9.0]])
    step_mask = jnp.array([[True, True, False], [True, True, False]])
    weights = losses.spr_step_weights(step_logits, step_mask, jnp.array([1.0, 0.0]), agreement_filter=False)
    pos = neg = 3.0  # two steps of each class, + 1
    w_pos, w_neg = 1.5 * neg / (pos + neg), pos / (pos + neg)
    np.testing.assert_allclose(weights, [[w_pos, w_pos, 0.0], [w_neg, w_neg, 0.0]], rtol=1e-6)
    got = losses.spr_loss(step_logits, weights, jnp.array([1.0, 0.0]))
    # BCE(s, 1) = log(1 + e^-s), BCE(s, 0) = log(1 + e^s).
    bce_pos = np.log1p(np.exp(-2.0)) + np.log1p(np.exp(3.0))
    bce_neg = np.log1p(np.exp(-1.0)) + np.log1p(np.exp(4.0))
    want = (w_pos * bce_pos + w_neg * bce_neg) / (2 * w_pos + 2 * w_neg + 1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_spr_loss_with_the_filter_learns_nothing_from_a_head_that_agrees_with_no_outcome():
    # Every step of the right trajectory scores negative and every step of the wrong one positive: the released
    # filter keeps none (weights 0, loss 0, no gradient: the head stays as wrong as it is); without it they all count.
    step_logits = jnp.array([[-1.0, -2.0], [3.0, 0.5]])
    step_mask, outcome = jnp.ones((2, 2), bool), jnp.array([1.0, 0.0])

    def loss(step_logits, agreement_filter):
        weights = losses.spr_step_weights(step_logits, step_mask, outcome, agreement_filter=agreement_filter)
        return losses.spr_loss(step_logits, weights, outcome)

    assert float(loss(step_logits, True)) == 0.0
    assert not np.any(np.asarray(jax.grad(loss)(step_logits, True)))
    gradient = np.asarray(jax.grad(loss)(step_logits, False))
    # d BCE / d s = sigmoid(s) - y: negative on the right trajectory's steps (raise them), positive on the wrong's.
    assert np.all(gradient[0] < 0) and np.all(gradient[1] > 0)


def test_mixed_groups_mark_the_rows_of_groups_with_both_outcomes():
    outcome = np.array([1, 0, 1, 1, 1, 1, 0, 0, 0, 0.3, 1, 0])  # groups of 3; 0.3 counts as wrong
    want = []
    for group in outcome.reshape(-1, 3):
        want += [len({bool(y > 0.5) for y in group}) == 2] * 3
    got = np.asarray(losses.mixed_groups(jnp.asarray(outcome), 3))
    np.testing.assert_array_equal(got, want)
    assert list(got) == [True] * 3 + [False] * 3 + [False] * 3 + [True] * 3


def test_spr_counts_summed_over_four_devices_equal_the_whole_batchs_counts():
    rng = np.random.default_rng(7)
    num_devices, per_device = 4, 3
    step_logits = rng.normal(scale=2.0, size=(num_devices * per_device, 8)).astype(np.float32)
    step_mask = rng.random(step_logits.shape) < 0.5
    outcome = rng.integers(0, 2, num_devices * per_device).astype(np.float32)
    mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    def per_device_loss(step_logits, step_mask, outcome):
        return spr_loss(step_logits, step_mask, outcome, axis_names=("data",))[None]

    got = np.asarray(jax.jit(per_device_loss)(step_logits, step_mask, outcome))
    whole = np_kept_counts(step_logits, step_mask, outcome)
    for d in range(num_devices):
        rows = slice(d * per_device, (d + 1) * per_device)
        want = np_spr_loss(step_logits[rows], step_mask[rows], outcome[rows], global_counts=whole)
        np.testing.assert_allclose(got[d], want, rtol=1e-5)


def _rl_loss(logits, step_logits, tokens, response_mask, advantages, ref_logprobs, step_mask, outcome, config, **kw):
    """rl_loss from logits (already divided by the temperature), as the train step composes it."""
    logprobs, entropies = losses.next_token_scores(logits, tokens)
    weights = losses.spr_step_weights(step_logits, step_mask, outcome)
    return losses.rl_loss(
        logprobs, entropies, step_logits, response_mask, advantages, ref_logprobs, weights, outcome, config, **kw
    )


def test_rl_loss_combines_the_terms_with_their_coefficients_at_the_sampling_temperature():
    rng, logits, tokens, response_mask = _random_inputs(8)
    config = RLConfig(group_size=2, kl_coef=0.3, entropy_coef=0.05, spr_coef=0.7)
    old_logprobs = np_token_logprobs(logits / 0.6, tokens) + rng.normal(scale=0.3, size=(B, T))
    ref_logprobs = np_token_logprobs(logits / 0.6, tokens) + rng.normal(scale=0.3, size=(B, T))
    advantages = rng.normal(size=(B,))
    step_logits = rng.normal(size=(B, T))
    step_mask = rng.random((B, T)) < 0.4
    outcome = np.array([1, 0, 0, 1], np.float32)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    total, metrics = _rl_loss(
        f32(logits) / 0.6,
        f32(step_logits),
        jnp.asarray(tokens),
        jnp.asarray(response_mask),
        f32(advantages),
        f32(ref_logprobs),
        jnp.asarray(step_mask),
        f32(outcome),
        config,
        old_logprobs=f32(old_logprobs),
    )
    logprobs = np_token_logprobs(logits / 0.6, tokens)
    mask = response_mask
    pg = np_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)
    kl = np_token_mean(np.exp(ref_logprobs - logprobs) - (ref_logprobs - logprobs) - 1, mask)
    ent = np_token_mean(np_entropy_per_token(logits / 0.6), mask)
    spr = np_spr_loss(step_logits, step_mask, outcome)
    np.testing.assert_allclose(metrics["pg_loss"], pg, rtol=1e-4)
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-4)
    np.testing.assert_allclose(metrics["entropy"], ent, rtol=1e-4)
    np.testing.assert_allclose(total, pg + 0.7 * spr - 0.05 * ent + 0.3 * kl, rtol=1e-4)


def test_on_policy_rl_loss_has_ratio_one_and_gradient_minus_advantage_times_grad_logprob():
    _, logits, tokens, mask = _random_inputs(9)
    mask[:, 0] = False
    advantages = np.array([1.0, -0.5, 2.0, 0.0], np.float32)
    config = RLConfig(group_size=2, kl_coef=0.0, entropy_coef=0.0, spr_coef=0.0)
    zeros = jnp.zeros((B, T))

    def pg(logits):
        return _rl_loss(
            logits,
            zeros,
            jnp.asarray(tokens),
            jnp.asarray(mask),
            jnp.asarray(advantages),
            zeros,
            jnp.zeros((B, T), bool),
            jnp.zeros((B,)),
            config,
        )

    (value, metrics), grad = jax.value_and_grad(pg, has_aux=True)(jnp.asarray(logits))
    np.testing.assert_allclose(value, np_token_mean(-np.broadcast_to(advantages[:, None], (B, T)), mask), rtol=1e-6)
    assert float(metrics["clip_fraction"]) == 0.0
    # d/dlogits of −A·log softmax(logits)[target], token mean: −A (onehot − softmax) / count, at position t − 1.
    probs = np.exp(np_log_softmax(logits))
    want = np.zeros((B, T, V))
    for b in range(B):
        for t in range(1, T):
            if mask[b, t]:
                want[b, t - 1] = -advantages[b] * (np.eye(V)[tokens[b, t]] - probs[b, t - 1]) / mask.sum()
    np.testing.assert_allclose(grad, want, atol=1e-6)


@pytest.mark.parametrize("chunk,unroll", [(1, False), (3, False), (4, False), (3, True)])
def test_chunked_logprobs_entropy_and_kl_equal_the_plain_ones_with_their_gradients(chunk, unroll):
    # T - 1 = 6 predictions: 6 chunks of one, 2 of three, and 2 of four with a zero-padded last one; the loop over
    # chunks rolled or unrolled.
    rng, _, tokens, mask = _random_inputs(10)
    hidden = jnp.asarray(rng.normal(size=(B, T, 5)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(5, V)), jnp.float32)
    ref_logprobs = jnp.asarray(-rng.random((B, T)) * 3, jnp.float32)
    mask = jnp.asarray(mask)

    def objective(hidden, kernel, chunk):
        project = lambda h: (h @ kernel) / 0.7  # noqa: E731
        if chunk:
            logprobs, entropies = losses.chunked_next_token_scores(hidden, project, jnp.asarray(tokens), chunk, unroll)
        else:  # the reference: the plain scores of the whole [B, T, V] logits
            logprobs, entropies = losses.next_token_scores(project(hidden), jnp.asarray(tokens))
        terms = (logprobs, entropies, losses.kl_k3(logprobs, ref_logprobs, mask))
        return 0.3 * logprobs.sum() + 0.5 * entropies.sum() + terms[2], terms

    (_, got), got_grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(hidden, kernel, chunk)
    (_, want), want_grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(hidden, kernel, 0)
    for g, w in zip((*got, *got_grads), (*want, *want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0], np_token_logprobs(np.asarray(hidden @ kernel) / 0.7, tokens), atol=1e-5)


def test_rl_losses_of_parts_given_the_whole_batchs_totals_add_up_to_the_whole_batchs_loss_and_gradient():
    rng, logits, tokens, response_mask = _random_inputs(11)
    config = RLConfig(group_size=2, kl_coef=0.3, entropy_coef=0.05, spr_coef=0.7)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    step_logits = f32(rng.normal(size=(B, T)))
    step_mask = jnp.asarray(rng.random((B, T)) < 0.6)
    outcome = f32([1, 0, 0, 1])
    advantages, ref_logprobs = f32(rng.normal(size=(B,))), f32(-rng.random((B, T)) * 3)
    old_logprobs = f32(np_token_logprobs(logits, tokens) + rng.normal(scale=0.3, size=(B, T)))
    weights = losses.spr_step_weights(step_logits, step_mask, outcome)
    totals = losses.Totals(losses.token_count(jnp.asarray(response_mask)), weights.sum())

    def loss(logits, step_logits, rows, totals):
        logprobs, entropies = losses.next_token_scores(logits, jnp.asarray(tokens)[rows])
        return losses.rl_loss(
            logprobs,
            entropies,
            step_logits,
            jnp.asarray(response_mask)[rows],
            advantages[rows],
            ref_logprobs[rows],
            weights[rows],
            outcome[rows],
            config,
            old_logprobs=old_logprobs[rows],
            totals=totals,
        )

    whole = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(f32(logits), step_logits, slice(None), None)
    (value, metrics), (logits_grad, step_grad) = whole
    parts = [slice(0, 1), slice(1, 4)]
    part_results = [
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(f32(logits)[rows], step_logits[rows], rows, totals)
        for rows in parts
    ]
    np.testing.assert_allclose(sum(r[0][0] for r in part_results), value, rtol=1e-6)
    for name in metrics:
        np.testing.assert_allclose(sum(r[0][1][name] for r in part_results), metrics[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.concatenate([r[1][0] for r in part_results]), logits_grad, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.concatenate([r[1][1] for r in part_results]), step_grad, rtol=1e-6, atol=1e-8)
