"""The pure train steps on fake CPU devices with a tiny random ReflectiveModel.

The data-parallel RL step is checked against the same update written by hand without shard_map: one gradient of
the mean of the replicas' losses over the whole batch (jax.vmap with a named axis stands in for the replicas,
so the SPR counts are still summed over them), then the optimizer applied once; micro-batched steps against the
same one-batch loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import comms
from metastone_jax import losses, step, train_state
from metastone_jax.config import MeshConfig, Qwen2Config, RLConfig
from metastone_jax.models.reflective import HEAD, ReflectiveModel, init_params
from metastone_jax.sharding import make_mesh

CONFIG = Qwen2Config(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)
MODULE = ReflectiveModel(CONFIG)
BATCH, LENGTH, PROMPT, GROUP = 8, 12, 5, 4


def _mesh(data, fsdp=1):
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=1), jax.devices()[: data * fsdp])


@pytest.fixture(scope="module")
def params():
    return init_params(MODULE, jax.random.key(0))


@pytest.fixture(scope="module")
def ref_params():
    return init_params(MODULE, jax.random.key(1))


def _masks(seed):
    """Left-padded prompts (0..2 pads) in slots [0, PROMPT), responses of varying length after them."""
    rng = np.random.default_rng(seed)
    slots = np.arange(LENGTH)
    pads = np.arange(BATCH) % 3
    ends = PROMPT + 3 + rng.integers(0, LENGTH - PROMPT - 2, BATCH)  # one past the last response token
    attention = (slots >= pads[:, None]) & (slots < ends[:, None])
    response = attention & (slots >= PROMPT)
    return rng, attention, response


def sft_batch(seed=0):
    rng, attention, response = _masks(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, (BATCH, LENGTH)).astype(np.int32)
    return {"tokens": tokens, "attention_mask": attention, "loss_mask": response}


def rl_batch(seed=0, rewards=None, outcome=None):
    rng, attention, response = _masks(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, (BATCH, LENGTH)).astype(np.int32)
    if rewards is None:
        rewards = np.array([1, 0, 0, 1, 0, 1, 1, 1], np.float32)
    return {
        "tokens": tokens,
        "attention_mask": attention,
        "response_mask": response,
        "rewards": rewards,
        "outcome": rewards if outcome is None else outcome,
        "step_mask": response & (rng.random((BATCH, LENGTH)) < 0.5),
    }


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _policy_and_head(tree):
    head = tree[HEAD]
    return {k: v for k, v in tree.items() if k != HEAD}, head


def capture_gradients() -> optax.GradientTransformation:
    """Leaves the parameters alone and keeps the last (already averaged) gradients as its state."""
    return optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, state, p=None: (jax.tree.map(jnp.zeros_like, g), g)
    )


def test_sft_steps_lower_the_loss_and_pmean_keeps_the_four_replicas_bit_identical(params):
    mesh = _mesh(4)
    algorithm = comms.get("pmean")
    tx = train_state.make_optimizer(algorithm, 1e-2)
    state = train_state.init_train_state(MODULE, algorithm, tx, mesh, params)
    train_step = step.make_sft_step(MODULE, algorithm, tx, mesh)
    batch = sft_batch()
    history = []
    for _ in range(6):
        state, metrics = train_step(state, batch)
        history.append(float(metrics["loss"]))
    assert history[-1] < history[0] - 0.1, history
    assert int(state.step) == 6
    for leaf in _leaves(state.params):
        for replica in range(1, 4):
            np.testing.assert_array_equal(leaf[replica], leaf[0])


def test_optimizer_moments_are_sharded_like_their_parameters_with_a_replica_axis(params):
    mesh = _mesh(2, fsdp=2)
    algorithm = comms.get("pmean")
    tx = train_state.make_optimizer(algorithm, 1e-3)
    state = train_state.init_train_state(MODULE, algorithm, tx, mesh, params)
    kernel = state.params["model"]["layers"]["mlp"]["up_proj"]["kernel"]  # [replicas, layers, embed, mlp]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("data", None, "fsdp", "tensor")
    adam = state.opt_state.inner_states["policy"].inner_state[1][0]
    assert adam.mu["model"]["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == kernel.sharding.spec
    assert adam.count.shape == (2,) and adam.count.sharding.spec == jax.sharding.PartitionSpec("data")


def _by_hand_rl_update(params, ref_params, batch, config, tx, seed, replicas=2, temperature=1.0, micro_batches=1):
    """One RL update without shard_map: the gradient of the mean of the replicas' losses (vmap over their parts of
    the batch), each the plain loss of its whole part. The policy's forward runs over micro-batches of the part, the
    m-th with dropout key fold_in(replica key, m), and their outputs are joined before the loss."""
    rewards = batch["rewards"].reshape(-1, config.group_size).astype(np.float64)
    advantages = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=1, keepdims=True) + 1e-6)
    positions = np.maximum(np.cumsum(batch["attention_mask"], axis=1) - 1, 0)
    inputs = {**batch, "advantages": advantages.reshape(-1).astype(np.float32), "positions": positions}
    halves = jax.tree.map(lambda x: jnp.asarray(x).reshape(replicas, -1, *x.shape[1:]), inputs)
    keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), r) for r in range(replicas)])
    rows = BATCH // replicas // micro_batches

    def replica_loss(p, half, key):
        def forward(variables, part=slice(None), **kwargs):
            inputs = (half["tokens"][part], half["positions"][part], half["attention_mask"][part])
            return MODULE.apply({"params": variables}, *inputs, **kwargs)

        ref_logprobs, _ = losses.next_token_scores(forward(ref_params).logits / temperature, half["tokens"])
        outs = [
            forward(
                p,
                slice(m * rows, (m + 1) * rows),
                deterministic=False,
                sprm_backbone_grad_scale=config.sprm_backbone_grad_scale,
                rngs={"dropout": jax.random.fold_in(key, m)},
            )
            for m in range(micro_batches)
        ]
        logits, step_logits = (jnp.concatenate(parts) for parts in zip(*((o.logits, o.step_logits) for o in outs)))
        logprobs, entropies = losses.next_token_scores(logits / temperature, half["tokens"])
        step_mask = half["step_mask"]
        if config.spr_mixed_groups_only:  # a replica's half is one group here: keep it when its outcomes differ
            step_mask = step_mask & (half["outcome"].min() != half["outcome"].max())
        weights = losses.spr_step_weights(
            step_logits, step_mask, half["outcome"], ("data",), config.spr_agreement_filter
        )
        return losses.rl_loss(
            logprobs,
            entropies,
            step_logits,
            half["response_mask"],
            half["advantages"],
            ref_logprobs,
            weights,
            half["outcome"],
            config,
        )[0]

    def mean_loss(p):
        return jax.vmap(replica_loss, in_axes=(None, 0, 0), axis_name="data")(p, halves, keys).mean()

    @jax.jit
    def update(params):
        updates, _ = tx.update(jax.grad(mean_loss)(params), tx.init(params), params)
        return optax.apply_updates(params, updates)

    return update(params)


@pytest.mark.parametrize(
    "replicas, fsdp, micro_batch_size, logits_chunk, agreement_filter, mixed_groups_only",
    [
        pytest.param(2, 2, 0, 0, True, False, marks=pytest.mark.slow),  # the micro-batched cases below cover it
        pytest.param(1, 4, 0, 0, False, False, marks=pytest.mark.slow),
        (2, 2, 4, 5, True, False),
        (2, 2, 4, 5, False, True),
    ],
)
def test_data_parallel_rl_step_equals_the_same_update_computed_by_hand_on_the_full_batch(
    params, ref_params, replicas, fsdp, micro_batch_size, logits_chunk, agreement_filter, mixed_groups_only
):
    # (1, 4): one replica, the model sharded over fsdp; XLA refuses an all-reduce over such a one-device manual
    # axis, so comms.pmean/psum must skip it. (2, 2, 4, 5): two micro-batches per replica and logits 5 positions
    # at a time; the reference is still one plain loss over each replica's whole part, with the micro-batches'
    # dropout keys. The SPR agreement filter is switched in both the one-pass and the micro-batched step.
    mesh = _mesh(replicas, fsdp=fsdp)
    algorithm = comms.get("pmean")
    # A large eps keeps Adam's first step (≈ lr·sign(g)) smooth in g, so float rounding cannot flip a tiny gradient.
    tx = train_state.make_optimizer(algorithm, 1e-3, eps=1e-4, head_learning_rate=1e-3)
    config = RLConfig(
        group_size=GROUP,
        kl_coef=0.1,
        entropy_coef=0.01,
        sprm_backbone_grad_scale=0.5,
        micro_batch_size=micro_batch_size,
        spr_agreement_filter=agreement_filter,
        spr_mixed_groups_only=mixed_groups_only,
    )
    # With mixed_groups_only the first group (all right) leaves the SPR loss and the second (mixed) stays.
    batch = rl_batch(outcome=np.array([1, 1, 1, 1, 0, 1, 1, 0], np.float32)) if mixed_groups_only else rl_batch()
    state = train_state.init_train_state(MODULE, algorithm, tx, mesh, params)
    rl_step = step.make_rl_step(
        MODULE, algorithm, tx, mesh, config, temperature=0.7, dropout_seed=3, logits_chunk=logits_chunk
    )
    state, metrics = rl_step(state, batch, ref_params)
    micro_batches = BATCH // (micro_batch_size or BATCH)
    want = _by_hand_rl_update(params, ref_params, batch, config, tx, 3, replicas, 0.7, micro_batches)
    assert float(metrics["kl"]) > 0 and float(metrics["spr_loss"]) > 0
    for got, expected, before in zip(_leaves(state.params), _leaves(want), _leaves(params)):
        assert not np.array_equal(expected, before)
        for replica in range(replicas):
            np.testing.assert_allclose(got[replica], expected, atol=1e-5)


def test_micro_batched_sft_step_with_chunked_logits_equals_the_one_batch_step(params):
    mesh = _mesh(2, fsdp=2)
    algorithm = comms.get("pmean")
    tx = train_state.make_optimizer(algorithm, 1e-3, eps=1e-4)
    results = []
    for micro_batch_size, logits_chunk in [(0, 0), (2, 5)]:  # 4 micro-batches of one row per replica
        state = train_state.init_train_state(MODULE, algorithm, tx, mesh, params)
        train_step = step.make_sft_step(
            MODULE, algorithm, tx, mesh, micro_batch_size=micro_batch_size, logits_chunk=logits_chunk
        )
        state, metrics = train_step(state, sft_batch())
        results.append((float(metrics["loss"]), state.params))
    (one_loss, one_params), (micro_loss, micro_params) = results
    assert micro_loss == pytest.approx(one_loss, rel=1e-6)
    for micro, one in zip(_leaves(micro_params), _leaves(one_params)):
        np.testing.assert_allclose(micro, one, atol=1e-5)
    trained, before = (_leaves(_policy_and_head(tree)[0]) for tree in (one_params, params))  # SFT leaves the head
    assert all(not np.array_equal(after[0], initial) for after, initial in zip(trained, before))


def test_spr_gradient_reaches_the_backbone_scaled_by_the_configured_fraction(params, ref_params):
    mesh = _mesh(2)
    algorithm = comms.get("pmean")
    tx = capture_gradients()
    # Equal rewards in every group make every advantage 0, and with no KL or entropy term only SPR has a gradient.
    batch = rl_batch(rewards=np.zeros(BATCH, np.float32), outcome=np.array([1, 0] * 4, np.float32))

    def spr_gradients(scale):
        config = RLConfig(group_size=GROUP, kl_coef=0.0, entropy_coef=0.0, sprm_backbone_grad_scale=scale)
        state = train_state.init_train_state(MODULE, algorithm, tx, mesh, params)
        state, metrics = step.make_rl_step(MODULE, algorithm, tx, mesh, config)(state, batch, ref_params)
        assert float(metrics["spr_loss"]) > 0
        return jax.tree.map(lambda g: np.asarray(g[0]), state.opt_state)

    full_backbone, full_head = _policy_and_head(spr_gradients(1.0))
    scaled_backbone, scaled_head = _policy_and_head(spr_gradients(0.25))
    assert max(np.abs(g).max() for g in _leaves(full_backbone)) > 0
    for got, full in zip(_leaves(scaled_backbone), _leaves(full_backbone)):
        np.testing.assert_allclose(got, 0.25 * full, rtol=1e-6, atol=1e-12)
    for got, full in zip(_leaves(scaled_head), _leaves(full_head)):
        np.testing.assert_allclose(got, full, rtol=1e-6, atol=1e-12)


def np_first_adamw_update(grads, params, lr, weight_decay, clip_norm, eps=1e-8):
    """First AdamW step after global-norm clipping: m̂ = g, v̂ = g², update = −lr (g / (|g| + eps) + wd·p)."""
    norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads))
    factor = min(1.0, clip_norm / norm)
    return [-lr * (g * factor / (np.abs(g * factor) + eps) + weight_decay * p) for g, p in zip(grads, params)]


@pytest.mark.parametrize("frozen", ["policy", "head"])
def test_head_optimizer_touches_only_the_head_and_policy_optimizer_only_the_rest(params, frozen):
    policy_lr, head_lr = (0.0, 1e-2) if frozen == "policy" else (1e-2, 0.0)
    tx = train_state.make_optimizer(comms.get("pmean"), policy_lr, weight_decay=0.1, head_learning_rate=head_lr)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    (policy_updates, head_updates), (policy_grads, head_grads) = map(_policy_and_head, (updates, grads))
    policy_params, head_params = _policy_and_head(params)
    if frozen == "policy":
        assert all(np.all(u == 0) for u in _leaves(policy_updates))
        want = np_first_adamw_update(_leaves(head_grads), _leaves(head_params), 1e-2, 0.01, 1.0)  # the head's AdamW
        got = _leaves(head_updates)
    else:
        assert all(np.all(u == 0) for u in _leaves(head_updates))
        want = np_first_adamw_update(_leaves(policy_grads), _leaves(policy_params), 1e-2, 0.1, 1.0)
        got = _leaves(policy_updates)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-9)


def test_train_steps_name_missing_batch_keys_and_indivisible_batches(params, ref_params):
    mesh = _mesh(2)
    algorithm = comms.get("pmean")
    tx = train_state.make_optimizer(algorithm, 1e-3)
    state = train_state.init_train_state(MODULE, algorithm, tx, mesh, params)
    rl_step = step.make_rl_step(MODULE, algorithm, tx, mesh, RLConfig(group_size=GROUP))
    batch = rl_batch()
    with pytest.raises(ValueError, match="missing outcome"):
        rl_step(state, {k: v for k, v in batch.items() if k != "outcome"}, ref_params)
    with pytest.raises(ValueError, match="not divisible"):
        rl_step(state, jax.tree.map(lambda x: x[:5], batch), ref_params)
    for micro_batch_size in (3, 1):  # does not divide 8; not a multiple of the 2 replicas
        sft_step = step.make_sft_step(MODULE, algorithm, tx, mesh, micro_batch_size=micro_batch_size)
        with pytest.raises(ValueError, match=f"micro_batch_size={micro_batch_size} must divide the batch size 8"):
            sft_step(state, sft_batch())


def test_sft_steps_given_the_comm_phase_equal_steps_that_choose_it_at_run_time(params):
    # 1-bit Adam's warm-up, then compressed momenta: the train loop passes algorithm.phase(k) for update k.
    mesh = _mesh(2)
    algorithm = comms.get("onebit_adam", warmup_steps=2)
    tx = train_state.make_optimizer(algorithm, 1e-2)
    train_step = step.make_sft_step(MODULE, algorithm, tx, mesh)
    phases = {
        "run time": [None] * 4,
        "given": [algorithm.phase(k) for k in range(4)],
        "one late": [algorithm.phase(k - 1) for k in range(4)],
    }
    params_after = {}
    for name, given in phases.items():
        state = train_state.init_train_state(MODULE, algorithm, tx, mesh, params)
        for k, phase in enumerate(given):
            state, _ = train_step(state, sft_batch(k), phase=phase)
        params_after[name] = _leaves(state.params)

    def relative_difference(name):
        got, want = (np.concatenate([leaf.ravel() for leaf in params_after[n]]) for n in (name, "run time"))
        return np.abs(got - want).max() / np.abs(want).max()

    # Separately compiled programs may round the model's backward differently (tests/comms shows the optimizer
    # paths bitwise equal); a phase off by one step is far off.
    assert relative_difference("given") < 1e-6
    assert relative_difference("one late") > 1e-2


@pytest.mark.parametrize(
    "name, options",
    [pytest.param("onebit_adam", {"warmup_steps": 1}, marks=pytest.mark.slow), ("local_sgd", {"period": 2})],
)
def test_one_replica_sharded_over_fsdp_steps_like_one_device(params, name, options):
    """Every collective over a one-device `data` axis must compile next to an automatic fsdp axis (see comms.psum)."""
    results = []
    for fsdp in (1, 4):
        algorithm, mesh = comms.get(name, **options), _mesh(1, fsdp=fsdp)
        # A large eps: after one warm-up step, entries with a tiny frozen variance step by ~lr * scale / sqrt(v),
        # which would magnify a 1-bit sign that sharding's rounding flips.
        tx = train_state.make_optimizer(algorithm, 1e-3, eps=1e-3)
        state = train_state.init_train_state(MODULE, algorithm, tx, mesh, params)
        train_step = step.make_sft_step(MODULE, algorithm, tx, mesh)
        for update in range(3):  # 1-bit Adam: a warm-up, then compressed updates; local SGD averages after update 2
            state, metrics = train_step(state, sft_batch(update), phase=algorithm.phase(update))
        results.append((float(metrics["loss"]), _leaves(state.params)))
    (loss_one_device, params_one_device), (loss_fsdp, params_fsdp) = results
    assert loss_fsdp == pytest.approx(loss_one_device, rel=1e-5)
    # Sharding changes float rounding, which can flip the 1-bit sign of a near-zero momentum entry: a 1e-5 shift
    # at lr 1e-3, where a missed average or phase would move parameters by ~1e-3.
    for sharded, single in zip(params_fsdp, params_one_device):
        np.testing.assert_allclose(sharded, single, rtol=1e-4, atol=1e-4)
