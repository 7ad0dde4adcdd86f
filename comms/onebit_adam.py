"""1-bit Adam (DeepSpeed) and QAdam (BAGUA): Adam whose momentum, not gradient, crosses the wire compressed.

Warm-up (the first `warmup_steps` steps): gradients are averaged in full precision and both moments update
as in `optax.adam` (same expressions, bias correction included), so a warm-up longer than the run is Adam.
Afterwards each replica folds its LOCAL gradient into the momentum, the momenta are averaged compressed
(1-bit with error feedback, or MinMaxUInt8 as ByteGrad; per parameter tensor, as DeepSpeed calls its compressed
all-reduce once per parameter), and the second moment stays frozen.

Choices at and after the freeze, where the references differ:
- Bias correction. DeepSpeed's OnebitAdam applies none (not even in warm-up); BAGUA's QAdam keeps dividing
  the frozen second moment by 1 - b2^t with the *current* t, which shrinks the denominator as t grows although
  the estimate no longer changes. We keep the momentum's correction 1 - b1^t (it still accumulates) and freeze
  the second moment's correction with the moment itself, at 1 - b2^warmup_steps: v_hat is then exactly the
  last warm-up estimate, and the step size is continuous across the freeze.
- eps is added outside the square root (both references, and optax).
- Weight decay is decoupled, as in `optax.adamw` and DeepSpeed (update += weight_decay * param, then times
  the learning rate); BAGUA's QAdam accepts but ignores it. It is skipped entirely when 0, so the warm-up
  equals `optax.adam` bit for bit.
- Error buffers start at zero at the freeze (DeepSpeed allocates them then) and persist afterwards.
- Entries whose second moment is still zero at the freeze (no gradient in any warm-up step, e.g. the embedding
  rows of tokens the warm-up never saw) keep a zero momentum. Their frozen step size is 1/eps, and a compressed
  momentum is never zero there (every 1-bit entry is +-scale), so they would jump by ~lr * scale / eps. DeepSpeed
  asks the user for this mask (`exp_avg_mask`); here it is read off the frozen moment.

The two phases are named "warmup" and "compressed" (`phase(update)`); the update takes the phase as an optax extra
argument (`tx.update(grads, state, params, phase=...)`) and then runs that phase alone. Without it, a `lax.cond`
on the count chooses at run time (see comms.api).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from comms.api import CommAlgorithm, PyTree, pmean, register
from comms.centralized import ErrorFeedback, bytegrad_allreduce, onebit_allreduce, zero_errors


class CompressedAdamState(NamedTuple):
    """Adam's moments plus the momentum exchange's state (error buffers for 1-bit, () for 8-bit)."""

    count: jax.Array  # [] int32, steps taken
    mu: PyTree
    nu: PyTree
    exchange: PyTree


@dataclasses.dataclass(frozen=True)
class _CompressedAdam(CommAlgorithm):
    """Shared by 1-bit Adam and QAdam; subclasses say how the momentum is averaged after the warm-up."""

    warmup_steps: int = 100

    def __post_init__(self):
        # The frozen second moment is the last warm-up estimate, so at least one warm-up step must exist.
        if self.warmup_steps < 1:
            raise ValueError(f"{self.name}: warmup_steps must be >= 1, got {self.warmup_steps}")

    def init_exchange(self, params: PyTree, num_replicas: int) -> PyTree:
        return ()

    def exchange_momentum(self, mu: PyTree, exchange: PyTree) -> tuple[PyTree, PyTree]:
        """Compressed average of one replica's momentum over `axis_name` (per leaf, as the gradients)."""
        raise NotImplementedError

    def reduce_gradients(self, grads, state, step, phase=None):
        return grads, state  # the optimizer communicates

    def phase(self, update: int) -> Literal["warmup", "compressed"]:
        return "warmup" if update < self.warmup_steps else "compressed"

    def optimizer(self, learning_rate, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
        steps = [self.scale_by_compressed_adam(b1, b2, eps)]
        if weight_decay:
            steps.append(optax.add_decayed_weights(weight_decay))
        steps.append(optax.scale_by_learning_rate(learning_rate))
        return optax.chain(*steps)

    def scale_by_compressed_adam(self, b1: float, b2: float, eps: float) -> optax.GradientTransformationExtraArgs:
        """Adam's direction m_hat / (sqrt(v_hat) + eps), with the communication described in the module doc."""
        axis_name, warmup_steps = self.axis_name, self.warmup_steps

        def init(params):
            return CompressedAdamState(
                count=jnp.zeros([], jnp.int32),
                mu=optax.tree.zeros_like(params),
                nu=optax.tree.zeros_like(params),
                exchange=self.init_exchange(params, jax.lax.axis_size(axis_name)),
            )

        def warmup(grads, state):
            grads = jax.tree.map(lambda g: pmean(g, axis_name), grads)
            mu = optax.tree.update_moment(grads, state.mu, b1, 1)
            nu = optax.tree.update_moment_per_elem_norm(grads, state.nu, b2, 2)
            return mu, nu, state.exchange

        def compressed(grads, state):
            mu = optax.tree.update_moment(grads, state.mu, b1, 1)  # local gradient
            mu, exchange = self.exchange_momentum(mu, state.exchange)
            mu = jax.tree.map(lambda m, v: jnp.where(v > 0, m, jnp.zeros_like(m)), mu, state.nu)
            return mu, state.nu, exchange

        phases = {"warmup": warmup, "compressed": compressed}

        def update(grads, state, params=None, *, phase=None, **unused_extra_args):
            del params
            if phase is None:
                mu, nu, exchange = jax.lax.cond(state.count < warmup_steps, warmup, compressed, grads, state)
            elif phase in phases:
                mu, nu, exchange = phases[phase](grads, state)
            else:
                names = " and ".join(map(repr, phases))
                raise ValueError(f"{self.name}: unknown phase {phase!r}; its phases are {names}")
            count = optax.safe_increment(state.count)
            mu_hat = optax.tree.bias_correction(mu, b1, count)
            nu_hat = optax.tree.bias_correction(nu, b2, jnp.minimum(count, warmup_steps))
            direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
            return direction, CompressedAdamState(count, mu, nu, exchange)

        return optax.GradientTransformationExtraArgs(init, update)


@register("onebit_adam")
@dataclasses.dataclass(frozen=True)
class OneBitAdam(_CompressedAdam):
    """DeepSpeed's 1-bit Adam: after the warm-up, momenta are averaged by 1-bit all-reduce with error feedback.

    The error buffers live in the optimizer state; `tx.init` must run inside the shard_map.
    """

    def init_exchange(self, params, num_replicas):
        return zero_errors(params, num_replicas)

    def exchange_momentum(self, mu, exchange: ErrorFeedback):
        return onebit_allreduce(mu, exchange, self.axis_name)


@register("qadam")
@dataclasses.dataclass(frozen=True)
class QAdam(_CompressedAdam):
    """BAGUA's QAdam: after the warm-up, momenta are averaged by ByteGrad (8-bit MinMax, no error feedback)."""

    def exchange_momentum(self, mu, exchange):
        return bytegrad_allreduce(mu, self.axis_name), exchange
