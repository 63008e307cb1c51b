"""A one-class classifier of our own: mean squared distance to the k nearest
training features. Listed in config.plugins, so every process that reads a
run imports it (and registers 'knn') before building the method."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_oneclass.components import oneclass


def knn_fit(features, k=2):
  """On the host: the bank of training features [N, D] and k weights."""
  bank = np.asarray(features, np.float32)
  k = min(int(k), len(bank))
  return {"bank": bank, "weights": np.full((k,), 1.0 / k, np.float32)}


def knn_score(params, features):
  """Pure jnp, traced inside the method's jitted score: [M]. Array values
  are traced, shapes are not: k is the length of 'weights'."""
  bank, weights = params["bank"], params["weights"]
  d2 = (
    jnp.sum(features**2, 1)[:, None]
    + jnp.sum(bank**2, 1)[None, :]
    - 2.0 * features @ bank.T
  )
  nearest = -jax.lax.top_k(-d2, weights.shape[0])[0]  # [M, k]
  return nearest @ weights


oneclass.register_classifier("knn", fit=knn_fit, score=knn_score)
