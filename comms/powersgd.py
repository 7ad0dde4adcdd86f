"""PowerSGD (Vogels et al. 2019): rank-r gradient compression by one power-iteration step, with error feedback.

For every matrix-shaped gradient leaf, M = this replica's gradient + its error from the last step, and Q the
warm-started right factor (the same on every replica, orthogonalised first):

    P = M·Q;  all-reduce P (sum);  orthogonalise P (Gram-Schmidt);  Q = Mᵀ·P;  all-reduce Q (mean);  M̂ = P·Qᵀ

M̂ is the averaged gradient every replica hands its optimizer (the same on all, so replicas stay bit-identical),
e = M − M̂ stays with the replica and Q is kept for the next step. As in torch's DDP hook
(torch/distributed/algorithms/ddp_comm_hooks/powerSGD_hook.py): Q starts as a standard normal draw, a leaf is
compressed only when (rows + cols)·rank·min_compression_rate < rows·cols, the rank is capped at min(rows, cols),
and the first `start_step` updates all-reduce in full precision. Leaves sent uncompressed (vectors, tiny matrices)
ride in the same all-reduce as the Ps, so a step costs two collectives. Differences from torch: those leaves keep
no error (torch's is their deviation from the mean, which averages out to zero); a zero column is left zero where
torch's Gram-Schmidt divides by its zero norm, and a column of Q that comes out zero keeps its previous value so
that the warm start does not stay at zero; Gram-Schmidt at every rank where torch switches to QR above rank 2
(both give the same column space, so the same M̂).

Matrix view of a leaf: [prod(shape[:k]), prod(shape[k:])] at the split k that makes it closest to square (the
largest min(rows, cols), the first such k), which is the leaf itself for a 2-D kernel, puts heads together with
their feature axis for attention kernels such as [embed, heads, head_dim], and for layers stacked on axis 0
([layers, in, out]) gives the joint matrix [layers·in, out], whose factor Q is shared by the layers.

Phases "full" and "compressed" (`phase(update)`); without a phase a `lax.cond` on the state's count chooses.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from comms.api import CommAlgorithm, PyTree, pmean, psum, register
from comms.centralized import exchange_concatenated

FULL, COMPRESSED = "full", "compressed"


class PowerSGDState(NamedTuple):
    count: jax.Array  # [] int32, updates taken since init
    error: PyTree  # like the gradients: M − M̂ of this replica (zero for leaves sent uncompressed)
    q: tuple  # per compressed leaf, in flatten order: the warm-started Q [cols, rank], before orthogonalisation


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(rows, cols) of the closest-to-square split of `shape` (see the module doc); None below two dimensions."""
    if len(shape) < 2:
        return None
    splits = [(math.prod(shape[:k]), math.prod(shape[k:])) for k in range(1, len(shape))]
    return max(splits, key=min)


def orthogonalize(matrix: jax.Array) -> jax.Array:
    """Gram-Schmidt over the columns of [rows, rank], in column order; a zero column stays zero."""
    columns = [matrix[:, i] for i in range(matrix.shape[1])]
    for i in range(len(columns)):
        norm = jnp.linalg.norm(columns[i])
        columns[i] = jnp.where(norm > 0, columns[i] / norm, 0)
        for j in range(i + 1, len(columns)):
            columns[j] = columns[j] - jnp.sum(columns[i] * columns[j]) * columns[i]
    return jnp.stack(columns, axis=1)


@register("powersgd")
@dataclasses.dataclass(frozen=True)
class PowerSGD(CommAlgorithm):
    """Rank-`rank` PowerSGD with error feedback and warm start; full-precision all-reduce before `start_step`."""

    rank: int = 1
    start_step: int = 0
    min_compression_rate: float = 2.0
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"powersgd: rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.start_step, int) or self.start_step < 0:
            raise ValueError(f"powersgd: start_step must be an integer >= 0, got {self.start_step!r}")
        if not self.min_compression_rate > 0:
            raise ValueError(f"powersgd: min_compression_rate must be > 0, got {self.min_compression_rate!r}")

    def compressed_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """(rows, cols, rank) of a leaf of `shape` that is compressed, None for one sent in full precision."""
        view = matrix_view(shape)
        if view is None:
            return None
        rows, cols = view
        rank = min(rows, cols, self.rank)
        return (rows, cols, rank) if (rows + cols) * rank * self.min_compression_rate < rows * cols else None

    def phase(self, update: int) -> str:
        return FULL if update < self.start_step else COMPRESSED

    def init(self, params: PyTree) -> PowerSGDState:
        key, q = jax.random.key(self.seed), []
        for i, x in enumerate(jax.tree.leaves(params)):
            shape = self.compressed_shape(x.shape)
            if shape is not None:
                _, cols, rank = shape
                q.append(jax.random.normal(jax.random.fold_in(key, i), (cols, rank), x.dtype))
        return PowerSGDState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params), tuple(q))

    def reduce_gradients(self, grads, state, step, phase=None):
        full = state.count < self.start_step
        state = state._replace(count=state.count + 1)
        if phase is None:
            return jax.lax.cond(full, self._full, self._compressed, grads, state)
        if phase == FULL:
            return self._full(grads, state)
        if phase == COMPRESSED:
            return self._compressed(grads, state)
        raise ValueError(f"powersgd: unknown phase {phase!r}; its phases are {FULL!r} and {COMPRESSED!r}")

    def _full(self, grads: PyTree, state: PowerSGDState) -> tuple[PyTree, PowerSGDState]:
        return jax.tree.map(lambda g: pmean(g, self.axis_name), grads), state

    def _compressed(self, grads: PyTree, state: PowerSGDState) -> tuple[PyTree, PowerSGDState]:
        num_replicas = jax.lax.axis_size(self.axis_name)
        leaves, treedef = jax.tree.flatten(grads)
        errors = treedef.flatten_up_to(state.error)
        shapes = [self.compressed_shape(g.shape) for g in leaves]
        compressed = [i for i, shape in enumerate(shapes) if shape is not None]
        uncompressed = [i for i, shape in enumerate(shapes) if shape is None]

        def all_reduce(parts):
            return exchange_concatenated([p.reshape(-1) for p in parts], lambda x: psum(x, self.axis_name))

        matrices = [(leaves[i] + errors[i]).reshape(shapes[i][:2]) for i in compressed]
        ps = [m @ orthogonalize(q) for m, q in zip(matrices, state.q)]
        summed = all_reduce([*ps, *(leaves[i] for i in uncompressed)])
        ps = [orthogonalize(s.reshape(p.shape)) for s, p in zip(summed, ps)]
        means = [s / num_replicas for s in summed[len(ps) :]]
        qs = [m.T @ p for m, p in zip(matrices, ps)]
        qs = [s.reshape(q.shape) / num_replicas for s, q in zip(all_reduce(qs), qs)] if qs else []
        approximations = [p @ q.T for p, q in zip(ps, qs)]
        # A zero gradient (on every replica) gives zero columns; warm-starting from them would keep P = M Q zero
        # for good, so such a column keeps its previous value. (The select also types the new Q, the same on every
        # replica, as per replica like the state it came from, as the run-time switch's other branch needs.)
        qs = [jnp.where(jnp.any(new != 0, axis=0), new, old) for new, old in zip(qs, state.q)]

        out, new_errors = list(leaves), list(errors)
        for i, m, approximation in zip(compressed, matrices, approximations):
            out[i] = approximation.reshape(leaves[i].shape).astype(leaves[i].dtype)
            new_errors[i] = (m - approximation).reshape(leaves[i].shape)
        for i, mean in zip(uncompressed, means):
            out[i] = mean.reshape(leaves[i].shape).astype(leaves[i].dtype)
        new_state = PowerSGDState(state.count, jax.tree.unflatten(treedef, new_errors), tuple(qs))
        return jax.tree.unflatten(treedef, out), new_state
