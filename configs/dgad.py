"""Discriminative-generative representation learning (Xia et al. 2021).

The defaults are GANomaly's DCGAN settings, the GAN baseline the paper
compares against; change them with --config.key=value.

  python -m jax_oneclass.main --config=configs/dgad.py:digits --workdir=/tmp/dgad
  python -m jax_oneclass.main --config=configs/dgad.py:cifar10,normal_class=3 --workdir=...
"""

from jax_oneclass import config as config_lib


def get_config(arg=None):
  config = config_lib.base_config("dgad")
  config.batch_size = 64  # Images; each gives K transformed copies.
  config.num_epochs = 15  # As GANomaly's reference runs.
  config.data.augment = ""
  config.data.num_views = 1

  config.model.width = 64  # DCGAN width of both networks.
  config.model.latent_size = 100  # The generator's code.
  config.model.extra_layers = 0
  # Padding of every padded conv of both networks: "circular" (default),
  # "reflect" or "zeros" (GANomaly's). The paper's ablation finds that
  # absolute position information hurts the generator on
  # geometric-transformation pretext tasks. Zero padding leaks it: the
  # border is visible to every layer, so a rotation can be told apart by
  # where the zeros are, without any content. Reflect padding still marks
  # the border (a mirror line); circular padding is the only mode with no
  # border, which makes the convolutions shift-equivariant on the torus,
  # so it is the default the argument implies (set before any DGAD run).
  config.model.padding = "circular"

  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 2e-4
  config.optimizer.b1 = 0.5
  config.optimizer.b2 = 0.999
  config.optimizer.schedule = "constant"

  config.transforms = "rotate"  # 'rotate' (K=4) or 'rotate_flip' (K=8).
  config.pretext_weight = 1.0
  config.adversarial_weight = 1.0  # 0 drops the real/fake game.
  # One-class classifiers on the generator's codes (see two-stage configs).
  config.classifiers = {"gde": {}, "kde": {}}
  config.eval.batch_size = 64
  # Fixed a priori from the paper's argument, not from test results: what
  # the method trains is the generator's representation (it "no longer
  # learns representation by reconstruction error, but the guidance of the
  # discriminator"), so the headline is a one-class classifier on the
  # generator's codes; GDE, the two-stage family's a-priori classifier,
  # which has no bandwidth to pick. 'pretext/generated' and 'pretext/real'
  # are still reported.
  config.eval.scorer = "latent/gde"
  config_lib.apply_arg(
    config, arg, _small_run, {config_lib.TEST_PRESET: _test_run}
  )
  return config


def _small_run(config):
  """Digits (16x16): narrow networks and a small code."""
  config.model.latent_size = 32


def _test_run(config):
  """The `test` preset: width 4, an 8-dimensional code."""
  config.model.width = 4
  config.model.latent_size = 8
