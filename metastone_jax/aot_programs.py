"""A run's programs, compiled ahead of time for a mesh: the SFT step, the RL step and the rollout sampler at the shapes
of a config, built by the library's own builders from abstract arguments (nothing is allocated), with the model's
FLOPs for each (6·N·tokens for a forward and backward pass, plus causal attention)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Collection, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from metastone_jax.config import Qwen2Config, RunConfig
from metastone_jax.models.reflective import ReflectiveModel, param_shardings
from metastone_jax.rollout import bucket, make_replica_sampler
from metastone_jax.sharding import DATA_AXIS
from metastone_jax.step import make_rl_step, make_sft_step
from metastone_jax.train_state import abstract_train_state, make_optimizer

PROGRAMS = ("sft_step", "rl_step", "sampler")


@dataclasses.dataclass
class Program:
    name: str  # sft_step, rl_step, sampler
    phase: Hashable  # the communication algorithm's phase compiled (None: it has one)
    compiled: jax.stages.Compiled
    # Where the program does not fit a chip: the temporaries the compiler said it needs (it then compiled without
    # that check, so that `compiled` still holds the program's collectives and costs).
    required_temporaries: int | None
    argument_bytes: dict[str, int]  # per chip, by what the arguments are: parameters, optimizer, comm_state, ...
    model_flops: float  # per step, all chips
    kernel_flops: float  # the part of model_flops in Pallas kernels (splash attention), which XLA does not count


def matmul_parameters(config: Qwen2Config) -> int:
    """Weights each token is multiplied by: the decoder layers, the LM head and the SPRM head (not the lookup)."""
    hidden, heads, kv_heads, head_dim = (
        config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
    )  # fmt: skip
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    layer = attention + 3 * hidden * config.intermediate_size
    return config.num_hidden_layers * layer + hidden * config.vocab_size + 2 * hidden * hidden + 2 * hidden


def dense_flops(config: Qwen2Config, tokens: int) -> float:
    """The matrix multiplications of one forward pass over `tokens` tokens."""
    return 2.0 * matmul_parameters(config) * tokens


def attention_flops(config: Qwen2Config, visible_pairs: int) -> float:
    """Scores and the weighted sum of values of one forward pass, over `visible_pairs` (query, key) pairs."""
    return 4.0 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * visible_pairs


def causal_pairs(length: int) -> int:
    return length * (length + 1) // 2


def build_programs(
    config: RunConfig, mesh, prompt_length: int, for_cost: bool = False, names: Collection[str] = PROGRAMS
) -> list[Program]:
    """The programs the run executes (SFT when sft.steps > 0; RL step and sampler when rl.steps > 0) of those
    `names`, built as the trainer builds them and compiled for `mesh` at the phase of each optimizer's last update;
    rows are `prompt_length` + sampling.max_new_tokens tokens. `for_cost` compiles a program without the loops that
    XLA's cost analysis would count once: the train steps' loops over micro-batches and logits chunks unrolled,
    matrix multiplications not split over their shards (`_NO_WINDOWED_EINSUM`); it does not stop at a program that
    needs more memory than a chip has."""
    architecture = config.model.qwen2_config()
    model, sft, rl = config.model, config.sft, config.rl
    dtype, param_dtype = jnp.dtype(model.dtype), jnp.dtype(model.param_dtype)
    module = ReflectiveModel(architecture, True, dtype, param_dtype, model.remat, model.scan_layers)
    algorithm = config.comm.build()
    constant = optax.constant_schedule
    prompt_length = bucket(prompt_length)
    seq = prompt_length + config.sampling.max_new_tokens
    rows = _sharded(mesh, P(DATA_AXIS))
    programs = []

    if sft.steps > 0 and "sft_step" in names:
        tx = make_optimizer(algorithm, constant(sft.learning_rate), head_learning_rate=constant(0.0))
        state = abstract_train_state(module, algorithm, tx, mesh)
        phase = algorithm.phase(sft.steps - 1)
        step = make_sft_step(
            module,
            algorithm,
            tx,
            mesh,
            micro_batch_size=sft.micro_batch_size,
            logits_chunk=model.logits_chunk,
            unroll_loops=for_cost,
        )
        batch = _batch(rows, sft.batch_size, seq, {"tokens": jnp.int32, "attention_mask": bool, "loss_mask": bool})
        compiled = _compile(lambda s, b: step(s, b, phase=phase), (state, batch), True, for_cost)
        # A forward and a backward pass (twice the forward's FLOPs).
        attention = 3 * attention_flops(architecture, sft.batch_size * causal_pairs(seq))
        flops = 3 * dense_flops(architecture, sft.batch_size * seq) + attention
        parts = {**_state_bytes(state), "batch": _bytes_per_chip(batch)}
        programs.append(Program("sft_step", phase, *compiled, parts, flops, attention))

    if rl.steps > 0:
        tx = make_optimizer(algorithm, constant(rl.learning_rate), head_learning_rate=constant(rl.head_learning_rate))
        state = abstract_train_state(module, algorithm, tx, mesh)

    if rl.steps > 0 and "rl_step" in names:
        phase = algorithm.phase(rl.steps - 1)
        temperature = config.sampling.temperature
        loops = {"logits_chunk": model.logits_chunk, "unroll_loops": for_cost}
        step = make_rl_step(module, algorithm, tx, mesh, rl, temperature, config.seed, **loops)
        size = rl.prompts_per_step * rl.group_size
        tokens = {"tokens": jnp.int32, "attention_mask": bool, "response_mask": bool, "step_mask": bool}
        batch = {
            **_batch(rows, size, seq, tokens),
            **_batch(rows, size, None, {"rewards": jnp.float32, "outcome": jnp.float32}),
        }
        reference = jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding),
            state.params,
            param_shardings(module, mesh),
        )
        args = (state, batch, reference)
        compiled = _compile(lambda s, b, r: step(s, b, r, phase=phase), args, True, for_cost)
        # The policy's forward and backward pass, and the reference policy's forward pass; with micro-batches and the
        # agreement filter also the policy's forward without gradient that finds the SPR class counts
        # (step.make_rl_step; without the filter the counts need no scores).
        forwards = 4 + (0 < rl.micro_batch_size < size and rl.spr_agreement_filter)
        attention = forwards * attention_flops(architecture, size * causal_pairs(seq))
        flops = forwards * dense_flops(architecture, size * seq) + attention
        parts = {**_state_bytes(state), "reference": _bytes_per_chip(reference), "batch": _bytes_per_chip(batch)}
        programs.append(Program("rl_step", phase, *compiled, parts, flops, attention))

    if rl.steps > 0 and "sampler" in names:
        eos = architecture.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos or 0,)
        sampler = make_replica_sampler(module, mesh, config.sampling, eos_ids, 0, rl.group_size, rl.rollout_batch_size)
        prompts = _batch(rows, rl.prompts_per_step, prompt_length, {"tokens": jnp.int32, "mask": bool})
        key = jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype, sharding=_sharded(mesh, P()))
        args = (state.params, prompts["tokens"], prompts["mask"], key)
        compiled = _compile(sampler, args, False, for_cost)
        # The prefill over the prompts (splash attention) and one decode step of every row, over the whole cache
        # (XLA counts the decode loop's body once, and the loop over rollout chunks once).
        chunk = rl.rollout_batch_size or rl.prompts_per_step
        prefill = attention_flops(architecture, chunk * causal_pairs(prompt_length))
        flops = dense_flops(architecture, chunk * (prompt_length + rl.group_size)) + prefill
        flops += attention_flops(architecture, chunk * rl.group_size * seq)
        parts = {"parameters": _bytes_per_chip(state.params), "batch": _bytes_per_chip(prompts)}
        programs.append(Program("sampler", None, *compiled, parts, flops, prefill))
    return programs


def _state_bytes(state) -> dict[str, int]:
    return {
        "parameters": _bytes_per_chip(state.params),
        "optimizer": _bytes_per_chip(state.opt_state),
        "comm_state": _bytes_per_chip(state.comm_state),
    }


def _compile(fn: Callable, args: tuple, donate: bool, for_cost: bool) -> tuple[jax.stages.Compiled, int | None]:
    """jit(fn) lowered with the abstract arguments (their shardings are the jit's) and compiled, and the temporaries
    it needs where they do not fit a chip. A train step donates its state, as the run's own jit does. `for_cost`:
    see `build_programs`."""
    lowered = jax.jit(fn, donate_argnums=0 if donate else ()).lower(*args)
    if for_cost:
        return lowered.compile(compiler_options={**_NO_OOM_CHECK, **_NO_WINDOWED_EINSUM}), None
    try:
        return lowered.compile(), None
    except jax.errors.JaxRuntimeError as e:
        needed = _OUT_OF_MEMORY.search(str(e))
        if needed is None:
            raise
    return lowered.compile(compiler_options=_NO_OOM_CHECK), int(float(needed.group(1)) * 2**30)


_NO_OOM_CHECK = {"xla_tpu_no_crash_on_oom": "true"}
# The TPU compiler splits a matrix multiplication whose operand it all-gathers (or whose result it reduce-scatters)
# into a loop over the shards that overlaps the transfers ("windowed einsum"). Its cost analysis counts that loop's
# body once; without the split, the same multiplications and transfers are counted whole.
_NO_WINDOWED_EINSUM = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": "false",
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": "false",
}


# The TPU compiler's words for a program that does not fit (sizes in GiB).
_OUT_OF_MEMORY = re.compile(r"memory required for HLO temporaries \(([\d.]+)G\) exceeds available HBM")


def _sharded(mesh, spec) -> NamedSharding:
    return NamedSharding(mesh, spec)


def _batch(sharding, rows: int, length: int | None, dtypes: dict[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (rows,) if length is None else (rows, length)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for name, dtype in dtypes.items()}


def _bytes_per_chip(tree) -> int:
    """Bytes one chip holds of the abstract arrays in `tree` (the largest shard where they are uneven)."""

    def shard(leaf):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        return jnp.dtype(leaf.dtype).itemsize * math.prod(shape)

    return sum(shard(leaf) for leaf in jax.tree.leaves(tree))
