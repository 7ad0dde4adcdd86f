"""Pure train steps `(state, batch) -> (state, metrics)`: one shard_map manual over the replica axis `data`.

Inside the shard_map each replica computes the gradient of its own slice of the batch, micro-batch by micro-batch
when the slice is split (a scan that adds the gradients), and hands it to the communication algorithm
(`comms.apply_gradients`) once; `fsdp` and `tensor` are left to the compiler through the logical-axis rules.
The state and its layout are in `metastone_jax.train_state`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import comms
from metastone_jax.config import RLConfig
from metastone_jax.losses import (
    Totals,
    chunked_next_token_scores,
    group_advantages,
    mixed_groups,
    rl_loss,
    sft_loss,
    spr_step_weights,
    token_count,
)
from metastone_jax.models.reflective import ReflectiveModel, param_shardings
from metastone_jax.sharding import DATA_AXIS, logical_rules, to_device
from metastone_jax.train_state import TrainState, state_specs, train_state_shardings

PyTree = Any
SFT_BATCH_KEYS = ("tokens", "attention_mask", "loss_mask")
RL_BATCH_KEYS = ("tokens", "attention_mask", "response_mask", "rewards", "outcome", "step_mask")


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Rotary positions of a left-padded batch: the number of real tokens before each one (as the sampler uses)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _forward(module, params, batch, **kwargs):
    mask = batch["attention_mask"].astype(bool)
    return module.apply({"params": params}, batch["tokens"], positions_from_mask(mask), mask, **kwargs)


def _projection(module: ReflectiveModel, params: PyTree, temperature: float = 1.0) -> Callable[[jax.Array], jax.Array]:
    """The LM head of `params` at `temperature`: final hidden states [B, T, C] -> logits / temperature."""
    return lambda hidden: module.apply({"params": params}, hidden, method=ReflectiveModel.project) / temperature


def _split_micro_batches(batch: dict, count: int) -> dict:
    """Every leaf [rows, ...] -> [count, rows / count, ...]: micro-batch m is the m-th block of consecutive rows."""
    return jax.tree.map(lambda x: x.reshape(count, -1, *x.shape[1:]), batch)


def _accumulate_gradients(loss_fn, params: PyTree, micro_batches: dict, unroll: bool) -> tuple[PyTree, dict]:
    """(Σ_m ∇loss_fn(params, micro-batch m), Σ_m metrics) over the leading axis of `micro_batches`, by a scan that
    keeps one micro-batch's activations at a time. `loss_fn(params, micro_batch) -> (loss, metrics)` divides by its
    replica's whole-slice totals, so that the sums are the slice's gradient and metrics. `unroll` unrolls the scan."""
    grad_fn = jax.grad(loss_fn, has_aux=True)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    if jax.tree.leaves(micro_batches)[0].shape[0] == 1:
        return grad_fn(params, first)

    def add(total, micro_batch):
        return jax.tree.map(jnp.add, total, grad_fn(params, micro_batch)), None

    # The carry varies over `data` like the gradients that are added to it (shard_map checks scan carries' types).
    zeros = jax.tree.map(
        lambda s: jax.lax.pcast(jnp.zeros(s.shape, s.dtype), DATA_AXIS, to="varying"),
        jax.eval_shape(grad_fn, params, first),
    )
    return jax.lax.scan(add, zeros, micro_batches, unroll=unroll)[0]


def _make_step(
    module, algorithm, tx, mesh, replica_gradients, prepare, required_keys, micro_batch_size, extra_shardings=()
):
    """Jits one train step around `replica_gradients(params, batch, step, *extras, micro_batches=M)
    -> (gradients, metrics)` (one replica, its slice of the batch split into M micro-batches).

    `prepare(batch)` runs on the global batch before the shard_map (e.g. GRPO advantages over whole groups);
    `extras` are replicated over `data` (e.g. the frozen reference parameters). `micro_batch_size` rows of the
    global batch make one micro-batch (0: the whole batch). The returned step takes
    `phase=algorithm.phase(k)`, k the number of updates the state's optimizer has taken, to compile the optimizer's
    path for that phase alone (None: chosen at run time; see comms.api).
    """
    rules = logical_rules(manual_axes=(DATA_AXIS,))

    def per_replica(state: TrainState, batch, *extras, phase, micro_batches):
        params, opt_state, comm_state = map(comms.strip_replica_dim, (state.params, state.opt_state, state.comm_state))
        with nn.logical_axis_rules(rules):
            grads, metrics = replica_gradients(params, batch, state.step, *extras, micro_batches=micro_batches)
        params, opt_state, comm_state = comms.apply_gradients(
            algorithm, tx, grads, params, opt_state, comm_state, state.step, phase
        )
        new_state = TrainState(state.step + 1, *map(comms.add_replica_dim, (params, opt_state, comm_state)))
        return new_state, comms.pmean(metrics, DATA_AXIS)

    extra_specs = tuple(P() for _ in extra_shardings)
    num_replicas = mesh.shape[DATA_AXIS]

    state_shardings = train_state_shardings(module, algorithm, tx, mesh)
    batch_sharding = NamedSharding(mesh, P(DATA_AXIS))

    @functools.cache
    def jitted(phase, micro_batches):
        sharded = jax.shard_map(
            functools.partial(per_replica, phase=phase, micro_batches=micro_batches),
            mesh=mesh,
            in_specs=(state_specs(), P(DATA_AXIS), *extra_specs),
            out_specs=(state_specs(), P()),
            axis_names={DATA_AXIS},
        )
        return jax.jit(
            lambda state, batch, *extras: sharded(state, prepare(batch), *extras),
            in_shardings=(state_shardings, batch_sharding, *extra_shardings),
            out_shardings=(state_shardings, NamedSharding(mesh, P())),
            donate_argnums=0,
        )

    def checked(state: TrainState, batch: dict, *extras, phase: Hashable = None):
        missing = [k for k in required_keys if k not in batch]
        if missing:
            raise ValueError(f"train batch is missing {', '.join(missing)}; it needs {', '.join(required_keys)}")
        size = batch["tokens"].shape[0]
        if size % num_replicas:
            raise ValueError(f"batch size {size} is not divisible by the {num_replicas} replicas of the `data` axis")
        micro = micro_batch_size or size
        if size % micro or micro % num_replicas:
            raise ValueError(
                f"micro_batch_size={micro} must divide the batch size {size} and be a multiple of the "
                f"{num_replicas} replicas of the `data` axis"
            )
        return jitted(phase, size // micro)(state, to_device(batch, batch_sharding), *extras)

    return checked


def make_sft_step(
    module: ReflectiveModel,
    algorithm: comms.CommAlgorithm,
    tx: optax.GradientTransformation,
    mesh,
    *,
    micro_batch_size: int = 0,
    logits_chunk: int = 0,
    unroll_loops: bool = False,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Next-token cross entropy on reference solutions. Batch: tokens, attention_mask, loss_mask (all [B, T]).

    `micro_batch_size` rows at a time accumulate the gradient (0: the whole batch at once); the loss divides by the
    replica's whole count of loss tokens, so the update equals the one-batch update. `logits_chunk` positions at a
    time have logits (0: all; `losses.chunked_next_token_scores`). The head is not trained: its gradients are zero
    (its AdamW weight decay still shrinks it by lr·wd per step). `unroll_loops` unrolls the loops over micro-batches
    and logits chunks, with the same values: for `aot`'s cost analysis, in which XLA counts a loop's body once.
    """

    def replica_gradients(params, batch, step, micro_batches):
        loss_tokens = token_count(batch["loss_mask"])

        def micro_loss(params, micro_batch):
            hidden = _forward(module, params, micro_batch, with_logits=False).hidden
            logprobs, _ = chunked_next_token_scores(
                hidden, _projection(module, params), micro_batch["tokens"], logits_chunk, unroll_loops
            )
            loss = sft_loss(logprobs, micro_batch["loss_mask"], loss_tokens)
            return loss, {"loss": loss}

        return _accumulate_gradients(micro_loss, params, _split_micro_batches(batch, micro_batches), unroll_loops)

    return _make_step(
        module, algorithm, tx, mesh, replica_gradients, lambda batch: batch, SFT_BATCH_KEYS, micro_batch_size
    )


def make_rl_step(
    module: ReflectiveModel,
    algorithm: comms.CommAlgorithm,
    tx: optax.GradientTransformation,
    mesh,
    config: RLConfig,
    temperature: float = 1.0,
    dropout_seed: int = 0,
    *,
    logits_chunk: int = 0,
    unroll_loops: bool = False,
) -> Callable[[TrainState, dict, PyTree], tuple[TrainState, dict]]:
    """GRPO for the policy + SPR for the head in one backward pass: `step(state, batch, ref_params)`.

    Batch ([B] or [B, T], B = prompts x group_size, a prompt's responses consecutive): tokens, attention_mask,
    response_mask (token frame: the generated tokens), rewards, outcome (1 right / 0 wrong), step_mask (position
    frame, from `models.sprm.step_score_mask`), and optionally old_logprobs [B, T] (without them the update is
    on-policy: old = current, detached). `ref_params` are the frozen reference policy's (no replica dimension);
    its log-probabilities are computed here. `logits_chunk` and `unroll_loops` as in `make_sft_step`.

    Micro-batches (`config.micro_batch_size` rows of the batch each) accumulate the gradient of one update, equal to
    the one-batch gradient: the advantages are computed on the global batch before the shard_map; every average
    divides its micro-batches' sums by the replica's whole-slice total (`losses.Totals`): its response tokens, and
    the sum of its SPR weights. Those weights need the class counts of every kept step, on all devices, before the
    first gradient: a forward of the policy without gradient finds them (the price of exactness, one forward per
    update), and the gradient pass uses its kept steps. The head's dropout key of micro-batch m on replica r at
    step t is fold_in(fold_in(fold_in(key(dropout_seed), t), r), m); different micro-batch sizes draw different
    dropout masks, so the updates are equal only without dropout (docs/algorithms.md).
    """

    if not module.with_head:
        raise ValueError("make_rl_step needs a ReflectiveModel with_head=True: the SPR loss trains the SPRM head")

    def prepare(batch):
        # Advantages (and mixed groups) on the global batch, so a group never straddles two replicas.
        batch = {**batch, "advantages": group_advantages(batch["rewards"], config.group_size)}
        if config.spr_mixed_groups_only:
            mixed = mixed_groups(batch["outcome"], config.group_size)[:, None]
            batch["step_mask"] = (batch["step_mask"].astype(bool) & mixed).astype(batch["step_mask"].dtype)
        return batch

    def policy_forward(params, micro_batch):
        return _forward(
            module,
            params,
            micro_batch,
            with_logits=False,
            deterministic=False,
            sprm_backbone_grad_scale=config.sprm_backbone_grad_scale,
            rngs={"dropout": micro_batch["dropout_key"]},
        )

    def scores(params, hidden, tokens):
        project = _projection(module, params, temperature)
        return chunked_next_token_scores(hidden, project, tokens, logits_chunk, unroll_loops)

    def replica_gradients(params, batch, step, ref_params, micro_batches):
        replica_key = jax.random.fold_in(
            jax.random.fold_in(jax.random.key(dropout_seed), step), jax.lax.axis_index(DATA_AXIS)
        )
        micro = _split_micro_batches(batch, micro_batches)
        micro["dropout_key"] = jax.vmap(jax.random.fold_in, (None, 0))(replica_key, jnp.arange(micro_batches))

        def without_gradient(micro_batch):
            ref_hidden = _forward(module, ref_params, micro_batch, with_logits=False).hidden
            ref_logprobs = scores(ref_params, ref_hidden, micro_batch["tokens"])[0]
            if micro_batches == 1:
                return ref_logprobs, None
            # Unrolled, XLA would merge this forward with the gradient pass's; the rolled loops keep them apart.
            policy = jax.lax.optimization_barrier(params) if unroll_loops else params
            return ref_logprobs, policy_forward(policy, micro_batch).step_logits

        ref_logprobs, step_logits = jax.lax.scan(
            lambda _, micro_batch: (None, without_gradient(micro_batch)), None, micro, unroll=unroll_loops
        )[1]
        micro["ref_logprobs"] = jax.lax.stop_gradient(ref_logprobs)
        totals = None
        if micro_batches > 1:
            whole = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
            weights = spr_step_weights(
                whole(step_logits),
                whole(micro["step_mask"]),
                whole(micro["outcome"]),
                (DATA_AXIS,),
                config.spr_agreement_filter,
            )
            micro["spr_weights"] = weights.reshape(step_logits.shape)
            totals = Totals(token_count(batch["response_mask"]), weights.sum())

        def micro_loss(params, micro_batch):
            out = policy_forward(params, micro_batch)
            logprobs, entropies = scores(params, out.hidden, micro_batch["tokens"])
            weights = micro_batch.get("spr_weights")
            if weights is None:  # one micro-batch: the kept steps of this very forward
                weights = spr_step_weights(
                    out.step_logits,
                    micro_batch["step_mask"],
                    micro_batch["outcome"],
                    (DATA_AXIS,),
                    config.spr_agreement_filter,
                )
            return rl_loss(
                logprobs,
                entropies,
                out.step_logits,
                micro_batch["response_mask"],
                micro_batch["advantages"],
                micro_batch["ref_logprobs"],
                weights,
                micro_batch["outcome"],
                config,
                old_logprobs=micro_batch.get("old_logprobs"),
                totals=totals,
            )

        return _accumulate_gradients(micro_loss, params, micro, unroll_loops)

    return _make_step(
        module,
        algorithm,
        tx,
        mesh,
        replica_gradients,
        prepare,
        RL_BATCH_KEYS,
        config.micro_batch_size,
        (param_shardings(module, mesh),),
    )
