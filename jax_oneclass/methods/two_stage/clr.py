"""CLR: contrastive representation learning (SimCLR-style) as used by Sohn et
al. 2021, followed by one-class classifiers on the learned features.

Two augmented views of each image go through the network together (so the
BatchNorm statistics cover both). Under `jax.jit` the batch is global, so the
negatives are all other images of the global batch, across every device and
host, with no explicit all-gather.

`config.contrastive_loss` picks the objective:
- 'cross_view' (default, the reference code's loss): each view-1
  embedding is classified against all view-2 embeddings; 1 positive and B-1
  negatives, one direction only.
- 'nt_xent' (SimCLR's NT-Xent): each of the 2B embeddings against the other
  2B-1, symmetric, 2B-2 negatives.
"""

import jax
import jax.numpy as jnp
import optax

from jax_oneclass.components import oneclass
from jax_oneclass.errors import ConfigError
from jax_oneclass.methods.two_stage import family


def cross_view_loss(z1, z2, temperature: float):
  """Mean cross-entropy of matching z1[i] to z2[i] among all of z2.

  Args:
    z1, z2: [B, D] L2-normalised embeddings of two views of B images.
    temperature: softmax temperature.

  Returns:
    (loss, accuracy) scalars.
  """
  logits = z1 @ z2.T / temperature
  labels = jnp.arange(z1.shape[0])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return loss.mean(), jnp.mean(jnp.argmax(logits, -1) == labels)


def nt_xent_loss(z1, z2, temperature: float):
  """SimCLR's NT-Xent loss over 2B embeddings, self-similarity excluded.

  Args:
    z1, z2: [B, D] L2-normalised embeddings of two views of B images.
    temperature: softmax temperature.

  Returns:
    (loss, accuracy) scalars.
  """
  batch = z1.shape[0]
  z = jnp.concatenate([z1, z2])
  logits = z @ z.T / temperature
  logits = jnp.where(jnp.eye(2 * batch, dtype=bool), -jnp.inf, logits)
  labels = jnp.concatenate([jnp.arange(batch, 2 * batch), jnp.arange(batch)])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return loss.mean(), jnp.mean(jnp.argmax(logits, -1) == labels)


def merge_views(images: jax.Array) -> jax.Array:
  """[B, V, H, W, C] -> [V * B, H, W, C], view-major (all of view 0 first)."""
  return jnp.swapaxes(images, 0, 1).reshape((-1,) + images.shape[2:])


CONTRASTIVE_LOSSES = {"cross_view": cross_view_loss, "nt_xent": nt_xent_loss}


class Method(family.TwoStageMethod):
  """Contrastive representation + one-class classifiers."""

  def __init__(self, config, info):
    if config.data.num_views != 2:
      raise ConfigError(
        "Contrastive learning needs config.data.num_views=2 "
        f"(got {config.data.num_views})."
      )
    if config.contrastive_loss not in CONTRASTIVE_LOSSES:
      raise ConfigError(
        f"Unknown contrastive_loss {config.contrastive_loss!r}; use one of "
        f"{sorted(CONTRASTIVE_LOSSES)}."
      )
    super().__init__(config, info)
    self.contrastive_loss = CONTRASTIVE_LOSSES[config.contrastive_loss]

  def loss(self, params, batch_stats, batch, rng):
    """Contrastive loss of the two views' L2-normalised head outputs."""
    del rng  # Augmentation happens in the input pipeline.
    views = batch["image"]  # [B, 2, H, W, C]
    outputs, batch_stats = self.apply_train(
      params, batch_stats, merge_views(views)
    )
    z1, z2 = jnp.split(oneclass.l2_normalize(outputs["embed"]), 2)
    loss, accuracy = self.contrastive_loss(z1, z2, self.config.temperature)
    return loss, (batch_stats, {"contrastive_accuracy": accuracy})
