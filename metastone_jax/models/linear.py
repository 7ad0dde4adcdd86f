"""The projections' matrix product, with a backward pass that keeps XLA:CPU on its fast path.

XLA:CPU runs dot(x, grad) contracting the long token axis of both operands far slower than the same product with
x^T materialised first (BENCHMARKS.md, the model section), so on CPU the weight gradient is computed that way, a
barrier keeping the compiler from folding the transpose back into the dot. Other platforms take the plain x^T @ g.
"""

from __future__ import annotations

import jax


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [tokens, in] @ w [in, out], whose weight gradient on CPU multiplies a materialised x^T."""
    return x @ w


def _matmul_forward(x, w):
    return x @ w, (x, w)


def _matmul_backward(residuals, grad):
    x, w = residuals
    weight_grad = jax.lax.platform_dependent(
        x, grad, cpu=lambda x, grad: jax.lax.optimization_barrier(x.T) @ grad, default=lambda x, grad: x.T @ grad
    )
    return grad @ w.T, weight_grad


matmul.defvjp(_matmul_forward, _matmul_backward)
