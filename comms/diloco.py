"""DiLoCo (Douillard et al. 2023) and Streaming DiLoCo (Douillard et al. 2025): rare, compressible syncs.

Each replica takes `inner_steps` (H) steps of its own optimizer (AdamW; its state is kept across rounds), then the
replicas average their pseudo-gradients Δ = θ_anchor − θ_replica and an outer SGD with Nesterov momentum moves the
shared anchor, from which every replica continues:

    m = μ·m + mean(Δ);   θ_anchor −= lr·(mean(Δ) + μ·m);   θ_replica = θ_anchor      (lr 0.7, μ 0.9 by default)

Compression (`int8`: MinMaxUInt8 per block, `int4`: symmetric 4-bit per block, `onebit`: sign and L2 scale per
block; blocks of `block_size` values) applies to Δ with error feedback held per replica: what a replica's payload
did not carry is added to its next Δ of the same fragment. Compressed payloads travel as uint8 in one all-gather
(headers appended as bytes) and every replica decodes all of them and sums in replica order, so anchors stay
bit-identical and each residual stays with the replica that made it. An all-gather moves (n-1)x the payload to
each replica where the two-phase scatter-gather of comms.centralized moves 2(n-1)/n x, and it takes one round trip
instead of two and adds no second quantization at a server; for the few, distant replicas DiLoCo is for, and one
sync per H steps, that is the better trade. `none` averages Δ in full precision with one all-reduce.

Fragments (streaming): with `fragments` F, fragment f is row f, f+F, f+2F, ... of the leading axis of every leaf
(a 0-d leaf is one row, in fragment 0). For a model whose layers are stacked on axis 0 (nn.scan) those rows are
its layers, strided as in Streaming DiLoCo; for other leaves they are rows of the matrix. Fragment f is
synchronised after the updates u (0-based) with (u + 1 − W) mod H == f·H/F (W the warm-up below, 0 by default),
so each sync moves ~1/F of the model and every fragment still sees H inner steps between its syncs (its first
round is f·H/F steps). Each fragment has its own outer momentum and error rows, as they are rows of full-size
buffers.

Warm-up (`warmup_steps` W, default 0): the first W updates average the gradients in full precision, as pmean does,
so the replicas stay identical and the anchor follows them; the rounds then start from the warmed-up model. The
DiLoCo paper's runs start from a checkpoint trained synchronously (24k of 88k steps), and post-local SGD (Lin et
al. 2020) makes the same split: replicas that drift apart from a fresh initialisation average into a model that
keeps little of their progress, while the same drift later in training averages well (BENCHMARKS.md measures it).

The phases are "warmup", "inner" and "sync0" ... "sync{F-1}" (`phase(update)`); the train loop compiles one step
per phase, so an inner step holds no communication at all. Without a phase, a `lax.switch` on the state's count chooses.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Hashable
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from comms import compress
from comms.api import CommAlgorithm, PyTree, pmean, register
from comms.centralized import exchange_concatenated, move_with_headers, sum_rows


class Codec(NamedTuple):
    """Block compression along the last axis: encode [blocks, B] -> (uint8 payload, float header); decode back."""

    encode: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
    decode: Callable[[jax.Array, jax.Array], jax.Array]


CODECS = {
    "int8": Codec(compress.minmax_uint8_compress, compress.minmax_uint8_decompress),
    "int4": Codec(compress.int4_compress, compress.int4_decompress),
    "onebit": Codec(lambda x: compress.onebit_compress(x)[:2], compress.onebit_decompress),
}
COMPRESSIONS = ("none", *CODECS)
INNER = "inner"
WARMUP = "warmup"


class DiLoCoState(NamedTuple):
    """One replica's DiLoCo state; every leaf but `count` mirrors the parameters."""

    count: jax.Array  # [] int32, updates taken since init
    anchor: PyTree  # θ_anchor after the last sync of each fragment, the same on every replica
    momentum: PyTree  # the outer Nesterov momentum m
    error: PyTree  # what compression has not sent yet (this replica's); () without compression


def _rows(x: jax.Array) -> jax.Array:
    """The leaf with a leading axis to stride over (a 0-d leaf is one row)."""
    return x if x.ndim else x[None]


def fragment_rows(x: jax.Array, fragment: int, fragments: int) -> jax.Array:
    """Rows fragment, fragment + F, ... of the leading axis of `x`: its part in `fragment`."""
    return _rows(x)[fragment::fragments]


def _with_fragment_rows(x: jax.Array, rows: jax.Array, fragment: int, fragments: int) -> jax.Array:
    return _rows(x).at[fragment::fragments].set(rows).reshape(x.shape)


@register("diloco")
@dataclasses.dataclass(frozen=True)
class DiLoCo(CommAlgorithm):
    """H local optimizer steps, then an outer Nesterov step on the averaged (compressed) pseudo-gradient."""

    centralized: ClassVar[bool] = False

    inner_steps: int = 20
    outer_learning_rate: float = 0.7
    outer_momentum: float = 0.9
    compression: str = "none"
    fragments: int = 1
    block_size: int = 256
    warmup_steps: int = 0

    def __post_init__(self):
        if not isinstance(self.inner_steps, int) or self.inner_steps < 1:
            raise ValueError(f"diloco: inner_steps must be an integer >= 1, got {self.inner_steps!r}")
        if not isinstance(self.fragments, int) or self.fragments < 1 or self.inner_steps % self.fragments:
            raise ValueError(
                f"diloco: fragments must be a positive integer that divides inner_steps={self.inner_steps} "
                f"(fragments sync every inner_steps/fragments steps in turn), got {self.fragments!r}"
            )
        if self.compression not in COMPRESSIONS:
            raise ValueError(
                f"diloco: unknown compression {self.compression!r}; choose one of: {', '.join(COMPRESSIONS)}"
            )
        if not self.outer_learning_rate > 0:
            raise ValueError(f"diloco: outer_learning_rate must be > 0, got {self.outer_learning_rate!r}")
        if not 0 <= self.outer_momentum < 1:
            raise ValueError(f"diloco: outer_momentum must be in [0, 1), got {self.outer_momentum!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"diloco: warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.block_size, int) or self.block_size < 8 or self.block_size % 8:
            raise ValueError(f"diloco: block_size must be a positive multiple of 8, got {self.block_size!r}")

    @property
    def _stride(self) -> int:
        return self.inner_steps // self.fragments

    def phase(self, update: int) -> Hashable:
        if update < self.warmup_steps:
            return WARMUP
        taken = update - self.warmup_steps + 1
        if taken % self._stride:
            return INNER
        return f"sync{(taken % self.inner_steps) // self._stride}"

    def init(self, params: PyTree) -> DiLoCoState:
        """Anchor = the replica's parameters, zero momentum and errors. Every fragment must hold part of every
        matrix, so `fragments` may not exceed the leading axis of any leaf of two or more dimensions."""
        leading = [
            (x.shape[0], jax.tree_util.keystr(path))
            for path, x in jax.tree_util.tree_leaves_with_path(params)
            if x.ndim >= 2
        ]
        rows, name = min(leading, default=(self.fragments, None))
        if self.fragments > rows:
            raise ValueError(
                f"diloco: fragments={self.fragments} is more than the {rows} rows of the leading axis of parameter "
                f"{name} (its layers, when a model stacks them on axis 0), so fragment {rows} would hold none of it; "
                f"use fragments <= {rows}"
            )
        zeros = jax.tree.map(jnp.zeros_like, params)
        error = zeros if self.compression != "none" else ()
        return DiLoCoState(jnp.zeros([], jnp.int32), params, zeros, error)

    def reduce_gradients(self, grads, state, step, phase=None):
        """Warm-up updates average the gradients in full precision, as pmean; after it inner steps are local."""
        if not self.warmup_steps or phase not in (None, WARMUP):
            return grads, state

        def mean(tree):
            leaves, treedef = jax.tree.flatten(tree)
            return jax.tree.unflatten(treedef, self._mean(leaves))

        if phase == WARMUP:
            return mean(grads), state
        # Typed as varying over the replicas, as the local gradients of the other branch are.
        varying_mean = lambda tree: jax.lax.pcast(mean(tree), self.axis_name, to="varying")  # noqa: E731
        return jax.lax.cond(state.count < self.warmup_steps, varying_mean, lambda tree: tree, grads), state

    def sync_parameters(self, params, state, step, phase=None):
        """Outer step of the fragment this update synchronises (none on inner steps)."""
        state = state._replace(count=state.count + 1)
        # During the warm-up every replica holds the same parameters; the anchor follows them.
        branches = [lambda p, s: (p, s), lambda p, s: (p, s._replace(anchor=p))] + [
            lambda p, s, f=f: self._sync_fragment(p, s, f) for f in range(self.fragments)
        ]
        if phase is None:
            taken = state.count - self.warmup_steps
            index = jnp.where(taken % self._stride == 0, (taken % self.inner_steps) // self._stride + 2, 0)
            return jax.lax.switch(jnp.where(taken <= 0, 1, index), branches, params, state)
        if phase == INNER:
            return params, state
        if phase == WARMUP:
            return branches[1](params, state)
        if not (isinstance(phase, str) and phase.startswith("sync") and phase[4:].isdigit()):
            raise ValueError(
                f"diloco: unknown phase {phase!r}; its phases are 'warmup', 'inner' and 'sync0'..'sync{{F-1}}'"
            )
        return branches[2 + int(phase[4:])](params, state)

    def _sync_fragment(self, params: PyTree, state: DiLoCoState, fragment: int) -> tuple[PyTree, DiLoCoState]:
        leaves, treedef = jax.tree.flatten(params)
        anchor, momentum = treedef.flatten_up_to(state.anchor), treedef.flatten_up_to(state.momentum)
        error = treedef.flatten_up_to(state.error) if self.compression != "none" else None
        # Leaves with no rows in this fragment (a 0-d or short leaf) take no part in its sync.
        members = [i for i, x in enumerate(leaves) if fragment_rows(x, fragment, self.fragments).size]

        def rows(tree_leaves):
            return [fragment_rows(tree_leaves[i], fragment, self.fragments) for i in members]

        delta = [a - x for a, x in zip(rows(anchor), rows(leaves))]
        if error is None:
            mean = self._mean(delta)
        else:
            mean, residuals = self._compressed_mean([d + e for d, e in zip(delta, rows(error))])
        new_momentum = [self.outer_momentum * m + g for m, g in zip(rows(momentum), mean)]
        new_anchor = [
            a - self.outer_learning_rate * (g + self.outer_momentum * m)
            for a, g, m in zip(rows(anchor), mean, new_momentum)
        ]

        def put(tree_leaves, new_rows):
            tree_leaves = list(tree_leaves)
            for i, value in zip(members, new_rows):
                tree_leaves[i] = _with_fragment_rows(tree_leaves[i], value, fragment, self.fragments)
            return jax.tree.unflatten(treedef, tree_leaves)

        new_state = DiLoCoState(
            state.count,
            put(anchor, new_anchor),
            put(momentum, new_momentum),
            put(error, residuals) if error is not None else (),
        )
        return put(leaves, new_anchor), new_state

    def _mean(self, pieces: list[jax.Array]) -> list[jax.Array]:
        """Full-precision average over the replicas, all pieces in one all-reduce."""
        flat = exchange_concatenated([p.reshape(-1) for p in pieces], lambda x: pmean(x, self.axis_name))
        return [f.reshape(p.shape) for f, p in zip(flat, pieces)]

    def _compressed_mean(self, pieces: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
        """(average over the replicas of every replica's decoded payload, this replica's residuals).

        Each piece is padded to whole blocks on its own (a block never mixes two leaves), and all blocks are coded
        as one array, so the program holds one encoder and one decoder whatever the number of leaves.
        """
        codec = CODECS[self.compression]
        num_replicas = jax.lax.axis_size(self.axis_name)
        padded = [compress.pad_to_multiple(p.reshape(-1), self.block_size) for p in pieces]
        blocks = jnp.concatenate(padded).reshape(-1, self.block_size)
        payload, header = codec.encode(blocks)
        (gathered_payload,), (gathered_header,) = move_with_headers(
            [payload.reshape(-1)], [header.reshape(-1)], lambda x: jax.lax.all_gather(x, self.axis_name)
        )
        decoded = codec.decode(
            gathered_payload.reshape(num_replicas, *payload.shape), gathered_header.reshape(num_replicas, *header.shape)
        )
        mean = sum_rows(decoded) / num_replicas
        residual = blocks - codec.decode(payload, header)

        def unblock(values):
            ends = list(itertools.accumulate(p.size for p in padded))
            parts = jnp.split(values.reshape(-1), ends[:-1])
            return [part[: piece.size].reshape(piece.shape) for part, piece in zip(parts, pieces)]

        return unblock(mean), unblock(residual)
