"""Gradient-preference discriminative feature learning (Xu et al. 2022).

These defaults are ours; jax_oneclass/methods/gradient_preference/method.py
lists every design choice.

  # One MVTec AD category from an extracted copy, with ImageNet weights:
  python -m jax_oneclass.main --config=configs/gradient_preference.py:mvtec,folder=/data/mvtec_anomaly_detection,category=bottle \
      --config.model.pretrained=/weights/wide_resnet50_2-95faca4d.pth --workdir=/tmp/gp_bottle
"""

from jax_oneclass import config as config_lib


def get_config(arg=None):
  config = config_lib.base_config("gradient_preference")
  config.batch_size = 16  # Images per step; every patch point is used.
  config.num_epochs = 30  # An upper bound: early stopping usually ends it.
  config.data.name = "mvtec"
  config.data.category = "bottle"
  config.data.image_size = 256  # As RD4AD / PatchCore on MVTec.
  config.data.augment = ""
  config.data.num_views = 1

  config.model.backbone = "wide_resnet50_2"
  # A torchvision state dict, or the workdir of a two-stage run trained with
  # --config.model.arch=<model.backbone> (self-supervised); "" = random.
  config.model.pretrained = ""
  config.model.feature_layers = ("layer2", "layer3")  # Multi-level points.
  config.model.neighbourhood = 3  # Patch = 3x3 average of its surroundings.
  # Bias-free; the last is the space. () = no mapping: a plain
  # nearest-neighbour repository of the selected backbone features.
  config.model.mlp_widths = (512, 256)

  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-4
  config.optimizer.schedule = "constant"

  config.center_steps = 5  # Batches averaged for the fixed centre.
  config.early_stopping = dict(decay=0.9, min_delta=1e-3, patience=40)

  # Repository, selected before the MLP trains (on it): per training image
  # `fraction` of its patch points, `preferred_fraction` of them ranked by
  # `criterion` ('feature_gradient': the feature map's spatial gradient,
  # divided by the feature's norm if `normalize`; 'random'), `prefer`
  # 'largest' or 'smallest' first, the rest a seeded uniform sample; all
  # images' points together, capped at `max_size` if > 0. The defaults
  # come from a study (see experiments/RESULTS.md;
  # `git show 225ab88:experiments/gp_selector_study.py`).
  config.bank = dict(
    fraction=0.1,
    preferred_fraction=1.0,
    max_size=0,
    criterion="feature_gradient",
    prefer="smallest",
    normalize=False,
  )

  config.eval.batch_size = 16
  config.eval.k = 1  # Nearest repository entries averaged per patch.
  config.eval.query_chunk = 1024  # Search block sizes: memory ~ product.
  config.eval.bank_chunk = 8192
  config.eval.map_sigma = 4.0
  config.eval.num_overlays = 8
  # Every training image's points may enter the repository.
  config.eval.max_fit_examples = 100_000
  config.eval.scorer = "nn_max"  # The anomaly map's maximum.
  config_lib.apply_arg(
    config, arg, _small_run, {config_lib.TEST_PRESET: _test_run}
  )
  return config


def _small_run(config):
  """Digits at 32x32 with a ResNet-18 backbone (random unless given)."""
  config.data.image_size = 32
  config.model.backbone = "resnet18"
  config.model.mlp_widths = (128, 64)
  config.batch_size = 32
  config.num_train_steps = 150
  config.early_stopping.patience = 10
  config.bank.fraction = 0.5


def _test_run(config):
  """The `test` preset: `resnet_tiny` and a (16, 8) MLP."""
  config.model.width = 4
  config.model.backbone = "resnet_tiny"
  config.model.mlp_widths = (16, 8)
