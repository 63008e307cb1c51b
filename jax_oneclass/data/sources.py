"""Raw image sources: each yields records {'image', 'label': int32}.

`Source.records` returns the *undecoded* records (encoded bytes for tfds and
image folders, uint8 arrays for in-memory data) so the pipeline can filter,
shuffle and skip before paying for decoding; `Source.decode` turns the
'image' field into uint8 [H, W, C].
"""

import dataclasses
import functools
import os
from typing import Callable, Mapping

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jax_oneclass.errors import ConfigError, DataError

# name -> (tfds name, label key, train split, test split).
_CATALOG = {
  "cifar10": ("cifar10", "label", "train", "test"),
  # Sohn et al. 2021 use the 20 CIFAR-100 super-classes as one-class tasks.
  "cifar100": ("cifar100", "coarse_label", "train", "test"),
  "fashion_mnist": ("fashion_mnist", "label", "train", "test"),
  "mnist": ("mnist", "label", "train", "test"),
  # cats_vs_dogs only ships a 'train' split: the first 80% is our train
  # split and the last 20% our test split.
  "cats_vs_dogs": ("cats_vs_dogs", "label", "train[:80%]", "train[80%:]"),
}
SOURCE_NAMES = ("digits",) + tuple(_CATALOG) + ("folder", "mvtec")
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Source:
  """A data set with a 'train' and a 'test' split.

  Attributes:
    name: source name, one of SOURCE_NAMES.
    class_names: class names; the label is the index into this tuple.
    label_counts: split -> int64 [num_classes] examples per class (all hosts).
    records: (split, num_shards, shard_index) -> tf.data of undecoded records.
    decode: undecoded 'image' field -> uint8 [H, W, C] tensor.
    cache_records: whether the (filtered) train records should be cached in
      memory, for sources that read every file of a split to select a class.
    decode_mask: for sources with pixel ground truth, the records' undecoded
      'mask' field -> bool [H, W] (True = anomalous pixel); else None.
    has_filenames: whether records carry 'filename' (a string).
  """

  name: str
  class_names: tuple[str, ...]
  label_counts: Mapping[str, np.ndarray]
  records: Callable[[str, int, int], tf.data.Dataset]
  decode: Callable[[tf.Tensor], tf.Tensor]
  cache_records: bool = False
  decode_mask: Callable[[tf.Tensor], tf.Tensor] | None = None
  has_filenames: bool = False


def get_source(config) -> Source:
  """Returns the Source named by `config.data.name`."""
  name = config.data.name
  if name == "digits":
    return _digits_source()
  if name in _CATALOG:
    return _catalog_source(name, config.data.get("data_dir"))
  if name == "folder":
    return _folder_source(config.data.get("folder"))
  if name == "mvtec":
    return _mvtec_source(
      config.data.get("folder"),
      config.data.get("category") or None,
      config.data.get("data_dir"),
    )
  raise ConfigError(
    f"Unknown data set config.data.name={name!r}; valid names: "
    f"{', '.join(SOURCE_NAMES)}."
  )


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ConfigError(f"Unknown split {split!r}; valid splits: {SPLITS}.")


# ----------------------------------------------------------------- digits ---


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """scikit-learn digits with a fixed stratified 2/3 : 1/3 split."""
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
    images, labels, test_size=1 / 3, random_state=0, stratify=labels
  )
  return {"train": (x_tr, y_tr), "test": (x_te, y_te)}


def _digits_source() -> Source:
  arrays = _digits_arrays()

  def records(split, num_shards, index):
    _check_split(split)
    images, labels = arrays[split]
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
    return ds.shard(num_shards, index)

  return Source(
    name="digits",
    class_names=tuple(str(i) for i in range(10)),
    label_counts={
      s: np.bincount(y, minlength=10) for s, (_, y) in arrays.items()
    },
    records=records,
    decode=lambda image: image,
  )


# ---------------------------------------------------------------- catalog ---


def _not_prepared_error(name: str, data_dir) -> DataError:
  where = data_dir or "~/tensorflow_datasets (the tfds default)"
  return DataError(
    f"Data set {name!r} is not prepared in {where} and nothing is "
    "downloaded here. Either (1) run `tfds build "
    f"{name} [--data_dir=/path/to/tensorflow_datasets]` on a machine with "
    "network access and copy the directory here, (2) pass "
    "--config.data.data_dir=/path/to/tensorflow_datasets pointing at a "
    "prepared copy, or (3) use a local image folder with "
    "--config.data.name=folder "
    "--config.data.folder=/path/with/train_and_test_subfolders "
    "(layout <folder>/{train,test}/<class>/*.jpg|png)."
  )


def _catalog_builder(name: str, data_dir):
  tfds_name = _CATALOG[name][0]
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  except Exception as e:  # tfds raises several types here.
    raise _not_prepared_error(tfds_name, data_dir) from e
  if not builder.is_prepared():
    raise _not_prepared_error(tfds_name, data_dir)
  return builder


@functools.lru_cache(maxsize=None)
def _catalog_label_counts(name: str, data_dir, split: str) -> np.ndarray:
  """Counts labels by reading only the label field (images stay encoded)."""
  _, label_key, *_ = _CATALOG[name]
  builder = _catalog_builder(name, data_dir)
  ds = builder.as_dataset(
    split=split, decoders={"image": tfds.decode.SkipDecoding()}
  )
  ds = ds.map(lambda ex: ex[label_key]).batch(8192)
  num_classes = builder.info.features[label_key].num_classes
  counts = np.zeros(num_classes, np.int64)
  for labels in ds.as_numpy_iterator():
    counts += np.bincount(labels, minlength=num_classes)
  return counts


def _catalog_source(name: str, data_dir) -> Source:
  _, label_key, train_split, test_split = _CATALOG[name]
  builder = _catalog_builder(name, data_dir)
  tfds_splits = {"train": train_split, "test": test_split}
  image_feature = builder.info.features["image"]

  def records(split, num_shards, index):
    _check_split(split)
    shard = tfds.even_splits(tfds_splits[split], n=num_shards)[index]
    ds = builder.as_dataset(
      split=shard, decoders={"image": tfds.decode.SkipDecoding()}
    )
    return ds.map(
      lambda ex: {
        "image": ex["image"],
        "label": tf.cast(ex[label_key], tf.int32),
      }
    )

  return Source(
    name=name,
    class_names=tuple(builder.info.features[label_key].names),
    label_counts={
      s: _catalog_label_counts(name, data_dir, tfds_splits[s]) for s in SPLITS
    },
    records=records,
    decode=image_feature.decode_example,
  )


# ----------------------------------------------------------------- folder ---

_FOLDER_LAYOUT = (
  "expected layout: <folder>/train/<class>/*.jpg|png and "
  "<folder>/test/<class>/*.jpg|png; class indices follow the "
  "alphabetical order of the class folder names"
)
# tf.io.decode_image reads these; WebP and TIFF go through PIL.
_TF_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_PIL_EXTENSIONS = (".webp", ".tif", ".tiff")
_FOLDER_EXTENSIONS = _TF_EXTENSIONS + _PIL_EXTENSIONS


@functools.lru_cache(maxsize=8)
def _list_folder(root: str) -> tuple[tuple[str, ...], dict]:
  """(class names, split -> (paths, labels)) of a checked image folder.

  Every image file is decoded once: ones that fail are skipped, named in a
  warning; so are files of other extensions. Raises DataError when a class
  folder or a split is left with no readable image.
  """
  from jax_oneclass import logging_utils  # pylint: disable=g-import-not-at-top
  from jax_oneclass.data import mvtec  # pylint: disable=g-import-not-at-top

  class_names = tuple(
    sorted(
      {
        d.rstrip("/")
        for split in SPLITS
        for d in tf.io.gfile.listdir(os.path.join(root, split))
        if tf.io.gfile.isdir(os.path.join(root, split, d))
      }
    )
  )
  bad, other, listed = [], [], {}
  emptied = set()  # Class folders none of whose images decode.
  for split in SPLITS:
    paths, labels = [], []
    for label, name in enumerate(class_names):
      class_dir = os.path.join(root, split, name)
      files = (
        sorted(tf.io.gfile.listdir(class_dir))
        if tf.io.gfile.isdir(class_dir)
        else []
      )
      failed = readable = 0
      for f in files:
        path = os.path.join(class_dir, f)
        if tf.io.gfile.isdir(path) or f.startswith("."):
          continue
        if not f.lower().endswith(_FOLDER_EXTENSIONS):
          other.append(os.path.join(split, name, f))
          continue
        why = mvtec.unreadable_image(path)
        if why is not None:
          bad.append(f"{os.path.join(split, name, f)} ({why})")
          failed += 1
          continue
        paths.append(path)
        labels.append(label)
        readable += 1
      if failed and not readable:
        emptied.add(class_dir)
    listed[split] = (paths, np.asarray(labels, np.int32))
  if bad:
    logging_utils.warn(
      f"Skipped {len(bad)} image files of {root} that cannot be decoded: "
      f"{'; '.join(bad[:5])}" + (" ..." if len(bad) > 5 else "") + "."
    )
  if other:
    logging_utils.warn(
      f"Skipped {len(other)} files of {root} that are not images by their "
      f"extension (read: {', '.join(_FOLDER_EXTENSIONS)}); e.g. "
      f"{other[0]}."
    )
  if emptied:
    raise DataError(
      f"No image of {', '.join(sorted(emptied))} can be decoded (see the "
      "warning above); replace the files, or remove the folder."
    )
  for split, (paths, _) in listed.items():
    if not paths:
      raise DataError(
        f"Image folder {root!r} has no readable images in its {split!r} "
        "split"
        + (f" ({len(bad)} files could not be decoded)" if bad else "")
        + f"; {_FOLDER_LAYOUT}."
      )
  return class_names, listed


def _pil_decode(encoded: bytes) -> np.ndarray:
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if isinstance(encoded, np.ndarray):  # tf.numpy_function's 0-d array.
    encoded = encoded.item()
  with Image.open(io.BytesIO(encoded)) as image:
    return np.asarray(image.convert("RGB"))


def decode_any_image(encoded: tf.Tensor) -> tf.Tensor:
  """uint8 [H, W, 3] from PNG, JPEG, BMP, GIF (first frame), WebP or TIFF
  bytes."""
  head = tf.strings.substr(encoded, 0, 4)
  by_pil = tf.reduce_any(tf.equal(head, [b"RIFF", b"II*\x00", b"MM\x00*"]))
  image = tf.cond(
    by_pil,
    lambda: tf.numpy_function(_pil_decode, [encoded], tf.uint8, stateful=False),
    lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
  )
  image.set_shape([None, None, 3])
  return image


def _folder_source(root) -> Source:
  if not root or not tf.io.gfile.isdir(root):
    raise DataError(
      f"Image folder config.data.folder={root!r} does not exist "
      f"or is not a directory; {_FOLDER_LAYOUT}."
    )
  for split in SPLITS:
    if not tf.io.gfile.isdir(os.path.join(root, split)):
      raise DataError(
        f"Image folder {root!r} has no {split!r} subfolder; {_FOLDER_LAYOUT}."
      )
  root = os.path.abspath(root)
  class_names, listed = _list_folder(root)
  counts = {
    s: np.bincount(labels, minlength=len(class_names)).astype(np.int64)
    for s, (_, labels) in listed.items()
  }
  start = len(os.path.join(root, ""))

  def records(split, num_shards, index):
    _check_split(split)
    paths, labels = listed[split]
    ds = tf.data.Dataset.from_tensor_slices(
      {"path": paths, "label": labels, "filename": [p[start:] for p in paths]}
    )
    ds = ds.shard(num_shards, index)
    return ds.map(
      lambda ex: {
        "image": tf.io.read_file(ex["path"]),
        "label": ex["label"],
        "filename": ex["filename"],
      }
    )

  return Source(
    name="folder",
    class_names=class_names,
    label_counts=counts,
    records=records,
    decode=decode_any_image,
    cache_records=True,
    has_filenames=True,
  )


# ------------------------------------------------------------------ mvtec ---


def _mvtec_source(root, category, data_dir) -> Source:
  """One MVTec AD (or look-alike) category; labels 0 = good, 1 = defect.

  Prepared on first use from the folder (see `data.mvtec`). Records carry
  the encoded pixel mask too (`decode_mask`); one-class protocols with
  normal_class=0 (good) apply.
  """
  from jax_oneclass.data import mvtec  # pylint: disable=g-import-not-at-top

  if not root:
    raise DataError(
      "Set config.data.folder to the extracted MVTec AD folder "
      "(holding <category>/) and config.data.category, or to "
      "one category folder laid out like MVTec AD."
    )
  builder = mvtec.build_mvtec_like(root, category, data_dir)
  skip = {
    "image": tfds.decode.SkipDecoding(),
    "mask": tfds.decode.SkipDecoding(),
  }

  def records(split, num_shards, index):
    _check_split(split)
    shard = tfds.even_splits(split, n=num_shards)[index]
    ds = builder.as_dataset(split=shard, decoders=skip)
    return ds.map(
      lambda ex: {
        "image": ex["image"],
        "mask": ex["mask"],
        "label": tf.cast(ex["label"], tf.int32),
        "filename": ex["filename"],
      }
    )

  mask_feature = builder.info.features["mask"]

  def decode_mask(encoded):
    return mask_feature.decode_example(encoded)[..., 0] > 0

  def label_counts(split):
    saved = builder.info.metadata.get("label_counts", {}).get(split)
    if saved is not None:
      return np.asarray(saved, np.int64)
    # Prepared before the counts were saved: count the records once.
    labels = builder.as_dataset(split=split, decoders=skip).map(
      lambda ex: ex["label"]
    )
    return np.bincount(
      list(labels.as_numpy_iterator()), minlength=len(mvtec.LABEL_NAMES)
    ).astype(np.int64)

  return Source(
    name="mvtec",
    class_names=mvtec.LABEL_NAMES,
    label_counts={s: label_counts(s) for s in SPLITS},
    records=records,
    decode=builder.info.features["image"].decode_example,
    decode_mask=decode_mask,
    has_filenames=True,
  )
