"""A bias-free MLP trained to pull features towards a fixed centre, and the
per-point gradient norms that the gradient-preference selector ranks by.

The network is plain jnp over a dict of weight matrices ('dense_0', ...),
ReLU between layers and none after the last. There are no biases, as in
Deep SVDD (Ruff et al. 2018): with biases the trivial map to the centre
would minimise the centre loss for every input.

`per_point_gradient_norms` gives, for each input point x_i separately,
||d/dW ||f_W(x_i) - c||^2|| over all weights, without materialising one
gradient per point: for a dense layer the per-point weight gradient is the
outer product a_i delta_i^T of its input and its output error, whose
Frobenius norm is |a_i| |delta_i|.
"""

import jax
import jax.numpy as jnp


def init_mlp(rng: jax.Array, in_dim: int, widths) -> dict[str, jax.Array]:
  """He-normal weights for layers in_dim -> widths[0] -> ... -> widths[-1]
  ({} for no widths: the identity map)."""
  if not widths:
    return {}
  weights = {}
  sizes = (in_dim,) + tuple(widths)
  for i, key in enumerate(jax.random.split(rng, len(widths))):
    init = jax.nn.initializers.he_normal()
    weights[f"dense_{i}"] = init(key, (sizes[i], sizes[i + 1]), jnp.float32)
  return weights


def _forward(weights, x: jax.Array):
  """Output, and each layer's input and pre-activation."""
  inputs, pre_activations = [], []
  for i in range(len(weights)):
    inputs.append(x)
    x = x @ weights[f"dense_{i}"]
    pre_activations.append(x)
    if i < len(weights) - 1:
      x = jax.nn.relu(x)
  return x, inputs, pre_activations


def mlp_apply(weights, x: jax.Array) -> jax.Array:
  """[N, in_dim] -> [N, widths[-1]]."""
  return _forward(weights, x)[0]


def center_loss(weights, center: jax.Array, x: jax.Array) -> jax.Array:
  """Mean over points of ||f(x) - c||^2."""
  return jnp.mean(jnp.sum((mlp_apply(weights, x) - center) ** 2, axis=-1))


def per_point_gradient_norms(
  weights, center: jax.Array, x: jax.Array
) -> jax.Array:
  """[N] norm of the gradient of ||f(x_i) - c||^2 w.r.t. all weights."""
  out, inputs, pre_activations = _forward(weights, x)
  delta = 2.0 * (out - center)  # d loss_i / d (last pre-activation).
  squared = jnp.zeros(x.shape[0], x.dtype)
  for i in reversed(range(len(weights))):
    squared += jnp.sum(delta**2, -1) * jnp.sum(inputs[i] ** 2, -1)
    if i:
      delta = (delta @ weights[f"dense_{i}"].T) * (pre_activations[i - 1] > 0)
  return jnp.sqrt(squared)
