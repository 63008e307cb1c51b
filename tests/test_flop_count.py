"""The benchmarks' FLOP counter (experiments/common.matmul_flops)."""

import jax
import jax.numpy as jnp

from experiments import common


def _conv(x, w, stride):
  return jax.lax.conv_general_dilated(
    x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def test_counts_a_strided_conv_forward_and_both_gradients():
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6))
  loss = lambda x, w: jnp.sum(_conv(x, w, 2) ** 2)
  forward = 2 * (2 * 4 * 4 * 6) * (3 * 3 * 4)  # Output size x window.
  assert common.matmul_flops(loss, x, w) == forward
  # Input and weight gradients cost a forward each; the input gradient's
  # dilation zeros are not counted.
  assert common.matmul_flops(jax.grad(loss, (0, 1)), x, w) == 3 * forward
  assert common.matmul_flops(jax.jit(jax.grad(loss, 1)), x, w) == 2 * forward


def test_counts_products_in_scans_and_the_larger_branch():
  a = jnp.ones((4, 4))
  scanned = lambda a: jax.lax.scan(
    lambda c, _: (c @ a, None), a, None, length=5
  )[0]
  assert common.matmul_flops(scanned, a) == 5 * 2 * 4**3
  branch = lambda a: jax.lax.cond(
    a[0, 0] > 0, lambda a: a @ a @ a, lambda a: a, a
  )
  assert common.matmul_flops(branch, a) == 2 * 2 * 4**3
