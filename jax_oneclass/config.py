"""Config building blocks shared by the files in configs/, and config loading.

A config file's `get_config(arg)` takes the string after the colon in
`--config=configs/disaug.py:cifar10,normal_class=3`: bare words name the data
set, `key=value` pairs set any config key (dotted paths allowed, types taken
from the default). Later `--config.key=value` flags override the result.
"""

import ast
import importlib.util
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_collections
from ml_collections.config_flags import config_path

from jax_oneclass.errors import ConfigError

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Per data set: image size and channels after preprocessing.
DATASETS = {
  # Sohn et al. 2021, Sec. 4: 32x32 RGB for CIFAR and (F)MNIST.
  "cifar10": dict(image_size=32, channels=3),
  "cifar100": dict(image_size=32, channels=3),
  "fashion_mnist": dict(image_size=32, channels=3),
  "mnist": dict(image_size=32, channels=3),
  # Sohn et al.: cats-vs-dogs at 64x64.
  "cats_vs_dogs": dict(image_size=64, channels=3),
  "folder": dict(image_size=32, channels=3),
  # MVTec AD categories (or look-alikes): label 0 good (normal), 1 defect.
  "mvtec": dict(image_size=256, channels=3),
  # scikit-learn's 8x8 digits, upsampled to 16x16 so that crops keep
  # detail; ~120 normal training images, so a small network and short run.
  "digits": dict(image_size=16, channels=1),
}
# Keys of `data` that a colon argument may name without the 'data.' prefix.
_DATA_SHORTHANDS = (
  "normal_class",
  "protocol",
  "data_dir",
  "folder",
  "category",
)


def base_config(method: str) -> ml_collections.ConfigDict:
  """Keys every method shares; method families add theirs on top."""
  c = ml_collections.ConfigDict()
  c.method = method  # A registered name, or an import path (extending.md).
  # Modules imported before the method is built, in every process that reads
  # the run (e.g. ones registering classifiers); docs/extending.md.
  c.plugins = ()
  c.seed = 1  # Sohn et al. script/run_*.sh: --seed=1.
  c.batch_size = 32  # Global, over all devices and hosts.
  # Duration: num_train_steps when > 0; -1 means num_epochs over the
  # (distribution-augmented) normal training set; 0 is refused.
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
  # Normal training images held out from training and fitting, to calibrate
  # thresholds and score normalisation (0: calibrate on the training ones).
  c.data.holdout_fraction = 0.1
  # Few-shot protocol: train and fit on a seeded subset of K normal training
  # images, taken after the held-out split (0: all of them).
  c.data.num_train_images = 0
  c.data.subset_seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.width = 64
  # Compute dtype of convolutions: 'float32' or 'bfloat16' (parameters,
  # BatchNorm statistics and losses stay float32; components/precision.py).
  c.dtype = "float32"
  # How convolutions are computed: 'auto' (on the CPU, per shape, the
  # path measured fastest, XLA's unless clearly beaten; XLA's elsewhere),
  # 'xla', 'taps', 'im2col' or 'im2col_cpu'; see components/conv.py.
  c.conv_weight_grad = "auto"
  # How transposed convolutions (the GAN and reverse distillation decoders)
  # run: 'subpixel' (stride-1 convolutions and depth-to-space), 'zeros'
  # (zero insertion), 'xla' (lhs_dilation) or 'auto' ('subpixel' on the
  # CPU, 'xla' elsewhere); see components/transposed_conv.py.
  c.transposed_conv = "subpixel"

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
  c.eval.scorer = ""  # The score that labels images; each config sets it.
  c.eval.fpr = 0.01  # Image threshold: this FPR on held-out normal images.
  c.eval.pixel_fpr = 0.01  # Pixel threshold, likewise (localising methods).
  # Which normal scores set the thresholds: 'holdout' (the held-out images)
  # or 'cross_fit' (also every training image, scored by the fitted stage
  # fitted without its fold of `calibration_folds`); see docs/detector.md.
  c.eval.calibration = "holdout"
  c.eval.calibration_folds = 5
  c.eval.num_overlays = 16  # Test images drawn to visualizations/.
  c.eval.plots = True  # ROC curve and score histogram per scorer.

  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  # Also save when this many seconds passed since the last save (0: off).
  c.checkpoint_every_secs = 0.0
  c.keep_checkpoints = 3
  c.halt_after_step = -1  # Stop (with a checkpoint) after this step, if > 0.
  c.progress_bar = True
  return c


def _parse_value(text: str, default):
  """The value of `text` as the type of `default` (a colon argument)."""
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


def current_value(config: ml_collections.ConfigDict, key: str):
  """The value at dotted `key`; ConfigError naming the key if there is none."""
  try:
    return config_path.get_value(key, config)
  except (KeyError, AttributeError, IndexError) as e:
    parent = key.rpartition(".")[0]
    known = ""
    try:
      node = config_path.get_value(parent, config) if parent else config
      if isinstance(node, ml_collections.ConfigDict):
        known = f" Known keys here: {', '.join(sorted(node.keys()))}."
    except (KeyError, AttributeError, IndexError):
      pass
    raise ConfigError(f"Unknown config key {key!r}.{known}") from e


def override(
  config: ml_collections.ConfigDict, values: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """Sets existing dotted keys in place ({'data.normal_class': 3}).

  Strings are parsed as the type of the value they replace, so values from
  a command line and typed values both work. Unknown keys raise.
  """
  parsed = {}
  for key, value in values.items():
    default = current_value(config, key)
    if isinstance(value, str) and not isinstance(default, str):
      value = _parse_value(value, default)
    parsed[key] = value
  config.update_from_flattened_dict(parsed)
  return config


# The word of every config file's preset of its smallest networks (tests).
TEST_PRESET = "test"


def apply_arg(
  config: ml_collections.ConfigDict,
  arg,
  small_run: Callable[[ml_collections.ConfigDict], None] | None = None,
  presets: Mapping[str, Callable[[ml_collections.ConfigDict], None]]
  | None = None,
) -> None:
  """Applies `name,key=value,...` from `--config=file.py:<arg>` in place.

  `small_run(config)` is the config file's preset for the tiny `digits` set
  (a run of a few CPU minutes); it runs after the common digits preset.
  `presets` are the config file's own words (e.g. 'mvtec_patch'), applied
  where they stand among the data set words.
  """
  if not arg:
    return
  tokens = [t.strip() for t in arg.split(",") if t.strip()]
  # Data set words first: their presets must not undo explicit key=values.
  for token in tokens:
    if "=" not in token:
      if presets and token in presets:
        presets[token](config)
      else:
        set_dataset(config, token, small_run)
  values = {}
  for token in tokens:
    if "=" in token:
      key, text = (s.strip() for s in token.split("=", 1))
      values["data." + key if key in _DATA_SHORTHANDS else key] = text
  class_name = values.get("data.normal_class", "0")
  if not class_name.lstrip("-").isdigit():
    del values["data.normal_class"]
  try:
    override(config, values)
    if "data.normal_class" not in values and class_name != "0":
      config.data.normal_class = class_index(config, class_name)
  except ConfigError as e:
    raise ConfigError(f"{e} (in {arg!r})") from e


def folder_class_names(folder: str) -> tuple[str, ...]:
  """Class names of an image folder: the class folders of train/ and test/,
  sorted (their index is the label)."""
  splits = [Path(folder) / s for s in ("train", "test")]
  return tuple(
    sorted(
      {
        p.name
        for split in splits
        if split.is_dir()
        for p in split.iterdir()
        if p.is_dir()
      }
    )
  )


def class_index(config, name: str) -> int:
  """The index of class `name` of the config's data set (folder data sets
  name classes by their folders); ConfigError listing them otherwise."""
  if config.data.name == "folder":
    names = folder_class_names(config.data.folder)
    if name in names:
      return names.index(name)
    listed = ", ".join(f"{i} {n}" for i, n in enumerate(names))
    raise ConfigError(
      f"normal_class={name!r} is not a class of the folder "
      f"{config.data.folder!r}"
      + (
        f"; its classes are {listed}."
        if names
        else " (it has no class folders in train/ or test/)."
      )
    )
  raise ConfigError(
    f"normal_class={name!r}: the {config.data.name} data set takes a "
    "class index (an integer); a run's dataset_info.json lists the class "
    "names by index."
  )


def set_dataset(
  config: ml_collections.ConfigDict, name: str, small_run=None
) -> None:
  """Selects a data set and its image size and channels."""
  if name not in DATASETS:
    raise ConfigError(
      f"Unknown data set {name!r}. Known: {', '.join(sorted(DATASETS))}; "
      "any root/<split>/<class>/*.jpg folder works with 'folder,"
      "folder=/path'."
    )
  config.data.name = name
  config.data.image_size = DATASETS[name]["image_size"]
  config.data.channels = DATASETS[name]["channels"]
  if name == "digits":
    # Class 1: raw pixels tell it apart worst (squared distance to the mean
    # image: AUROC 0.866 at 16x16; class 0: 1.0), so the quickstart shows
    # whether the learned features work. See experiments/RESULTS.md.
    config.data.normal_class = 1
    config.model.width = 16
    config.num_train_steps = 400
    config.data.shuffle_buffer = 2_000
    config.log_every_steps = 25
    config.checkpoint_every_steps = 100
    if small_run is not None:
      small_run(config)


def load(
  config_file,
  arg: str | None = None,
  overrides: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, plus dotted-key `overrides`.

  `config_file` is a path, or a method name for the repository's
  `configs/<name>.py`.
  """
  path = Path(config_file)
  if path.suffix != ".py":
    path = REPO_CONFIGS / f"{config_file}.py"
  if not path.is_file():
    raise ConfigError(
      f"No config file {path}; pass an existing one, e.g. configs/disaug.py."
    )
  spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return override(module.get_config(arg), overrides or {})
