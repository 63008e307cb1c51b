"""Discriminative-generative representation learning (Xia et al. 2021,
arXiv 2107.12753), short name 'dgad' here.

The paper's idea: the generator learns its representation from the
discriminator's feedback on a self-supervised label-prediction pretext task
instead of from pixel reconstruction. The concrete design is ours, choice by
choice (each can be changed by config):

1. Pretext task: K geometric transformations T_k, the 4 rotations by
   k * 90 degrees (`transforms='rotate'`) or those times a horizontal flip
   (`'rotate_flip'`, K = 8).
2. Generator: a DCGAN encoder-decoder (`dcgan.EncoderDecoder`) mapping
   T_k(x) to G(T_k(x)); its encoder's code is the representation. There is
   no pixel loss.
3. Discriminator: one DCGAN trunk whose final conv gives K pretext logits
   plus one real/fake logit.
4. Discriminator loss: cross-entropy of k on real T_k(x) +
   `adversarial_weight` * the real/fake BCE against G's outputs. It never
   learns the pretext task from generated images, so the generator cannot
   win by drawing a private code for k.
5. Generator loss: `pretext_weight` * cross-entropy of k on G(T_k(x)) (so
   G's encoder has to recognise the transformation in T_k(x)) +
   `adversarial_weight` * the non-saturating BCE(D(G(T_k x)), real).
6. Scores (higher = more anomalous): 'pretext/generated', the mean over k of
   -log p(k | G(T_k(x))), read through the generator; 'pretext/real', the
   same on T_k(x) (the discriminator alone); 'latent/<classifier>',
   one-class classifiers on the generator's L2-normalised codes of the
   untransformed normal training images.
7. Padding (`model.padding`): circular (the config's default), reflect or
   zeros (GANomaly's) for every padded convolution of both networks. Zero
   padding lets a network read absolute position from the border, which
   can tell rotations apart without any content; the paper's ablation finds
   that such position information hurts the generator on
   geometric-transformation tasks, and circular padding has no border.
Both networks use BatchNorm running statistics at test time.
"""

import jax
import jax.numpy as jnp
import optax

from jax_oneclass import optim
from jax_oneclass.components import conv as conv_lib
from jax_oneclass.components import oneclass
from jax_oneclass.errors import ConfigError
from jax_oneclass.methods import interface
from jax_oneclass.methods.gan import family as gan
from jax_oneclass.methods.gan.dcgan import (
  DCGANEncoder,
  EncoderDecoder,
  check_image_size,
  check_padding,
)

TRANSFORMS = {"rotate": 4, "rotate_flip": 8}


def transform(images: jax.Array, k: int) -> jax.Array:
  """T_k: rotation by (k % 4) * 90 degrees, then a flip for k >= 4."""
  out = jnp.rot90(images, k % 4, axes=(1, 2))
  return out[:, :, ::-1] if k >= 4 else out


def all_transforms(images: jax.Array, num: int):
  """[B, ...] -> ([num * B, ...] transform-major, labels [num * B])."""
  # lax.concatenate: jax2onnx's jnp.concatenate loses a symbolic batch size.
  stacked = jax.lax.concatenate([transform(images, k) for k in range(num)], 0)
  labels = jnp.repeat(jnp.arange(num), images.shape[0])
  return stacked, labels


def pretext_nll(logits: jax.Array, labels: jax.Array, num: int) -> jax.Array:
  """Per-image mean over the K transforms of -log p(k | .); [K*B] -> [B]."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return nll.reshape((num, -1)).mean(axis=0)


class Method:
  """Generator trained through a discriminator's pretext task."""

  gradcam_layer = "encoder"  # The generator encoder's last 4x4 feature map.

  def __init__(self, config, info):
    self.config = config
    check_image_size(info.image_shape[0])
    if config.transforms not in TRANSFORMS:
      raise ConfigError(
        f"Unknown transforms {config.transforms!r}; use one "
        f"of {', '.join(TRANSFORMS)}."
      )
    self.num_transforms = TRANSFORMS[config.transforms]
    model = config.model
    padding = model.get("padding", "zeros")
    check_padding(padding)
    settings = conv_lib.settings(config)
    self.generator = EncoderDecoder(
      model.latent_size, model.width, model.extra_layers, padding, settings
    )
    # K pretext logits and, last, one real/fake logit.
    self.discriminator = DCGANEncoder(
      self.num_transforms + 1,
      model.width,
      model.extra_layers,
      padding,
      settings,
    )
    self.tx = optim.make_optimizer(config, info)
    self.classifier_hparams = oneclass.checked_hparams(config.classifiers)

  def init_state(self, rng, image_shape) -> gan.GANState:
    """Both networks' variables and optimiser states."""
    return gan.init_gan_state(
      self.generator, self.discriminator, self.tx, rng, image_shape
    )

  def _split(self, logits):
    """Discriminator output -> (pretext logits [N, K], real/fake logit [N])."""
    return logits[:, :-1], logits[:, -1]

  def train_step(self, state, batch, rng):
    """Generator and discriminator steps, as one pure function."""
    del rng  # Deterministic given the batch.
    images = gan.to_tanh_range(gan.first_view(batch))
    inputs, labels = all_transforms(images, self.num_transforms)
    w_pretext = self.config.pretext_weight
    w_adv = self.config.adversarial_weight

    def pretext_loss(logits):
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), jnp.mean(jnp.argmax(logits, -1) == labels)

    def generator_loss(outputs, d_real, d_fake):
      del outputs, d_real  # No pixel loss: G learns only through D.
      pretext_logits, real_fake = self._split(d_fake[0])
      pretext, accuracy = pretext_loss(pretext_logits)
      adversarial = optax.sigmoid_binary_cross_entropy(
        real_fake, jnp.ones_like(real_fake)
      ).mean()
      return w_pretext * pretext + w_adv * adversarial, {
        "generator_pretext": pretext,
        "generator_adversarial": adversarial,
        "generated_pretext_accuracy": accuracy,
      }

    def discriminator_loss(d_real, d_fake):
      pretext_logits, logits_real = self._split(d_real[0])
      pretext, accuracy = pretext_loss(pretext_logits)
      adversarial = gan.real_fake_loss(logits_real, self._split(d_fake[0])[1])
      return pretext + w_adv * adversarial, {
        "discriminator_pretext": pretext,
        "discriminator_adversarial": adversarial,
        "real_pretext_accuracy": accuracy,
      }

    g_out, d_out = gan.gan_gradients(
      self.generator,
      self.discriminator,
      state.generator,
      state.discriminator,
      inputs,
      generator_loss,
      discriminator_loss,
    )
    new_state = state.replace(
      step=state.step + 1,
      generator=gan.apply_updates(
        self.tx, state.generator, g_out.grads, g_out.batch_stats
      ),
      discriminator=gan.apply_updates(
        self.tx, state.discriminator, d_out.grads, d_out.batch_stats
      ),
    )
    metrics = {
      "loss": g_out.loss,
      "discriminator_loss": d_out.loss,
      **g_out.metrics,
      **d_out.metrics,
    }
    return new_state, metrics

  def _generate(self, state, images):
    return gan.apply_eval(self.generator, state.generator, images)

  def embed(self, state, batch):
    """The generator's codes of the untransformed images."""
    images = gan.to_tanh_range(batch["image"])
    return {"code": self._generate(state, images)["code"]}

  def fit(self, embeddings):
    """One-class classifiers on the normal training images' codes."""
    return oneclass.fit_each(embeddings["code"], self.classifier_hparams)

  @staticmethod
  def scorer_names(config) -> tuple[str, ...]:
    """Two pretext scores and one per classifier on the codes."""
    latent = tuple(f"latent/{name}" for name in config.classifiers)
    return tuple(sorted(("pretext/generated", "pretext/real") + latent))

  def score(self, state, fitted, batch) -> interface.Scores:
    """Pretext scores through the generator and directly, and latent ones."""
    images = gan.to_tanh_range(batch["image"])
    inputs, labels = all_transforms(images, self.num_transforms)
    generated = self._generate(state, inputs)["fake"]
    discriminate = lambda x: self._split(
      gan.apply_eval(self.discriminator, state.discriminator, x)[0]
    )[0]
    num = self.num_transforms
    scores = {
      "pretext/generated": pretext_nll(discriminate(generated), labels, num),
      "pretext/real": pretext_nll(discriminate(inputs), labels, num),
    }
    code = self._generate(state, images)["code"]
    for name, values in oneclass.score_each(
      fitted, code, self.classifier_hparams
    ).items():
      scores[f"latent/{name}"] = values
    return interface.Scores(scores)
