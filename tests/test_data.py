"""Fast tests of jax_oneclass.data on digits and tiny image folders."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import itertools  # pylint: disable=g-import-not-at-top

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

tf.config.set_visible_devices([], "GPU")

from jax_oneclass import data  # pylint: disable=g-import-not-at-top
from jax_oneclass.data import sources  # pylint: disable=g-import-not-at-top
from jax_oneclass.errors import ConfigError, DataError  # pylint: disable=g-import-not-at-top

_AUG = (
  "random_resized_crop(0.5)|flip_lr|color_jitter(0.4,0.4,0.4,0.1,p=0.8)"
  "|grayscale(p=0.2)|blur(p=0.5)"
)


def make_config(**data_overrides):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 8
  config.data = ml_collections.ConfigDict(
    dict(
      name="digits",
      normal_class=3,
      protocol="one_class_normal",
      data_dir=None,
      folder="",
      image_size=8,
      channels=1,
      augment="",
      num_views=1,
      shuffle_buffer=64,
      rotation_distaug=False,
    )
  )
  config.data.update(data_overrides)
  return config


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def test_digits_info_and_train_batches():
  config = make_config(augment=_AUG, num_views=2, channels=3)
  info = data.dataset_info(config)
  assert info.image_shape == (8, 8, 3)
  assert info.class_names == tuple("0123456789")
  assert 0 < info.num_train < 1797 * 2 // 3 // 5
  assert info.num_test == 599  # ceil(1797 / 3)
  batch = take(data.train_batches(config), 1)[0]
  assert batch["image"].shape == (8, 2, 8, 8, 3)
  assert batch["image"].dtype == np.float32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert not np.allclose(batch["image"][:, 0], batch["image"][:, 1])
  assert (batch["label"] == 3).all() and (batch["is_anomaly"] == 0).all()
  assert (batch["rotation"] == 0).all()
  assert batch["label"].dtype == np.int32


def test_digits_scaling_without_augmentation():
  config = make_config()
  batch = next(data.eval_batches(config, "train", 16))
  images = batch["image"][batch["mask"]]
  assert images.max() == 1.0 and images.min() == 0.0
  levels = np.round(images * 255)
  assert np.isin(levels, np.round(np.arange(17) * 255 / 16)).all()


def test_one_class_anomalous_protocol():
  config = make_config(protocol="one_class_anomalous")
  info = data.dataset_info(config)
  normal_info = data.dataset_info(make_config())
  assert info.num_train > 8 * normal_info.num_train
  labels = np.concatenate(
    [b["label"] for b in take(data.train_batches(config), 20)]
  )
  assert (labels != 3).all() and len(np.unique(labels)) == 9
  test = list(data.eval_batches(config, "test", 32))
  mask = np.concatenate([b["mask"] for b in test])
  labels = np.concatenate([b["label"] for b in test])[mask]
  is_anomaly = np.concatenate([b["is_anomaly"] for b in test])[mask]
  np.testing.assert_array_equal(is_anomaly, (labels == 3).astype(np.int32))


def test_eval_batches_pad_and_keep_everything():
  config = make_config()
  info = data.dataset_info(config)
  batches = list(data.eval_batches(config, "test", 7))
  assert info.num_test % 7
  assert all(b["image"].shape == (7, 8, 8, 1) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == info.num_test and len(batches) == -(-info.num_test // 7)
  assert mask[: info.num_test].all() and not mask[info.num_test :].any()
  last = batches[-1]
  assert (last["image"][~last["mask"]] == 0).all()
  labels = np.concatenate([b["label"] for b in batches])[mask]
  is_anomaly = np.concatenate([b["is_anomaly"] for b in batches])[mask]
  assert set(labels) == set(range(10))
  np.testing.assert_array_equal(is_anomaly, (labels != 3).astype(np.int32))
  train = list(data.eval_batches(config, "train", 7))
  train_mask = np.concatenate([b["mask"] for b in train])
  assert train_mask.sum() == info.num_train
  assert (np.concatenate([b["label"] for b in train])[train_mask] == 3).all()


def test_exact_resume_with_augmentation_and_distaug():
  config = make_config(
    augment=_AUG + "|rotate90",
    num_views=2,
    rotation_distaug=True,
    shuffle_buffer=100,
  )
  info = data.dataset_info(config)
  # Cross an epoch boundary: 4 * num_train examples per epoch.
  assert info.epoch_size == 4 * info.num_train
  steps = info.epoch_size // config.batch_size + 3
  full = take(data.train_batches(config), steps)
  resumed = take(data.train_batches(config, start_step=steps - 5), 5)
  for a, b in zip(full[-5:], resumed):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  rotations = np.concatenate([b["rotation"] for b in full])
  assert set(rotations) == {0, 1, 2, 3}
  # Resume inside the second epoch (whole epochs are skipped arithmetically).
  again = take(data.train_batches(config, start_step=steps - 2), 2)
  for a, b in zip(full[-2:], again):
    np.testing.assert_array_equal(a["image"], b["image"])
  again = take(data.train_batches(config, start_step=3), 2)
  for a, b in zip(full[3:5], again):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_different_seeds_differ():
  a = next(data.train_batches(make_config(augment="flip_lr")))
  config = make_config(augment="flip_lr")
  config.seed = 1
  b = next(data.train_batches(config))
  assert not np.array_equal(a["image"], b["image"])


def test_rotation_distaug_rotates_before_views():
  config = make_config(rotation_distaug=True, num_views=2, image_size=8)
  batch = take(data.train_batches(config), 1)[0]
  # No augmentation: both views of a rotated copy are identical.
  np.testing.assert_array_equal(batch["image"][:, 0], batch["image"][:, 1])


def _write_folder(root, splits=("train", "test"), classes=("a", "b"), n=5):
  rng = np.random.default_rng(0)
  for split in splits:
    for cls in classes:
      os.makedirs(root / split / cls)
      for i in range(n):
        pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_folder_source(tmp_path):
  _write_folder(tmp_path)
  config = make_config(
    name="folder",
    folder=str(tmp_path),
    normal_class=1,
    channels=3,
    augment=_AUG,
  )
  config.batch_size = 4
  info = data.dataset_info(config)
  assert info == data.DatasetInfo((8, 8, 3), ("a", "b"), 5, 10, epoch_size=5)
  batches = take(data.train_batches(config), 6)
  # Exact resume also holds with the in-memory cache of folder records.
  for a, b in zip(batches[3:], take(data.train_batches(config, 3), 3)):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert batches[0]["image"].shape == (4, 1, 8, 8, 3)
  assert all((b["label"] == 1).all() for b in batches)
  test = list(data.eval_batches(config, "test", 4))
  assert len(test) == 3
  mask = np.concatenate([b["mask"] for b in test])
  labels = np.concatenate([b["label"] for b in test])[mask]
  assert mask.sum() == 10 and sorted(labels) == [0] * 5 + [1] * 5
  gray = make_config(
    name="folder", folder=str(tmp_path), channels=1, normal_class=0
  )
  assert next(data.eval_batches(gray, "train", 2))["image"].shape == (
    2,
    8,
    8,
    1,
  )


def test_errors(tmp_path):
  with pytest.raises(ConfigError, match="cifar10.*folder"):
    data.dataset_info(make_config(name="imagenet"))
  with pytest.raises(ConfigError, match=r"0\.\.9"):
    data.dataset_info(make_config(normal_class=10))
  with pytest.raises(DataError, match="expected layout"):
    data.dataset_info(make_config(name="folder", folder=str(tmp_path / "no")))
  _write_folder(tmp_path / "only_train", splits=("train",))
  with pytest.raises(DataError, match="'test'"):
    data.dataset_info(
      make_config(name="folder", folder=str(tmp_path / "only_train"))
    )
  with pytest.raises(ConfigError, match="known ops.*flip_lr"):
    next(data.train_batches(make_config(augment="flip_lr|sharpen(0.3)")))
  with pytest.raises(ConfigError, match="Bad arguments"):
    data.parse_augment("blur(p=0.5, radius=3)")
  with pytest.raises(DataError, match="image_size"):
    data.dataset_info(make_config(image_size=0))
  with pytest.raises(ConfigError, match="multiple"):
    config = make_config()
    config.batch_size = 0
    next(data.train_batches(config))


def test_unprepared_catalog_data_set(tmp_path):
  config = make_config(name="cifar10", data_dir=str(tmp_path))
  with pytest.raises(DataError) as e:
    data.dataset_info(config)
  message = str(e.value)
  assert "tfds build" in message and "data_dir" in message
  assert "folder" in message


def test_parse_augment_keeps_shape_and_range():
  augment = data.parse_augment(_AUG + "|rotate90")
  image = tf.random.stateless_uniform((16, 16, 3), (1, 2))
  out = augment(image, tf.constant([3, 4]))
  assert out.shape == (16, 16, 3)
  assert 0.0 <= float(tf.reduce_min(out)) <= float(tf.reduce_max(out)) <= 1.0
  again = augment(image, tf.constant([3, 4]))
  np.testing.assert_array_equal(out.numpy(), again.numpy())
  assert data.parse_augment("")(image, tf.constant([0, 0])).shape == image.shape


def test_folder_bad_files_and_other_formats(tmp_path, capsys):
  _write_folder(tmp_path)
  (tmp_path / "train" / "a" / "fake.png").write_text("not an image")
  whole = (tmp_path / "train" / "a" / "0.png").read_bytes()
  (tmp_path / "train" / "a" / "cut.png").write_bytes(whole[: len(whole) // 2])
  (tmp_path / "train" / "a" / "notes.txt").write_text("x")
  pixels = np.random.default_rng(1).integers(0, 256, (12, 12, 3), np.uint8)
  for extension in ("bmp", "gif", "webp", "tif"):
    Image.fromarray(pixels).save(
      tmp_path / "test" / "b" / f"x.{extension}",
      **({"lossless": True} if extension == "webp" else {}),
    )
  config = make_config(
    name="folder", folder=str(tmp_path), normal_class=0, channels=3
  )
  info = data.dataset_info(config)
  err = capsys.readouterr().err
  assert "Skipped 2 image files" in err and "train/a/fake.png" in err
  assert "train/a/cut.png (image file is truncated)" in err
  assert "Skipped 1 files" in err and "train/a/notes.txt" in err
  assert info.num_train + info.num_holdout == 5 and info.num_test == 14
  decoded = {}
  for path in (tmp_path / "test" / "b").glob("x.*"):
    decoded[path.suffix] = sources.decode_any_image(
      tf.io.read_file(str(path))
    ).numpy()
  for suffix in (".bmp", ".webp", ".tif"):  # Lossless formats.
    np.testing.assert_array_equal(decoded[suffix], pixels)
  assert decoded[".gif"].shape == (12, 12, 3)
  assert len(list(data.eval_batches(config, "test", 16))) == 1
  for path in (tmp_path / "train" / "a").glob("*.png"):
    path.write_text("broken")
  sources._list_folder.cache_clear()  # pylint: disable=protected-access
  with pytest.raises(DataError, match=r"No image of .*train/a can be decoded"):
    data.dataset_info(config)


def _train_images(config):
  batches = list(data.eval_batches(config, "train", 64))
  return np.concatenate([b["image"][b["mask"]] for b in batches])


def test_num_train_images_is_a_seeded_subset_after_the_holdout():
  full = make_config(holdout_fraction=0.2)
  everything = _train_images(full)
  holdout = np.concatenate(
    [b["image"][b["mask"]] for b in data.eval_batches(full, "holdout", 64)]
  )
  few = make_config(holdout_fraction=0.2, num_train_images=4)
  assert data.dataset_info(few).num_train == 4
  subset = _train_images(few)
  assert len(subset) == 4
  # Every kept image is a training one (not held out), none repeated.
  as_rows = lambda x: {r.tobytes() for r in x.reshape(len(x), -1)}
  assert as_rows(subset) <= as_rows(everything)
  assert not as_rows(subset) & as_rows(holdout)
  assert len(as_rows(subset)) == 4
  # The held-out split does not change; the subset follows subset_seed.
  np.testing.assert_array_equal(
    np.concatenate(
      [b["image"][b["mask"]] for b in data.eval_batches(few, "holdout", 64)]
    ),
    holdout,
  )
  np.testing.assert_array_equal(_train_images(few), subset)
  other = _train_images(
    make_config(holdout_fraction=0.2, num_train_images=4, subset_seed=1)
  )
  assert as_rows(other) != as_rows(subset)
  # Training batches cycle through the K images only.
  seen = np.concatenate(
    [b["image"][:, 0] for b in take(data.train_batches(few), 3)]
  )
  assert as_rows(seen) == as_rows(subset)
  available = data.dataset_info(full).num_train
  assert (
    data.dataset_info(
      make_config(holdout_fraction=0.2, num_train_images=available)
    ).num_train
    == available
  )
  with pytest.raises(ConfigError, match="exceeds the .* held-out split"):
    data.dataset_info(
      make_config(holdout_fraction=0.2, num_train_images=available + 1)
    )
  with pytest.raises(ConfigError, match="int >= 0"):
    data.dataset_info(make_config(num_train_images=-1))


def test_reference_jitter_brightness_is_additive_and_unclipped():
  from jax_oneclass.data import augment as augment_lib  # pylint: disable=g-import-not-at-top

  op = augment_lib.color_jitter(0.4, 0, 0, 0, p=1.0, form="reference")
  image = tf.fill((4, 4, 3), 0.9)
  deltas = []
  for i in range(20):
    shift = (op(image, tf.constant([i, 7])) - image).numpy()
    np.testing.assert_allclose(shift, shift.flat[0], atol=1e-6)
    deltas.append(shift.flat[0])
  assert -0.4 <= min(deltas) < 0 < 0.1 < max(deltas) <= 0.4
  # The multiplicative form scales instead and clips at 1.
  old = augment_lib.color_jitter(0.4, 0, 0, 0, p=1.0)
  assert float(tf.reduce_max(old(image, tf.constant([0, 7])))) <= 1.0


def test_reference_jitter_applies_its_ops_in_a_random_order():
  from jax_oneclass.data import augment as augment_lib  # pylint: disable=g-import-not-at-top

  image = tf.random.stateless_uniform((6, 6, 3), (5, 6))
  orders = set()
  for i in range(12):
    seed = tf.constant([i, 3])
    got = augment_lib._reference_jitter(image, seed, 0.4, 0.4, 0.4, 0.4)
    ops = augment_lib._reference_jitter_ops(seed, 0.4, 0.4, 0.4, 0.4, 3)
    for order in itertools.permutations(range(4)):
      expected = image
      for k in order:
        expected = ops[k](expected)
      if np.allclose(got.numpy(), expected.numpy(), atol=1e-5):
        orders.add(order)
        break
    else:
      raise AssertionError(f"seed {i}: output is no ordering of the ops")
  assert len(orders) > 3


def test_color_jitter_unknown_form():
  with pytest.raises(ConfigError, match="form"):
    data.parse_augment("color_jitter(0.4,0.4,0.4,0.4,form='simclr')")
