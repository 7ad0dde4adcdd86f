"""From text to train batches: SFT batches of reference solutions, and RL batches of sampled, rewarded rollouts.

Host side (tokenizing, verifying answers) meets device side (sampling per replica inside a shard_map over `data`).
Lengths are rounded up to a multiple of `LENGTH_BUCKET` so that a run compiles each step only a few times; the RL
step's batch is cut to the columns its rollouts use, rounded up to a quarter octave (`trained_width`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import comms
from metastone_jax.config import SamplingConfig
from metastone_jax.data import TextTokenizer, pad_batch, rewards
from metastone_jax.models.reflective import ReflectiveModel
from metastone_jax.sampling import SampleOutput, sample, trajectory_scores
from metastone_jax.sharding import DATA_AXIS, logical_rules, to_device, to_host

LENGTH_BUCKET = 32


def bucket(length: int) -> int:
    return -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


def trained_width(used: int, full: int) -> int:
    """`used` columns rounded up to a multiple of a quarter of the power of two below it (at least 16), at most
    `full`: at most 25% padding, and no more than four widths, so four compilations, per doubling of the length."""
    step = max(16, 2 ** (used.bit_length() - 1) // 4)
    return min(-(-used // step) * step, full)


def trim_unused_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The RL batch without the columns that no row attends to, then padded back to `trained_width` columns.

    Prompts are left-padded and responses padded to `max_new_tokens`, so the columns before the longest prompt
    and after the longest response hold pads alone; cutting them changes no token's logits (pads are masked,
    rotary positions count real tokens) and only shrinks the step. Every [B, T] entry is cut alike.
    """
    used = batch["attention_mask"].any(axis=0)
    full = used.shape[0]
    first, end = int(np.argmax(used)), full - int(np.argmax(used[::-1]))
    width = trained_width(end - first, full)
    start = max(end - width, 0)  # widen towards the left: the extra columns are prompt padding
    return {k: v[:, start : start + width] if v.ndim == 2 else v for k, v in batch.items()}


def encode_prompts(
    tokenizer: TextTokenizer, questions: Sequence[str], instruction: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt ids and mask [B, P] (P bucketed) of the questions in the tokenizer's prompt format."""
    encoded = [tokenizer.encode(tokenizer.prompt_format.render(q, instruction)) for q in questions]
    return pad_batch(encoded, tokenizer.pad_id, length=bucket(max(map(len, encoded))), side="left")


def sft_batch(
    tokenizer: TextTokenizer, questions: Sequence[str], solutions: Sequence[str], instruction: str | None = None
) -> dict[str, np.ndarray]:
    """tokens / attention_mask / loss_mask [B, T]: prompt then reference solution + EOS; the loss sees the solution."""
    prompts = [tokenizer.encode(tokenizer.prompt_format.render(q, instruction)) for q in questions]
    responses = [tokenizer.encode(s) + [tokenizer.eos_id] for s in solutions]
    length = bucket(max(len(p) + len(r) for p, r in zip(prompts, responses)))
    tokens, mask = pad_batch([p + r for p, r in zip(prompts, responses)], tokenizer.pad_id, length=length, side="left")
    loss_mask = np.zeros_like(mask)
    for row, response in enumerate(responses):
        loss_mask[row, length - len(response) :] = True
    return {"tokens": tokens, "attention_mask": mask, "loss_mask": loss_mask}


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """A sampled RL batch with everything the RL step and the metrics need (rows grouped by prompt)."""

    batch: dict[str, np.ndarray]  # the RL step's batch
    responses: list[str]
    trajectory_scores: np.ndarray  # [rows] SPRM geometric means
    generated_tokens: int


def make_replica_sampler(
    module: ReflectiveModel,
    mesh,
    config: SamplingConfig,
    eos_ids,
    pad_id: int,
    group_size: int,
    rollout_batch_size: int = 0,
):
    """jit(shard_map): every replica samples `group_size` responses to its slice of the prompts with its own params,
    `rollout_batch_size` prompts of the batch at a time (0: all), so that one chunk's KV cache is alive at a time.

    Prompt p of the batch draws from fold_in(key, p) (`sampling.sample` with a key per prompt), and each replica
    chunks its own slice: the samples are those of one call, whatever the chunking. Replicas' parameters may
    differ (decentralized algorithms).
    """
    rules = logical_rules(manual_axes=(DATA_AXIS,))
    num_replicas = mesh.shape[DATA_AXIS]

    def per_replica(params, prompt_tokens, prompt_mask, key, chunks):
        prompts = prompt_tokens.shape[0]
        first_prompt = jax.lax.axis_index(DATA_AXIS) * prompts
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, first_prompt + jnp.arange(prompts))

        def sample_chunk(chunk):
            with nn.logical_axis_rules(rules):
                return sample(
                    module,
                    comms.strip_replica_dim(params),
                    *chunk,
                    config=config,
                    eos_ids=tuple(eos_ids),
                    pad_id=pad_id,
                    num_samples=group_size,
                )

        in_chunks = jax.tree.map(lambda x: x.reshape(chunks, -1, *x.shape[1:]), (prompt_tokens, prompt_mask, keys))
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), jax.lax.map(sample_chunk, in_chunks))

    @functools.cache
    def sampler(chunks):
        return jax.jit(
            jax.shard_map(
                functools.partial(per_replica, chunks=chunks),
                mesh=mesh,
                in_specs=(P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS), P()),
                out_specs=P(DATA_AXIS),
                axis_names={DATA_AXIS},
            )
        )

    rows = NamedSharding(mesh, P(DATA_AXIS))

    def checked(params, prompt_tokens, prompt_mask, key):
        prompts = prompt_tokens.shape[0]
        per_call = rollout_batch_size or prompts
        if prompts % per_call or per_call % num_replicas:
            raise ValueError(
                f"rollout_batch_size={per_call} must divide the {prompts} prompts and be a multiple of the "
                f"{num_replicas} replicas of the `data` axis"
            )
        return sampler(prompts // per_call)(params, to_device(prompt_tokens, rows), to_device(prompt_mask, rows), key)

    return checked


def collect_rollouts(
    sampler,
    params: Any,
    tokenizer: TextTokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    key: jax.Array,
    group_size: int,
    instruction: str | None = None,
) -> Rollouts:
    """Samples, decodes and verifies G responses per question; builds the RL step's batch."""
    prompt_tokens, prompt_mask = encode_prompts(tokenizer, questions, instruction)
    out: SampleOutput = sampler(params, prompt_tokens, prompt_mask, key)
    think_ids = tuple(tokenizer.think_ids) if tokenizer.think_ids else None
    step_mask, scores = score_trajectories(out, tuple(tokenizer.delimiter_ids), think_ids)
    sequences, response_mask = to_host(out.sequences), to_host(out.response_mask)
    responses = [tokenizer.decode(seq[m]) for seq, m in zip(sequences, response_mask)]
    # The SPRM's scores are still being computed on the device while the host checks the answers.
    outcome = rewards(responses, [answers[row // group_size] for row in range(len(responses))])
    batch = {
        "tokens": sequences,
        "attention_mask": to_host(out.prompt_mask) | response_mask,
        "response_mask": response_mask,
        "rewards": outcome,
        "outcome": outcome,
        "step_mask": to_host(step_mask),
    }
    batch = trim_unused_columns(batch)
    return Rollouts(batch, responses, to_host(scores), int(to_host(out.lengths).sum()))


# Delimiter and think ids are static: they select which comparisons the mask is built from.
score_trajectories = jax.jit(trajectory_scores, static_argnums=(1, 2))


@functools.partial(jax.jit, static_argnums=1)
def replica_params(state_params: Any, replica: int = 0) -> Any:
    """One replica's parameters (no replica dimension), e.g. the frozen reference policy or the model to evaluate.
    One program for the whole tree: indexed leaf by leaf, every leaf's shape would compile (or load) its own."""
    return jax.tree.map(lambda x: x[replica], state_params)
