"""Decentralized SGD: each replica steps on its own gradient and averages parameters with a few peers only.

`decentralized` follows BAGUA's full-precision decentralized algorithm, x_{t+1} = mix(x_t) - lr * g(x_t):
BAGUA sends the weights x_t to the peers in the forward pre-hook, while the gradient g(x_t) is computed, and
copies the peer average back into the model before `optimizer.step()`. Here the same happens in
`mix_parameters`, which runs before the optimizer, so the optimizer applies g(x_t) to mix(x_t) and the exchange
does not depend on the backward pass (the compiler may overlap them).

`low_precision_decentralized` follows BAGUA's low-precision decentralized algorithm, which communicates after
the optimizer step (its post-optimizer-step hook) and sends only MinMaxUInt8-compressed differences on a ring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import ClassVar

import jax
import jax.numpy as jnp

from comms import compress
from comms.api import CommAlgorithm, PyTree, pmean, register

PEER_MODES = ("all", "shift_one", "ring")


def shift_one_peer(rank: int, step: int, num_replicas: int) -> int:
    """BAGUA's `shift_one` partner of `rank` at `step`: the first half pairs with the second, shifting each round."""
    half = num_replicas // 2
    if rank < half:
        return (step + rank) % ((num_replicas + 1) // 2) + half
    return (rank - half - step) % half


def ring_permutations(num_replicas: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(source, destination) pairs that deliver every replica the value of its left and of its right neighbour."""
    from_left = [(rank, (rank + 1) % num_replicas) for rank in range(num_replicas)]
    from_right = [(rank, (rank - 1) % num_replicas) for rank in range(num_replicas)]
    return from_left, from_right


def _ring_neighbours(tree: PyTree, axis_name: str) -> tuple[PyTree, PyTree]:
    """Each replica's (left neighbour's, right neighbour's) copy of `tree`; with two replicas they are one peer."""
    num_replicas = jax.lax.axis_size(axis_name)
    from_left, from_right = ring_permutations(num_replicas)
    left = jax.lax.ppermute(tree, axis_name, from_left)
    # With two replicas left and right are the same peer: receive its value once instead of twice.
    right = left if num_replicas == 2 else jax.lax.ppermute(tree, axis_name, from_right)
    return left, right


def _ring_average(x: jax.Array, left: jax.Array, right: jax.Array) -> jax.Array:
    """W = (1/3, 1/3, 1/3) with weights that sum to exactly 1 in x's dtype.

    x / 3 compiles to x * float(1/3), and 3 * float32(1/3) > 1 would scale the replica average up a little every
    step; giving the self weight the remainder keeps W doubly stochastic, so rounding does not drift.
    """
    neighbour = jnp.asarray(1.0 / 3.0, x.dtype)
    own = 1 - 2 * neighbour
    return x * own + left * neighbour + right * neighbour


@register("decentralized")
@dataclasses.dataclass(frozen=True)
class Decentralized(CommAlgorithm):
    """Local gradients, then parameter gossip: `all` (average of all), `shift_one` (pairwise), `ring` (1/3 each)."""

    centralized: ClassVar[bool] = False

    peer_mode: str = "all"

    def __post_init__(self):
        if self.peer_mode not in PEER_MODES:
            raise ValueError(
                f"decentralized peer_mode {self.peer_mode!r} is unknown; choose one of: {', '.join(PEER_MODES)}"
            )

    def reduce_gradients(
        self, grads: PyTree, state: PyTree, step: jax.Array, phase: Hashable = None
    ) -> tuple[PyTree, PyTree]:
        return grads, state

    def mix_parameters(
        self, params: PyTree, state: PyTree, step: jax.Array, phase: Hashable = None
    ) -> tuple[PyTree, PyTree]:
        """mix(x_t): the peer average of the parameters the gradient was computed at."""
        if self.peer_mode == "all":
            return jax.tree.map(lambda x: pmean(x, self.axis_name), params), state
        if self.peer_mode == "ring":
            left, right = _ring_neighbours(params, self.axis_name)
            return jax.tree.map(_ring_average, params, left, right), state
        return self._shift_one_average(params, step), state

    def _shift_one_average(self, params: PyTree, step: jax.Array) -> PyTree:
        num_replicas = jax.lax.axis_size(self.axis_name)
        if num_replicas % 2:
            raise ValueError(
                f"decentralized peer_mode 'shift_one' needs an even number of replicas, got {num_replicas}"
            )
        # The pairing repeats every num_replicas/2 rounds; ppermute needs a static permutation, so build one per
        # round and let the step pick it.
        rounds = num_replicas // 2

        def exchange(round_index):
            perm = [(rank, shift_one_peer(rank, round_index, num_replicas)) for rank in range(num_replicas)]
            return lambda tree: jax.lax.ppermute(tree, self.axis_name, perm)

        peer = jax.lax.switch(step % rounds, [exchange(r) for r in range(rounds)], params)
        # x + peer is the same float on both members of a pair, so the pair stays bit-identical.
        return jax.tree.map(lambda x, p: (x + p) / 2, params, peer)


def _compress_leaf(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """MinMaxUInt8 of a whole tensor as one chunk: (codes [numel] uint8, header [2] min/max)."""
    return compress.minmax_uint8_compress(x.reshape(-1))


def _decompress_leaf(codes: jax.Array, header: jax.Array, like: jax.Array) -> jax.Array:
    return compress.minmax_uint8_decompress(codes, header).reshape(like.shape).astype(like.dtype)


@register("low_precision_decentralized")
@dataclasses.dataclass(frozen=True)
class LowPrecisionDecentralized(CommAlgorithm):
    """Ring gossip (W = 1/3) of MinMaxUInt8-compressed differences; each replica tracks its neighbours' weights.

    State per replica: `own` (w, its weights as its neighbours know them) and `left`/`right` (l, r, its copies
    of the neighbours' w). All three start as the initial parameters, so replicas must start identical (as in
    BAGUA). After the optimizer step gives x_half:
        z = x_half + l/3 + r/3 - (5/3) w;  send C(z) to both neighbours;
        l += D(C(z_left));  r += D(C(z_right));  x = w + D(C(z));  w = x.
    """

    centralized: ClassVar[bool] = False

    def init(self, params: PyTree) -> PyTree:
        return {"own": params, "left": params, "right": params}

    def reduce_gradients(
        self, grads: PyTree, state: PyTree, step: jax.Array, phase: Hashable = None
    ) -> tuple[PyTree, PyTree]:
        return grads, state

    def sync_parameters(
        self, params: PyTree, state: PyTree, step: jax.Array, phase: Hashable = None
    ) -> tuple[PyTree, PyTree]:
        """One ring exchange of compressed differences after the optimizer step."""
        third = 1.0 / 3.0
        diff = jax.tree.map(
            lambda x, left, right, own: x + left * third + right * third + own * (-5.0 / 3.0),
            params,
            state["left"],
            state["right"],
            state["own"],
        )
        compressed = jax.tree.map(_compress_leaf, diff)  # leaves become (codes uint8, header): uint8 on the wire
        from_left, from_right = _ring_neighbours(compressed, self.axis_name)

        def decoded(tree):
            return jax.tree.map(lambda like, payload: _decompress_leaf(*payload, like), diff, tree)

        left = jax.tree.map(jnp.add, state["left"], decoded(from_left))
        right = jax.tree.map(jnp.add, state["right"], decoded(from_right))
        params = jax.tree.map(jnp.add, decoded(compressed), state["own"])
        return params, {"own": params, "left": left, "right": right}
