"""Config building blocks shared by the files in configs/.

A config file's `get_config(arg)` takes the string after the colon in
`--config=configs/disaug.py:cifar10,normal_class=3`: bare words name the data
set, `key=value` pairs set any config key (dotted paths allowed, types taken
from the default). Later `--config.key=value` flags override the result.
"""

import ast
from typing import Callable

import ml_collections

from jax_oneclass.errors import ConfigError

# Per data set: image size and channels after preprocessing, and the model
# and schedule overrides that make the run fit the data set's size.
DATASETS = {
    # Sohn et al. 2021, Sec. 4: 32x32 RGB for CIFAR and (F)MNIST.
    "cifar10": dict(image_size=32, channels=3, num_classes=10),
    "cifar100": dict(image_size=32, channels=3, num_classes=20),
    "fashion_mnist": dict(image_size=32, channels=3, num_classes=10),
    "mnist": dict(image_size=32, channels=3, num_classes=10),
    # Reference data/dogvscat: resized and centre-cropped to 64x64.
    "cats_vs_dogs": dict(image_size=64, channels=3, num_classes=2),
    "folder": dict(image_size=32, channels=3, num_classes=None),
    # MVTec AD categories (or look-alikes): label 0 good (normal), 1 defect.
    "mvtec": dict(image_size=256, channels=3, num_classes=2),
    # scikit-learn's 8x8 digits, upsampled to 16x16 so that crops keep
    # detail; ~120 normal training images, so a small network and short run.
    "digits": dict(image_size=16, channels=1, num_classes=10),
}


def base_config(method: str) -> ml_collections.ConfigDict:
  """Keys every method shares; method families add theirs on top."""
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 1  # Sohn et al. script/run_*.sh: --seed=1.
  c.batch_size = 32  # Global, over all devices and hosts.
  # Duration: num_train_steps wins when > 0, else num_epochs over the
  # (distribution-augmented) normal training set.
  c.num_train_steps = -1
  c.num_epochs = 100

  c.data = ml_collections.ConfigDict()
  c.data.name = "cifar10"
  c.data.normal_class = 0
  c.data.protocol = "one_class_normal"  # Or 'one_class_anomalous' (GANomaly).
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.folder = ""  # 'folder' and 'mvtec' data sets: the root folder.
  c.data.category = ""  # 'mvtec': the category (subfolder of data.folder).
  c.data.image_size = 32
  c.data.channels = 3
  c.data.augment = ""  # Ops joined by '|'; see jax_oneclass/data/augment.py.
  c.data.num_views = 1
  c.data.rotation_distaug = False
  c.data.shuffle_buffer = 10_000

  c.model = ml_collections.ConfigDict()
  c.model.width = 64

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.momentum = 0.9  # sgd only.
  c.optimizer.nesterov = False  # sgd only.
  c.optimizer.b1 = 0.9  # adam only.
  c.optimizer.b2 = 0.999  # adam only.
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  c.optimizer.grad_clip_norm = 0.0

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256
  # Cap on images a fitted stage sees (Sohn et al. util/train.py: 20000).
  c.eval.max_fit_examples = 20_000

  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.halt_after_step = -1  # Stop (with a checkpoint) after this step, if > 0.
  c.progress_bar = True
  return c


def two_stage_config(method: str) -> ml_collections.ConfigDict:
  """Shared keys of the two-stage family with the reference's defaults."""
  c = base_config(method)
  c.num_epochs = 2048  # script/run_*.sh: --num_epoch=2048.
  # Reference aug string 'cnr0.5+hflip+jitter_b0.4_c0.4_s0.4_h0.4+gray0.2+
  # blur0.5': square crops of 1/2 to full side, jitter always applied. Its
  # blur op is a no-op in training (data/augment.py), so it is left out.
  c.data.augment = ("random_resized_crop(0.25,ratio=(1.0,1.0))|flip_lr|"
                    "color_jitter(0.4,0.4,0.4,0.4,p=1.0)|grayscale(p=0.2)")
  c.data.num_views = 2

  c.model.stage_sizes = (2, 2, 2, 2)  # ResNet-18.
  c.model.head_dims = (512,) * 8 + (128,)  # Reference --head_dims.
  # "cifar": the paper's ResNet (stage_sizes, width). A torchvision name
  # ("resnet18", "resnet50", "wide_resnet50_2") trains that ImageNet-layout
  # network instead, whose checkpoint the localisation methods can load as
  # a self-supervised backbone (model.pretrained=<this run's workdir>).
  c.model.arch = "cifar"

  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.01  # Momentum 0.9 as in base_config.
  c.optimizer.weight_decay = 3e-4
  c.optimizer.schedule = "cosine_epoch"  # util/scheduler.py: per epoch.

  # One-class classifiers on frozen features: name -> hyper-parameters
  # (defaults in jax_oneclass/classifiers.py follow util/train.py). gde_lw
  # is not in the reference: GDE with Ledoit-Wolf shrinkage, for banks with
  # fewer images than feature dimensions (e.g. ~120 digits, 128-d features).
  c.classifiers = ml_collections.ConfigDict(
      {"kde": {}, "gde": {}, "ocsvm": {},
       "gde_lw": {"classifier": "gde", "shrinkage": "ledoit_wolf"}})
  c.eval.rotation_averaging = True
  return c


def _parse_value(text: str, default):
  if isinstance(default, bool):
    if text.lower() in ("true", "1", "yes", ""):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"Expected a boolean, got {text!r}.")
  if isinstance(default, str) or default is None:
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise ConfigError(f"Cannot parse {text!r} as a value.") from e
  if isinstance(default, float) and isinstance(value, int):
    value = float(value)
  return value


def apply_arg(config: ml_collections.ConfigDict, arg,
              small_run: Callable[[ml_collections.ConfigDict], None]
              | None = None) -> None:
  """Applies `name,key=value,...` from `--config=file.py:<arg>` in place.

  `small_run(config)` is the config file's preset for the tiny `digits` set
  (a run of a few CPU minutes); it runs after the common digits preset.
  """
  if not arg:
    return
  tokens = [t.strip() for t in arg.split(",") if t.strip()]
  # Data set words first: their presets must not undo explicit key=values.
  for token in tokens:
    if "=" not in token:
      set_dataset(config, token, small_run)
  for token in tokens:
    if "=" not in token:
      continue
    key, text = (s.strip() for s in token.split("=", 1))
    if key in ("normal_class", "protocol", "data_dir", "folder", "category"):
      key = "data." + key
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if part not in node:
        raise ConfigError(f"Unknown config key {key!r} in {arg!r}.")
      node = node[part]
    if leaf not in node:
      raise ConfigError(
          f"Unknown config key {key!r} in {arg!r}. Known keys here: "
          f"{', '.join(sorted(node.keys()))}.")
    node[leaf] = _parse_value(text, node[leaf])


def set_dataset(config: ml_collections.ConfigDict, name: str,
                small_run=None) -> None:
  """Selects a data set and its image size and channels."""
  if name not in DATASETS:
    raise ConfigError(
        f"Unknown data set {name!r}. Known: {', '.join(sorted(DATASETS))}; "
        "any root/<split>/<class>/*.jpg folder works with 'folder,"
        "folder=/path'.")
  config.data.name = name
  preset = DATASETS[name]
  config.data.image_size = preset["image_size"]
  config.data.channels = preset["channels"]
  if name == "digits":
    config.model.width = 16
    config.num_train_steps = 400
    config.data.shuffle_buffer = 2_000
    config.log_every_steps = 25
    config.checkpoint_every_steps = 100
    if small_run is not None:
      small_run(config)


def two_stage_small_run(config: ml_collections.ConfigDict) -> None:
  """Two-stage family on digits: small head, short warm-up, mild crops."""
  config.model.head_dims = tuple(
      min(d, 128) for d in config.model.head_dims[-3:])
  # 128 network inputs per step for every method: 64 x 2 views, 32 x 4.
  config.batch_size = 128 // config.data.num_views
  config.optimizer.learning_rate = 0.05
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 20
  # Digits are not flip- or colour-invariant, and crops that cut strokes off
  # change the digit: mild crops only. (Scale 0.8 beat 0.5 on classes 1 and
  # 9 for DisAug; see experiments/RESULTS.md.)
  config.data.augment = "random_resized_crop(0.8,ratio=(0.9,1.1))"
