"""RotNet: 4-way rotation prediction (Gidaris et al. 2018) as used by Sohn et
al. 2021, followed by one-class classifiers on the learned features.

Each training image comes as four independently augmented views; view k is
rotated by k * 90 degrees and labelled k, as in the reference code. Besides
the classifiers, the rotation head itself scores images:
'rotation_head' = 1 - p(0 | x), and 'rotation_head/rot_avg' = the negative
sum over k of log p(k | rot_k(x)), which ranks like the reference's
1 - prod_k p(k | rot_k(x)) without underflowing.
"""

import jax
import jax.numpy as jnp
import optax

from jax_oneclass.errors import ConfigError
from jax_oneclass.methods.two_stage import family


class Method(family.TwoStageMethod):
  """RotNet representation + one-class classifiers."""

  num_rotation_classes = family.NUM_ROTATIONS
  extra_scorers = ("rotation_head", "rotation_head/rot_avg")

  def __init__(self, config, info):
    if config.data.num_views != family.NUM_ROTATIONS:
      raise ConfigError(
        "RotNet rotates view k of each image by k * 90 degrees, so it needs "
        f"config.data.num_views={family.NUM_ROTATIONS} (got "
        f"{config.data.num_views})."
      )
    super().__init__(config, info)

  def loss(self, params, batch_stats, batch, rng):
    """Softmax cross-entropy of the rotation of each of the 4B views."""
    del rng  # Augmentation happens in the input pipeline.
    views = batch["image"]  # [B, 4, H, W, C]
    images = jnp.concatenate(
      [family.rotate(views[:, k], k) for k in range(views.shape[1])]
    )
    labels = jnp.repeat(jnp.arange(views.shape[1]), views.shape[0])
    outputs, batch_stats = self.apply_train(params, batch_stats, images)
    logits = outputs["rotation_logits"]
    loss = optax.softmax_cross_entropy_with_integer_labels(
      logits, labels
    ).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, (batch_stats, {"rotation_accuracy": accuracy})

  def image_scores(self, state, fitted, images) -> dict:
    """Classifier scores plus the rotation head's own scores."""
    scores = self.classifier_scores(state, fitted, images)
    log_probs = [
      jax.nn.log_softmax(
        self.apply_eval(state, family.rotate(images, k))["rotation_logits"]
      )[:, k]
      for k in range(family.NUM_ROTATIONS)
    ]
    scores["rotation_head"] = 1.0 - jnp.exp(log_probs[0])
    scores["rotation_head/rot_avg"] = -jnp.sum(jnp.stack(log_probs), axis=0)
    return scores
