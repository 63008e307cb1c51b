"""Deep SVDD (Ruff et al. 2018) as a method outside jax_oneclass.

A bias-free convolutional encoder is pulled towards a centre c, the mean
feature of the untrained network on the first training batch; the score is
the squared distance to c. The one-class classifiers of config.classifiers
are fitted on the same features ('knn' comes from my_lab.classifiers).

  config.method = "my_lab.deep_svdd"  # An import path: no registration.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_oneclass import optim
from jax_oneclass.components import oneclass
from jax_oneclass.methods import interface


class Encoder(nn.Module):
  """Two strided convolutions, no biases (they would let the network map
  every image onto c), averaged over space: [B, H, W, C] -> [B, 2 width]."""

  width: int

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = nn.Conv(self.width * 2**i, (3, 3), strides=2, use_bias=False)(x)
      x = nn.leaky_relu(x, 0.1)
    return jnp.mean(x, axis=(1, 2))


@flax.struct.dataclass
class State:
  """What training changes; any pytree will do."""

  step: jax.Array
  params: Any
  opt_state: Any
  center: jax.Array


class Method:
  """Deep SVDD: the interface of jax_oneclass/methods/interface.py."""

  def __init__(self, config, info):
    self.encoder = Encoder(config.model.width)
    self.tx = optim.make_optimizer(config, info)
    self.classifier_hparams = oneclass.checked_hparams(config.classifiers)

  def init_state(self, rng, image_shape):
    params = self.encoder.init(rng, jnp.zeros((1,) + tuple(image_shape)))
    features = jax.eval_shape(
      self.encoder.apply, params, jnp.zeros((1,) + tuple(image_shape))
    )
    return State(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=self.tx.init(params),
      center=jnp.zeros(features.shape[1:], jnp.float32),
    )

  prepare_batches = 1

  def prepare(self, state, batches):
    """The centre: the untrained network's mean feature on the first
    batch (run once, before the first step; saved with the state)."""
    features = [
      self.encoder.apply(state.params, b["image"][:, 0]) for b in batches
    ]
    return state.replace(center=jnp.concatenate(features).mean(0))

  def train_step(self, state, batch, rng):
    del rng  # Deterministic.
    images = batch["image"][:, 0]  # The first view: [B, H, W, C].

    def loss_fn(params):
      features = self.encoder.apply(params, images)
      return jnp.mean(jnp.sum((features - state.center) ** 2, axis=1))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    params, opt_state = optim.apply_gradients(
      self.tx, state.params, state.opt_state, grads
    )
    return state.replace(
      step=state.step + 1, params=params, opt_state=opt_state
    ), {"loss": loss}

  def embed(self, state, batch):
    return {"features": self.encoder.apply(state.params, batch["image"])}

  def fit(self, embeddings):
    return oneclass.fit_each(embeddings["features"], self.classifier_hparams)

  def score(self, state, fitted, batch):
    features = self.encoder.apply(state.params, batch["image"])
    scores = {"svdd": jnp.sum((features - state.center) ** 2, axis=1)}
    scores.update(
      oneclass.score_each(fitted, features, self.classifier_hparams)
    )
    return interface.Scores(scores)
