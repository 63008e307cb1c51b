"""Checks of command-line input that need neither JAX nor TensorFlow.

The CLI (and the sweep) run them before the heavy imports, so that a bad
flag, config or path fails in a second, as one line. Each check raises a
`OneClassError` whose message says what to do instead. This module must
not import JAX or TensorFlow (tests/test_bad_input.py holds it to that).
"""

import glob
import json
import os
from pathlib import Path

import ml_collections

from jax_oneclass import plugins
from jax_oneclass.config import folder_class_names
from jax_oneclass.errors import CheckpointError, ConfigError, DataError

# jax_oneclass.methods.available_methods(), which imports JAX to tell.
METHODS = (
  "clr",
  "dgad",
  "disaug",
  "ganomaly",
  "gradient_preference",
  "reverse_distillation",
  "rotnet",
)
# Classes of the built-in data sets (CIFAR-100: its 20 super-classes;
# MVTec AD: good and defect).
NUM_CLASSES = {
  "digits": 10,
  "cifar10": 10,
  "cifar100": 20,
  "fashion_mnist": 10,
  "mnist": 10,
  "cats_vs_dogs": 2,
  "mvtec": 2,
}
DATA_SETS = tuple(sorted([*NUM_CLASSES, "folder"]))
EXPORT_FORMATS = ("jax", "savedmodel", "onnx")
EXPLANATIONS = ("integrated_gradients", "gradcam")  # jax_oneclass.explain
IG_BASELINES = ("mean", "black")  # Mean normal training image, or zeros.
IMAGE_SUFFIXES = (
  ".png",
  ".jpg",
  ".jpeg",
  ".bmp",
  ".gif",
  ".tif",
  ".tiff",
  ".webp",
)
FOLDER_LAYOUT = (
  "expected layout: <folder>/train/<class>/*.jpg|png and "
  "<folder>/test/<class>/*.jpg|png; class indices follow the "
  "alphabetical order of the class folder names"
)
_NOT_A_RUN = "train first (--mode=train) or point --workdir at a trained run"


def check_method(
  name: str, plugin_names=(), needed_by: str = "the run"
) -> None:
  """`name` (config.method) is a method of jax_oneclass.methods or a module
  that can be found. Another name passes when plugins (imported later, with
  JAX) may register it."""
  if name in METHODS:
    return
  if isinstance(name, str) and "." in name:
    plugins.check_findable(name, "config.method", needed_by)
  elif not plugin_names:
    raise ConfigError(
      f"Unknown method {name!r}. Available methods: {', '.join(METHODS)}; "
      "or an import path of a module defining Method, or a name that a "
      "module in config.plugins registers (docs/extending.md)."
    )


def check_method_of(config, needed_by: str = "the run") -> None:
  """config.plugins can be found, then config.method (see check_method)."""
  plugins.check_plugins(config, needed_by)
  check_method(config.method, plugins.plugin_names(config), needed_by)


def check_folder_data(folder: str) -> None:
  """An image folder data set: <folder>/train/ and <folder>/test/."""
  if not folder or not os.path.isdir(folder):
    raise DataError(
      f"Image folder config.data.folder={folder!r} does not "
      f"exist or is not a directory; {FOLDER_LAYOUT}."
    )
  for split in ("train", "test"):
    if not os.path.isdir(os.path.join(folder, split)):
      raise DataError(
        f"Image folder {folder!r} has no {split!r} subfolder; {FOLDER_LAYOUT}."
      )
  if not os.access(folder, os.R_OK | os.X_OK):
    raise DataError(f"Image folder {folder!r} cannot be read (no permission).")


def _mvtec_prepared(category: str, data_dir) -> bool:
  """Whether tfds data of an MVTec category may already be prepared (runs
  then need no source folder)."""
  dirs = [
    data_dir,
    os.environ.get("TFDS_DATA_DIR"),
    os.path.expanduser("~/tensorflow_datasets"),
  ]
  return any(
    d and os.path.isdir(os.path.join(d, "mvtec_ad", category)) for d in dirs
  )


def check_mvtec_data(folder: str, category: str, data_dir=None) -> None:
  """An MVTec AD (or look-alike) folder, unless its data is prepared."""
  if not folder:
    raise DataError(
      "Set config.data.folder to the extracted MVTec AD folder "
      "(holding <category>/) and config.data.category, or to "
      "one category folder laid out like MVTec AD."
    )
  root = folder.rstrip("/") or "/"
  if not category:
    root, category = os.path.split(root)
  if _mvtec_prepared(category, data_dir):
    return
  if not os.path.isdir(root):
    raise DataError(
      f"MVTec root folder {root!r} does not exist; pass the "
      "extracted mvtec_anomaly_detection folder (or a folder "
      "laid out like it)."
    )
  if not os.path.isdir(os.path.join(root, category)):
    raise DataError(
      f"No folder {os.path.join(root, category)!r} for MVTec "
      f"AD category {category!r}; the categories are the "
      f"subfolders of {root!r}."
    )


def num_classes(config) -> int:
  """How many classes the config's data set has, without reading it."""
  if config.data.name == "folder":
    return len(folder_class_names(config.data.folder))
  return NUM_CLASSES[config.data.name]


def image_shape(config) -> tuple[int, int, int]:
  """(size, size, channels) of the model input; DataError if the config's
  `data.image_size` or `data.channels` cannot be one."""
  size, channels = config.data.image_size, config.data.channels
  if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
    raise DataError(
      f"config.data.image_size={size!r} must be a positive int "
      "(the square side in pixels); set it e.g. to 32."
    )
  if channels not in (1, 3):
    raise DataError(f"config.data.channels={channels!r} must be 1 or 3.")
  return (size, size, channels)


def patch_geometry(config) -> tuple[int, int]:
  """(patch side, stride) of the two-stage patch mode, (0, 0) when off
  (`data.patch_size` 0 or absent); ConfigError when they cannot tile
  the image. `eval.patch_stride` 0 means half the patch side."""
  patch = config.data.get("patch_size", 0)
  if not patch:
    return 0, 0
  size = image_shape(config)[0]
  if isinstance(patch, bool) or not isinstance(patch, int) or patch < 0:
    raise ConfigError(
      f"config.data.patch_size={patch!r} must be an int >= 0 (0: whole "
      "images; e.g. 32 to train and score 32x32 patches)."
    )
  if patch > size:
    raise ConfigError(
      f"config.data.patch_size={patch} exceeds config.data.image_size="
      f"{size}: patches are cut from the {size}x{size} images."
    )
  stride = config.eval.get("patch_stride", 0)
  if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
    raise ConfigError(
      f"config.eval.patch_stride={stride!r} must be an int >= 0 (0: half "
      "the patch side)."
    )
  stride = stride or max(patch // 2, 1)
  if stride > patch:
    raise ConfigError(
      f"config.eval.patch_stride={stride} exceeds config.data.patch_size="
      f"{patch}: pixels between patches would get no score; set a stride "
      f"<= {patch}."
    )
  return patch, stride


def check_data(config) -> None:
  """The data set exists (its folder too), has data.normal_class, and its
  image size and channels are valid."""
  name = config.data.name
  if name not in DATA_SETS:
    raise ConfigError(
      f"Unknown data set config.data.name={name!r}; valid "
      f"names: {', '.join(DATA_SETS)}."
    )
  if name == "folder":
    check_folder_data(config.data.folder)
  elif name == "mvtec":
    check_mvtec_data(
      config.data.folder,
      config.data.get("category", ""),
      config.data.get("data_dir"),
    )
  image_shape(config)
  patch_geometry(config)
  c, n = config.data.normal_class, num_classes(config)
  if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < n:
    raise ConfigError(
      f"config.data.normal_class={c!r} is out of range for "
      f"{name!r}: valid range 0..{n - 1} ({n} classes)."
    )


def check_duration(config) -> None:
  """num_train_steps > 0, or -1 (the default) for num_epochs > 0 epochs."""
  steps, epochs = config.num_train_steps, config.num_epochs
  if steps == 0:
    raise ConfigError(
      "config.num_train_steps=0 would train nothing. Pass a number of "
      "steps > 0, or --config.num_train_steps=-1 to train for "
      f"config.num_epochs ({epochs:g}) epochs, the paper's schedule."
    )
  if steps < 0 and epochs <= 0:
    raise ConfigError(
      f"config.num_train_steps={steps} asks for config.num_epochs epochs, "
      f"but num_epochs is {epochs:g}: set --config.num_epochs > 0 or "
      "--config.num_train_steps > 0."
    )


def check_train_args(config, needed_by: str = "the run") -> None:
  """What training a config needs: findable plugins, a known method, a
  duration and existing data."""
  check_method_of(config, needed_by)
  check_duration(config)
  check_data(config)


def check_workdir_is_run(workdir, needs_config: bool = True) -> None:
  """`workdir` holds a trained run: a checkpoint and (with `needs_config`,
  i.e. no --config given) its config.json."""
  path = Path(workdir)
  if not path.is_dir():
    raise CheckpointError(f"--workdir={workdir} does not exist: {_NOT_A_RUN}.")
  checkpoints = path / "checkpoints"
  try:
    steps = [p for p in checkpoints.iterdir() if p.name.isdigit()]
  except FileNotFoundError:
    steps = []
  except OSError as e:
    raise CheckpointError(f"Cannot read {checkpoints} ({e.strerror}).") from e
  if not steps:
    raise CheckpointError(f"No checkpoint in {checkpoints}: {_NOT_A_RUN}.")
  if needs_config and not (path / "config.json").is_file():
    raise ConfigError(
      f"No config.json in {workdir}: point --workdir at a "
      "trained run, or pass --config."
    )


def saved_config(workdir):
  """A run's config.json as a ConfigDict, or None if missing or unreadable
  (the run's own loading then says why)."""
  try:
    return ml_collections.ConfigDict(
      json.loads((Path(workdir) / "config.json").read_text())
    )
  except (OSError, ValueError):
    return None


def check_output_dir(path, flag: str = "--output") -> None:
  """`path` is a folder that exists or can be made, and can be written."""
  if not path:
    raise ConfigError(f"{flag} is needed: a folder to write the results to.")
  path = Path(os.path.abspath(path))
  existing = path
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise ConfigError(
      f"Cannot write to {flag}={path}: {existing} is a file, "
      "not a folder; pass a folder."
    )
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(
      f"Cannot write to {flag}={path} (read-only or no "
      f"permission in {existing}): pass a writable folder."
    )


def list_images(source) -> list[Path]:
  """Image files named by a file, a folder (not recursive) or a glob."""
  text = os.fspath(source)
  path = Path(text)
  if path.is_dir():
    return sorted(
      p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
    )
  if path.is_file():
    return [path]
  if any(c in text for c in "*?["):
    return sorted(
      Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()
    )
  raise DataError(
    f"--input {text!r} is no file, folder or glob pattern; "
    "name an image file, a folder of images or e.g. "
    "'images/*.png'."
  )


def check_input_path(source) -> None:
  """`source` (--input) names readable image files."""
  if not source:
    raise DataError(
      "Predicting needs --input: an image file, a folder of "
      "images or a glob such as 'images/*.png'."
    )
  try:
    paths = list_images(source)
  except PermissionError as e:
    raise DataError(
      f"--input {source!r} cannot be read (no permission)."
    ) from e
  if not paths:
    raise DataError(
      f"--input {source!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})."
    )
  if not any(os.access(p, os.R_OK) for p in paths):
    raise DataError(
      f"None of the {len(paths)} files of --input {source!r} "
      "can be read (no permission)."
    )


def explanations(names: str, steps: int = 64) -> tuple[str, ...]:
  """The explanations a comma-separated --explain names (checked, in
  order, without repeats), and a usable --explain_steps."""
  chosen = tuple(
    dict.fromkeys(n.strip() for n in names.split(",") if n.strip())
  )
  unknown = [n for n in chosen if n not in EXPLANATIONS]
  if unknown:
    raise ConfigError(
      f"Unknown explanation {unknown[0]!r} in --explain; choose from "
      f"{', '.join(EXPLANATIONS)} (comma-separated)."
    )
  if chosen and steps < 1:
    raise ConfigError(f"--explain_steps must be >= 1, got {steps}.")
  return chosen
