"""One-class splits and the train / eval batch iterators the trainer uses.

Train batches are a pure function of (config.seed, step, host): epochs are
shuffled with a seed derived from the epoch index, every example carries its
position in the stream, and augmentations use stateless ops seeded from that
position, so `train_batches(config, start_step=k)` resumes exactly.
"""

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow as tf

from jax_oneclass import cli_checks, parallel
from jax_oneclass.data import augment as augment_lib
from jax_oneclass.data import sources
from jax_oneclass.errors import ConfigError, DataError

PROTOCOLS = ("one_class_normal", "one_class_anomalous")
_EPOCHS = 2**40  # "Forever" without int64 overflow of epoch * size.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about the configured one-class task.

  Attributes:
    image_shape: (H, W, C) after preprocessing.
    class_names: names of the source classes (label = index).
    num_train: normal training examples the model and the fitted stage see
      (all hosts), before rotation distribution augmentation; K when
      `config.data.num_train_images` = K > 0 (the few-shot protocol).
    num_test: examples in the whole test split.
    num_holdout: normal training examples held out for calibration
      (`config.data.holdout_fraction`; thresholds, normalisation).
    epoch_size: training examples per epoch (all hosts): `num_train`, 4x
      with `config.data.rotation_distaug` (see `examples_per_epoch`).
  """

  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  num_train: int
  num_test: int
  num_holdout: int = 0
  epoch_size: int = dataclasses.field(kw_only=True)


def examples_per_epoch(config, num_train: int) -> int:
  """Training examples per epoch: `num_train`, times the 4 rotated copies
  of each with `config.data.rotation_distaug`."""
  return num_train * (4 if config.data.get("rotation_distaug") else 1)


def _protocol(config) -> str:
  protocol = config.data.get("protocol", "one_class_normal")
  if protocol not in PROTOCOLS:
    raise ConfigError(
      f"Unknown config.data.protocol={protocol!r}; valid: "
      f"{', '.join(PROTOCOLS)}."
    )
  return protocol


def _check_class(config, source: sources.Source) -> int:
  c = config.data.normal_class
  n = len(source.class_names)
  if not isinstance(c, int) or not 0 <= c < n:
    names = ", ".join(
      f"{i}={name}" for i, name in enumerate(source.class_names)
    )
    raise ConfigError(
      f"config.data.normal_class={c!r} is out of range for "
      f"{source.name!r}: valid range 0..{n - 1} ({names})."
    )
  return c


def _image_shape(config) -> tuple[int, int, int]:
  return cli_checks.image_shape(config)


def holdout_fraction(config) -> float:
  """The checked `config.data.holdout_fraction`."""
  fraction = config.data.get("holdout_fraction", 0.0)
  if isinstance(fraction, bool) or not 0.0 <= fraction <= 0.5:
    raise ConfigError(
      f"config.data.holdout_fraction={fraction!r} must be a number in "
      "[0, 0.5]: the share of the normal training images held out to "
      "calibrate thresholds (0 calibrates on the training images)."
    )
  return float(fraction)


def num_held_out(num_normal: int, fraction: float) -> int:
  """How many of `num_normal` images `_is_held_out` selects."""
  return int(np.floor(num_normal * fraction + 1e-9))


def num_train_images(config, available: int) -> int:
  """The checked `config.data.num_train_images` (0 = all `available`)."""
  k = config.data.get("num_train_images", 0)
  if isinstance(k, bool) or not isinstance(k, int) or k < 0:
    raise ConfigError(
      f"config.data.num_train_images={k!r} must be an int >= 0: the number "
      "of normal training images to train and fit on (0 = all)."
    )
  if k > available:
    raise ConfigError(
      f"config.data.num_train_images={k} exceeds the {available} normal "
      "training images left after the held-out split "
      "(data.holdout_fraction); lower it, or set 0 to use all."
    )
  return k or available


def few_shot_indices(config, available: int) -> np.ndarray | None:
  """Sorted positions (among the `available` training images left after
  the held-out split) of the seeded subset `data.num_train_images` keeps,
  or None when it keeps all. Seeded by `data.subset_seed`, so the subset
  can change without changing the model's seed."""
  k = num_train_images(config, available)
  if k == available:
    return None
  rng = np.random.default_rng(int(config.data.get("subset_seed", 0)))
  return np.sort(rng.choice(available, k, replace=False))


def _is_held_out(index, fraction: float):
  """Every 1/fraction-th normal image, evenly spread: index i is held out
  when floor((i + 1) f) > floor(i f)."""
  i = tf.cast(index, tf.float64)
  return tf.floor((i + 1.0) * fraction + 1e-9) > tf.floor(i * fraction + 1e-9)


def _local_batch(batch_size: int) -> int:
  n = parallel.process_count()
  if batch_size <= 0 or batch_size % n:
    raise ConfigError(
      f"Batch size {batch_size} must be a positive multiple of "
      f"the number of hosts ({n})."
    )
  return batch_size // n


def _is_train_class(label, c: int, protocol: str):
  """True for the classes trained on (the 'normal' ones)."""
  return label == c if protocol == "one_class_normal" else label != c


def _is_anomaly(label, c: int, protocol: str):
  return tf.cast(tf.logical_not(_is_train_class(label, c, protocol)), tf.int32)


def _normal_counts(config, source: sources.Source) -> tuple[int, int]:
  """(normal training images, how many of them are held out)."""
  c = _check_class(config, source)
  train_counts = source.label_counts["train"]
  normal = int(train_counts[c])
  if _protocol(config) == "one_class_anomalous":
    normal = int(train_counts.sum()) - normal
  return normal, num_held_out(normal, holdout_fraction(config))


def dataset_info(config, source: sources.Source | None = None) -> DatasetInfo:
  """Returns shapes, class names and example counts of the configured task.

  `source` is the configured source when the caller has already built it.
  """
  source = source or sources.get_source(config)
  normal, held_out = _normal_counts(config, source)
  num_train = num_train_images(config, normal - held_out)
  return DatasetInfo(
    image_shape=_image_shape(config),
    class_names=source.class_names,
    num_train=num_train,
    num_test=int(source.label_counts["test"].sum()),
    num_holdout=held_out,
    epoch_size=examples_per_epoch(config, num_train),
  )


def _to_float(image, shape, source_name: str):
  """uint8 [h, w, c] -> float32 [H, W, C] in [0, 1] with the wanted shape."""
  size, _, channels = shape
  have = image.shape[-1]
  if have == 4:  # RGBA: drop alpha.
    image, have = image[..., :3], 3
  if have not in (1, 3):
    raise DataError(
      f"{source_name!r} images have {have} channels; only 1 "
      "(grayscale), 3 (RGB) or 4 (RGBA) can be converted. "
      "Convert the images to RGB or grayscale."
    )
  image = tf.image.convert_image_dtype(image, tf.float32)
  image = tf.image.resize(image, (size, size), antialias=True)
  if have == 1 and channels == 3:
    image = tf.tile(image, [1, 1, 3])
  elif have == 3 and channels == 1:
    image = tf.image.rgb_to_grayscale(image)
  image = tf.ensure_shape(image, shape)
  return tf.clip_by_value(image, 0.0, 1.0)


def _resize_mask(mask, size: int):
  """bool [h, w] -> bool [size, size], nearest neighbour (masks stay 0/1)."""
  mask = tf.image.resize(
    tf.cast(mask, tf.uint8)[..., None], (size, size), method="nearest"
  )
  return tf.ensure_shape(mask[..., 0] > 0, (size, size))


def _one_class_records(config, source, split: str):
  """This host's records of `split`.

  'train': the normal training images the model and fitted stage see
  (the `data.num_train_images` subset of those not held out, if set);
  'holdout': the normal training images held out for calibration; 'test':
  the whole test split.
  """
  ds = _normal_records(config, source, split)
  if split != "train" or not config.data.get("num_train_images", 0):
    return ds
  if parallel.process_count() > 1:
    raise ConfigError(
      "config.data.num_train_images is for one-host runs; "
      "leave it at 0 with several hosts."
    )
  normal, held_out = _normal_counts(config, source)
  keep = few_shot_indices(config, normal - held_out)
  if keep is None:
    return ds
  keep = tf.constant(keep, tf.int64)
  return (
    ds.enumerate()
    .filter(lambda index, unused: tf.reduce_any(tf.equal(index, keep)))
    .map(lambda unused, example: example)
  )


def _normal_records(config, source, split: str):
  """`_one_class_records` before the few-shot subset."""
  c = _check_class(config, source)
  protocol = _protocol(config)
  ds = source.records(
    "test" if split == "test" else "train",
    parallel.process_count(),
    parallel.process_index(),
  )
  if split == "test":
    return ds
  ds = ds.filter(lambda ex: _is_train_class(ex["label"], c, protocol))
  fraction = holdout_fraction(config)
  if not fraction:
    return ds.take(0) if split == "holdout" else ds
  want = split == "holdout"

  def in_split(index, unused_example):
    return _is_held_out(index, fraction) == want

  def drop_index(unused_index, example):
    return example

  return ds.enumerate().filter(in_split).map(drop_index)


def _count(ds: tf.data.Dataset) -> int:
  return int(ds.map(lambda ex: 1).reduce(np.int64(0), lambda a, x: a + 1))


def _with_rotations(ds, distaug: bool):
  """Adds 'rotation'; with distaug each record becomes 4 rotated copies."""
  if not distaug:
    return ds.map(lambda ex: {**ex, "rotation": tf.constant(0, tf.int32)})
  return ds.flat_map(
    lambda ex: tf.data.Dataset.range(4).map(
      lambda k: {**ex, "rotation": tf.cast(k, tf.int32)}
    )
  )


def _epoch_seed(seed: int, epoch):
  pair = tf.random.experimental.stateless_fold_in(
    tf.constant([seed, parallel.process_index()], tf.int64), epoch
  )
  return pair[0]


def train_batches(
  config, start_step: int = 0
) -> Iterator[dict[str, np.ndarray]]:
  """Yields this host's augmented training batches forever, from start_step.

  Each batch: 'image' float32 [b, V, H, W, C] in [0, 1], 'label' int32 [b],
  'is_anomaly' int32 [b] (all 0), 'rotation' int32 [b] (90-degree turns
  applied by distribution augmentation, 0 without it). With
  `config.data.patch_size` = p > 0 each example is one random p x p patch
  of its image (H = W = p), cut before the views are augmented, so all
  views show the same patch.
  """
  source = sources.get_source(config)
  info = dataset_info(config, source)
  local_b = _local_batch(config.batch_size)
  num_views = config.data.get("num_views", 1)
  if num_views < 1:
    raise ConfigError(f"config.data.num_views={num_views} must be >= 1.")
  augment = augment_lib.parse_augment(config.data.get("augment", ""))
  distaug = bool(config.data.get("rotation_distaug", False))
  c, protocol = _check_class(config, source), _protocol(config)
  seed = int(config.seed)
  patch, _ = cli_checks.patch_geometry(config)

  records = _one_class_records(config, source, "train")
  if source.cache_records:
    # Encoded bytes of the trained classes only; later epochs skip the
    # per-file reads of the whole split.
    records = records.cache()
  base = _with_rotations(records, distaug)
  if parallel.process_count() == 1:
    epoch_size = info.epoch_size
  else:
    epoch_size = _count(base)
  if epoch_size == 0:
    raise DataError(
      f"No training examples of class {c} on host "
      f"{parallel.process_index()}; check config.data.normal_class "
      "and config.data.protocol."
    )
  buffer = max(1, min(config.data.get("shuffle_buffer", 10_000), epoch_size))

  # Skip whole epochs arithmetically and only the remainder element-wise.
  start = start_step * local_b
  first_epoch, offset = divmod(start, epoch_size)

  def epoch_ds(epoch):
    shuffled = base.shuffle(
      buffer, seed=_epoch_seed(seed, epoch), reshuffle_each_iteration=False
    )
    positions = tf.data.Dataset.range(epoch_size).map(
      lambda i: epoch * epoch_size + i
    )
    return tf.data.Dataset.zip(positions, shuffled)

  ds = tf.data.Dataset.range(first_epoch, _EPOCHS).flat_map(epoch_ds)
  ds = ds.skip(offset)
  base_seed = tf.constant([seed, parallel.process_index()], tf.int64)

  def preprocess(position, ex):
    image = _to_float(source.decode(ex["image"]), info.image_shape, source.name)
    image = tf.image.rot90(image, ex["rotation"])
    example_seed = tf.random.experimental.stateless_fold_in(base_seed, position)
    if patch:
      image = tf.image.stateless_random_crop(
        image,
        (patch, patch, info.image_shape[2]),
        # Views fold in 0..V-1; the crop takes its own key.
        tf.random.experimental.stateless_fold_in(example_seed, -1),
      )
    views = [
      augment(image, tf.random.experimental.stateless_fold_in(example_seed, v))
      for v in range(num_views)
    ]
    return {
      "image": tf.stack(views),
      "label": ex["label"],
      "is_anomaly": _is_anomaly(ex["label"], c, protocol),
      "rotation": ex["rotation"],
    }

  ds = ds.map(
    preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
  )
  ds = ds.batch(local_b, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  yield from ds.as_numpy_iterator()


def _max_over_hosts(n: int) -> int:
  if parallel.process_count() == 1:
    return n
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return int(np.max(multihost_utils.process_allgather(np.int64(n))))


def _pad(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads every field to `size` rows with zeros (mask False)."""
  n = len(batch["mask"])
  return {
    k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
    for k, v in batch.items()
  }


FILENAME_BYTES = 256  # File names travel as fixed-width uint8 rows.
EVAL_SPLITS = ("train", "holdout", "test")


def encode_filenames(names) -> np.ndarray:
  """Byte strings -> uint8 [n, FILENAME_BYTES], zero-padded (cut if longer)."""
  out = np.zeros((len(names), FILENAME_BYTES), np.uint8)
  for i, name in enumerate(names):
    raw = np.frombuffer(bytes(name)[:FILENAME_BYTES], np.uint8)
    out[i, : len(raw)] = raw
  return out


def decode_filenames(rows: np.ndarray) -> list[str]:
  """The inverse of `encode_filenames`."""
  return [bytes(row).rstrip(b"\0").decode("utf-8", "replace") for row in rows]


def to_model_input(image, image_shape) -> np.ndarray:
  """One uint8 image [h, w, c] (any size; 1, 3 or 4 channels) as the model
  takes it: float32 [H, W, C] in [0, 1], resized as in training."""
  image = tf.convert_to_tensor(np.asarray(image, np.uint8))
  if image.shape.rank == 2:
    image = image[..., None]
  return _to_float(image, tuple(image_shape), "input").numpy()


def to_model_inputs(images, image_shape) -> np.ndarray:
  """uint8 images (a list or [N, ...]) as one float32 [N, H, W, C] batch.

  Images already at the model's shape are scaled in one vectorised step
  (equal to `to_model_input`: resizing to the same size is the identity);
  the others go through `to_model_input` one by one.
  """
  shape = tuple(image_shape)
  out = np.empty((len(images),) + shape, np.float32)
  same = {shape, shape[:2]} if shape[2] == 1 else {shape}
  ready = [
    i
    for i, x in enumerate(images)
    if np.asarray(x).dtype == np.uint8 and np.shape(x) in same
  ]
  if ready:
    stacked = np.stack([np.asarray(images[i]) for i in ready])
    out[ready] = stacked.reshape((len(ready),) + shape) * np.float32(1 / 255)
  for i in sorted(set(range(len(images))) - set(ready)):
    out[i] = to_model_input(images[i], shape)
  return out


def eval_batches(
  config, split: str, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
  """Yields this host's unaugmented batches of one split.

  `split`: 'train' (the normal images the model and fitted stage see),
  'holdout' (normal images held out for calibration) or 'test'. Each batch:
  'image' float32 [b, H, W, C] in [0, 1], 'label', 'is_anomaly' int32 [b],
  'mask' bool [b] (False on padding), for sources with pixel ground truth
  'pixel_mask' bool [b, H, W], and for sources with file names 'filename'
  uint8 [b, FILENAME_BYTES] (see `decode_filenames`). Nothing is dropped:
  the last batch is zero-padded and all hosts yield the same number of
  batches.
  """
  if split not in EVAL_SPLITS:
    raise ConfigError(f"Unknown eval split {split!r}; valid: {EVAL_SPLITS}.")
  source = sources.get_source(config)
  info = dataset_info(config, source)
  local_b = _local_batch(batch_size)
  c, protocol = _check_class(config, source), _protocol(config)
  ds = _one_class_records(config, source, split)
  num_batches = None
  if parallel.process_count() > 1:
    num_batches = _max_over_hosts(-(-_count(ds) // local_b))

  def preprocess(ex):
    out = {
      "image": _to_float(
        source.decode(ex["image"]), info.image_shape, source.name
      ),
      "label": ex["label"],
      "is_anomaly": _is_anomaly(ex["label"], c, protocol),
      "mask": tf.constant(True),
    }
    if source.decode_mask is not None:
      out["pixel_mask"] = _resize_mask(
        source.decode_mask(ex["mask"]), info.image_shape[0]
      )
    if "filename" in ex:
      out["filename"] = ex["filename"]
    return out

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_b).prefetch(tf.data.AUTOTUNE)
  emitted = 0
  for batch in ds.as_numpy_iterator():
    if "filename" in batch:
      batch["filename"] = encode_filenames(batch["filename"])
    yield _pad(batch, local_b)
    emitted += 1
  if num_batches is not None and emitted < num_batches:
    empty = {
      "image": np.zeros((local_b,) + info.image_shape, np.float32),
      "label": np.zeros(local_b, np.int32),
      "is_anomaly": np.zeros(local_b, np.int32),
      "mask": np.zeros(local_b, bool),
    }
    if source.decode_mask is not None:
      empty["pixel_mask"] = np.zeros((local_b,) + info.image_shape[:2], bool)
    if source.has_filenames:
      empty["filename"] = np.zeros((local_b, FILENAME_BYTES), np.uint8)
    for _ in range(num_batches - emitted):
      yield empty
