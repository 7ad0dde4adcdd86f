"""Local SGD / periodic model averaging: replicas step on their own gradients and average parameters every H steps.

BAGUA's asynchronous model averaging runs the averaging in a background thread, which one SPMD program cannot
do; this is its synchronous stand-in ("communication delay" relaxation): one parameter all-reduce per `period`
steps instead of one gradient all-reduce per step. Optimizer state stays local, as in BAGUA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import ClassVar

import jax

from comms.api import CommAlgorithm, PyTree, pmean, register


@register("local_sgd")
@dataclasses.dataclass(frozen=True)
class LocalSGD(CommAlgorithm):
    """No gradient exchange; parameters are averaged over the replicas after steps period-1, 2*period-1, ..."""

    centralized: ClassVar[bool] = False

    period: int = 4

    def __post_init__(self):
        if not isinstance(self.period, int) or self.period < 1:
            raise ValueError(
                f"local_sgd period must be a positive integer (steps between averagings), got {self.period!r}"
            )

    def reduce_gradients(
        self, grads: PyTree, state: PyTree, step: jax.Array, phase: Hashable = None
    ) -> tuple[PyTree, PyTree]:
        return grads, state

    def sync_parameters(
        self, params: PyTree, state: PyTree, step: jax.Array, phase: Hashable = None
    ) -> tuple[PyTree, PyTree]:
        """pmean of the parameters when (step + 1) % period == 0; the all-reduce runs only on those steps."""

        def average(tree):
            # pmean's result is replica-invariant; the cond's other branch is per-replica, so mark it varying.
            return jax.tree.map(lambda x: jax.lax.pcast(pmean(x, self.axis_name), self.axis_name, to="varying"), tree)

        return jax.lax.cond((step + 1) % self.period == 0, average, lambda tree: tree, params), state
