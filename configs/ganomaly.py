"""GANomaly (Akcay et al. 2018); defaults from the official code's options
(lib/options.py) and run scripts.

  python -m jax_oneclass.main --config=configs/ganomaly.py:digits --workdir=/tmp/ganomaly
  python -m jax_oneclass.main --config=configs/ganomaly.py:cifar10,normal_class=3 --workdir=...
  # The paper's protocol: one class anomalous, the other nine normal.
  python -m jax_oneclass.main --config=configs/ganomaly.py:cifar10,protocol=one_class_anomalous,normal_class=2 --workdir=...
"""

from jax_oneclass import config as config_lib


def get_config(arg=None):
  config = config_lib.base_config("ganomaly")
  config.batch_size = 64  # --batchsize 64.
  config.num_epochs = 15  # --niter 15 (run_cifar.sh, run_mnist.sh).
  config.data.augment = ""  # The reference trains on unaugmented images.
  config.data.num_views = 1

  config.model.width = 64  # --ngf 64 (also the discriminator's width).
  config.model.latent_size = 100  # --nz 100.
  config.model.extra_layers = 0  # --extralayers 0.

  config.optimizer.name = "adam"  # Separate Adam for each network.
  config.optimizer.learning_rate = 2e-4  # --lr 0.0002.
  config.optimizer.b1 = 0.5  # --beta1 0.5.
  config.optimizer.b2 = 0.999
  config.optimizer.schedule = "constant"

  # --w_adv 1, --w_con 50, --w_enc 1.
  config.loss_weights = dict(adversarial=1.0, contextual=50.0, encoder=1.0)
  config.discriminator_reinit_threshold = 1e-5  # lib/model.py reinit_d.
  config.reset_discriminator_optimizer = False  # The reference keeps Adam's.

  # 'running' BatchNorm statistics at test time; 'batch' reproduces the
  # reference, whose scores depend on the test batch (see the method's doc).
  config.eval.batch_norm = "running"
  config.eval.batch_size = 64
  config.eval.scorer = "latent_mse"  # The official code's score.
  config_lib.apply_arg(
    config, arg, _small_run, {config_lib.TEST_PRESET: _test_run}
  )
  return config


def _small_run(config):
  """Digits (16x16): narrow networks, a small code, 400 steps."""
  config.model.latent_size = 32


def _test_run(config):
  """The `test` preset: width 4, an 8-dimensional code."""
  config.model.width = 4
  config.model.latent_size = 8
