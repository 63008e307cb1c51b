"""GANomaly (Akcay et al. 2018): encoder-decoder-encoder generator + DCGAN
discriminator; the anomaly score is the distance of the two latent codes.

One `train_step` updates both networks, following the official code's
current loss (its lib/model.py since 2019):
- generator: w_adv * MSE(f(x), f(G(x))) on the discriminator's 4x4 features
  + w_con * L1(x, G(x)) + w_enc * MSE(G_E(x), E(G(x))), weights 1 / 50 / 1;
- discriminator: 0.5 * (BCE(D(x), 1) + BCE(D(G(x)), 0)) on the generator
  output from before its update, with the discriminator's parameters from
  before the generator's update (the generator step never changes them);
- when the discriminator loss falls below `discriminator_reinit_threshold`
  its weights are drawn afresh (running statistics and, by default, its
  Adam state kept, as the reference does).

Scores (higher = more anomalous):
- 'latent_mse': mean over latent dims of (G_E(x) - E(G(x)))^2, the
  reference code's score;
- 'latent_l1': mean |G_E(x) - E(G(x))|, the paper's formula;
- 'reconstruction_l1': mean |x - G(x)|.

Differences from the reference, on purpose: scoring uses BatchNorm running
statistics (`eval.batch_norm='running'`); the reference never calls eval(),
so its scores depend on the test batch's composition and order (set
`eval.batch_norm='batch'` to reproduce that). We report the last step's
AUROC, never the best epoch picked on the test set. Pixels are scaled to
[-1, 1] for every data set (the reference's MNIST normalisation leaves the
tanh range).
"""

import jax.numpy as jnp

from jax_oneclass import optim
from jax_oneclass.components import conv as conv_lib
from jax_oneclass.errors import ConfigError
from jax_oneclass.methods import interface
from jax_oneclass.methods.gan import family as gan
from jax_oneclass.methods.gan.dcgan import (
  DCGANDiscriminator,
  GANomalyGenerator,
  check_image_size,
)


def generator_loss_terms(images, outputs, features_real, features_fake):
  """GANomaly's three generator terms (unweighted) as a dict of scalars."""
  return {
    "adversarial": jnp.mean(jnp.square(features_real - features_fake)),
    "contextual": jnp.mean(jnp.abs(images - outputs["fake"])),
    "encoder": jnp.mean(
      jnp.square(outputs["latent_out"] - outputs["latent_in"])
    ),
  }


def latent_scores(images, outputs) -> dict:
  """The per-image anomaly scores of a generator pass."""
  diff = outputs["latent_in"] - outputs["latent_out"]
  pixels = jnp.abs(images - outputs["fake"]).reshape((images.shape[0], -1))
  return {
    "latent_mse": jnp.mean(jnp.square(diff), axis=-1),
    "latent_l1": jnp.mean(jnp.abs(diff), axis=-1),
    "reconstruction_l1": jnp.mean(pixels, axis=-1),
  }


class Method(interface.NoFittedStage):
  """GANomaly: trains generator and discriminator; scores latent distance."""

  gradcam_layer = "encoder"  # The first encoder's last 4x4 feature map.

  @staticmethod
  def scorer_names(config) -> tuple[str, ...]:
    del config
    return ("latent_l1", "latent_mse", "reconstruction_l1")

  def __init__(self, config, info):
    self.config = config
    check_image_size(info.image_shape[0])
    self.batch_norm = config.eval.batch_norm
    if self.batch_norm not in ("running", "batch"):
      raise ConfigError(
        f"eval.batch_norm must be 'running' or 'batch', got "
        f"{self.batch_norm!r}."
      )
    model = config.model
    settings = conv_lib.settings(config)
    self.generator = GANomalyGenerator(
      model.latent_size, model.width, model.extra_layers, settings
    )
    # The reference builds the discriminator with the generator's width.
    self.discriminator = DCGANDiscriminator(
      model.width, model.extra_layers, settings
    )
    self.tx = optim.make_optimizer(config, info)
    self.weights = dict(config.loss_weights)
    if set(self.weights) != {"adversarial", "contextual", "encoder"}:
      raise ConfigError(
        "loss_weights needs exactly the keys adversarial, "
        f"contextual, encoder; got {sorted(self.weights)}."
      )

  def init_state(self, rng, image_shape) -> gan.GANState:
    """Both networks' variables and optimiser states."""
    return gan.init_gan_state(
      self.generator, self.discriminator, self.tx, rng, image_shape
    )

  def gradients(self, state, images):
    """Both networks' (loss, metrics, gradients, BatchNorm statistics)."""

    def generator_loss(outputs, d_real, d_fake):
      terms = generator_loss_terms(images, outputs, d_real[1], d_fake[1])
      loss = sum(self.weights[k] * v for k, v in terms.items())
      return loss, {f"generator_{k}": v for k, v in terms.items()}

    def discriminator_loss(d_real, d_fake):
      return gan.real_fake_loss(d_real[0], d_fake[0]), {}

    return gan.gan_gradients(
      self.generator,
      self.discriminator,
      state.generator,
      state.discriminator,
      images,
      generator_loss,
      discriminator_loss,
    )

  def train_step(self, state, batch, rng):
    """Generator and discriminator steps, as one pure function."""
    reinit_rng = interface.step_key(rng, state.step)
    images = gan.to_tanh_range(gan.first_view(batch))
    g_out, d_out = self.gradients(state, images)
    new_g = gan.apply_updates(
      self.tx, state.generator, g_out.grads, g_out.batch_stats
    )
    new_d = gan.apply_updates(
      self.tx, state.discriminator, d_out.grads, d_out.batch_stats
    )
    collapsed = d_out.loss < self.config.discriminator_reinit_threshold
    fresh = lambda: self.discriminator.init(
      reinit_rng, images[:1], train=False
    )["params"]
    new_d = gan.reinitialise_if(
      collapsed,
      new_d,
      fresh,
      self.tx,
      self.config.reset_discriminator_optimizer,
    )
    metrics = {
      "loss": g_out.loss,
      "discriminator_loss": d_out.loss,
      "discriminator_reinit": collapsed.astype(jnp.float32),
      "generator_grad_norm": optim.global_norm(g_out.grads),
      **g_out.metrics,
    }
    return state.replace(
      step=state.step + 1, generator=new_g, discriminator=new_d
    ), metrics

  def score(self, state, fitted, batch) -> interface.Scores:
    """Latent-distance and reconstruction scores per test image."""
    del fitted
    images = gan.to_tanh_range(batch["image"])
    outputs = gan.apply_eval(
      self.generator, state.generator, images, self.batch_norm
    )
    return interface.Scores(latent_scores(images, outputs))
