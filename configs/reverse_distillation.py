"""Reverse distillation (Deng & Li 2022, RD4AD); defaults from the official
code (main.py).

  # One MVTec AD category from an extracted copy, with ImageNet weights:
  python -m jax_oneclass.main --config=configs/reverse_distillation.py:mvtec,folder=/data/mvtec_anomaly_detection,category=bottle \
      --config.model.pretrained=imagenet --workdir=/tmp/rd_bottle
  # (imagenet: torchvision's file, downloaded once into $JAX_ONECLASS_CACHE;
  # a local copy works too: --config.model.pretrained=/weights/wide_resnet50_2-95faca4d.pth)
"""

from jax_oneclass import config as config_lib


def get_config(arg=None):
  config = config_lib.base_config("reverse_distillation")
  config.batch_size = 16  # main.py: batch_size 16.
  config.num_epochs = 200  # main.py: 200 epochs.
  config.data.name = "mvtec"
  config.data.category = "bottle"
  config.data.image_size = 256  # main.py: image_size 256.
  config.data.augment = ""  # The official code does not augment.
  config.data.num_views = 1

  config.model.backbone = "wide_resnet50_2"  # Teacher and mirrored student.
  config.model.ocbe_width_per_group = 0  # 0: the backbone's (128 for WRN).
  # A torchvision state dict, "imagenet" (torchvision's weights, downloaded
  # and cached), or the workdir of a two-stage run trained with
  # --config.model.arch=<model.backbone> (self-supervised); "" = random.
  config.model.pretrained = ""

  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 0.005  # main.py: lr 0.005.
  config.optimizer.b1 = 0.5  # main.py: betas (0.5, 0.999).
  config.optimizer.b2 = 0.999
  config.optimizer.schedule = "constant"

  # How the three scales' upsampled maps become one: 'sum' (RD4AD), 'mean',
  # 'product', a registered name or 'package.module.function'.
  config.model.map_fusion = "sum"
  config.loss_mode = "flattened"  # Official; 'per_pixel' is the paper's.
  config.eval.batch_size = 16
  config.eval.map_sigma = 4.0  # test.py: gaussian_filter(sigma=4).
  config.eval.num_overlays = 8  # Test images drawn to visualizations/.
  config.eval.scorer = "map_max"  # RD4AD: the anomaly map's maximum.
  config_lib.apply_arg(
    config, arg, _small_run, {config_lib.TEST_PRESET: _test_run}
  )
  return config


def _small_run(config):
  """Digits at 32x32 with a ResNet-18 teacher (random unless given)."""
  config.data.image_size = 32
  config.model.backbone = "resnet18"
  config.batch_size = 32


def _test_run(config):
  """The `test` preset: `resnet_tiny`, ResNet-18 at 1/8 of its widths."""
  config.model.width = 4
  config.model.backbone = "resnet_tiny"
