"""Fast tests of jax_oneclass.data.mvtec on a tiny MVTec-shaped folder."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=g-import-not-at-top
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

tf.config.set_visible_devices([], "GPU")

from jax_oneclass.data import mvtec  # pylint: disable=g-import-not-at-top
from jax_oneclass.errors import ConfigError, DataError  # pylint: disable=g-import-not-at-top
from tests.conftest import METHODS, localises  # pylint: disable=g-import-not-at-top
from tests.test_cli import scorer_names  # pylint: disable=g-import-not-at-top
from tests.trained import NUM_OVERLAYS, by_method  # pylint: disable=g-import-not-at-top

_SIZE = 16


def _save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def write_widget(root, mask_size=_SIZE):
  """Writes <root>/widget/ like MVTec AD; returns the arrays by filename."""
  rng = np.random.default_rng(0)
  category = root / "widget"
  images, masks = {}, {}
  for i in range(4):
    images[f"train/good/{i:03d}.png"] = rng.integers(
      0, 256, (_SIZE, _SIZE, 3), np.uint8
    )
  for i in range(2):  # Grayscale, as in MVTec's grid, screw and zipper.
    images[f"test/good/{i:03d}.png"] = rng.integers(
      0, 256, (_SIZE, _SIZE), np.uint8
    )
  for i in range(2):
    name = f"test/scratch/{i:03d}.png"
    images[name] = rng.integers(0, 256, (_SIZE, _SIZE, 3), np.uint8)
    masks[name] = np.zeros((mask_size, mask_size), bool)
    masks[name][2 + i : 6 + 3 * i, 4:9] = True
  for name, array in images.items():
    _save(category / name, array)
  for i, (name, mask) in enumerate(masks.items()):
    # MVTec stores 0/255; the second mask tests a 0/1 look-alike file.
    value = 255 if i == 0 else 1
    stem = os.path.splitext(os.path.basename(name))[0]
    _save(
      category / "ground_truth" / "scratch" / f"{stem}_mask.png",
      mask.astype(np.uint8) * value,
    )
  return images, masks


@pytest.fixture(scope="module")
def widget(tmp_path_factory):
  root = tmp_path_factory.mktemp("mvtec_like")
  images, masks = write_widget(root)
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = mvtec.build_mvtec_like(root, "widget", data_dir=os.fspath(data_dir))
  return builder, images, masks, root, data_dir


def read(builder, split):
  return {
    ex["filename"].decode(): ex
    for ex in mvtec.mvtec_records(builder, split).as_numpy_iterator()
  }


def test_counts_and_features(widget):
  builder = widget[0]
  assert builder.info.name == "mvtec_ad"
  assert builder.info.config_name == "widget"
  assert builder.info.splits["train"].num_examples == 4
  assert builder.info.splits["test"].num_examples == 4
  assert builder.info.features["label"].names == list(mvtec.LABEL_NAMES)


def test_train_split_is_good_images(widget):
  builder, images = widget[:2]
  records = read(builder, "train")
  assert sorted(records) == [f"train/good/{i:03d}.png" for i in range(4)]
  for name, ex in records.items():
    assert ex["image"].dtype == np.uint8
    np.testing.assert_array_equal(ex["image"], images[name])
    assert ex["mask"].dtype == bool and ex["mask"].shape == (_SIZE, _SIZE)
    assert not ex["mask"].any()
    assert ex["label"] == 0 and ex["label"].dtype == np.int32
    assert ex["defect_type"] == b"good"


def test_test_split_labels_images_and_masks(widget):
  builder, images, masks = widget[:3]
  records = read(builder, "test")
  assert sorted(records) == [
    "test/good/000.png",
    "test/good/001.png",
    "test/scratch/000.png",
    "test/scratch/001.png",
  ]
  for name, ex in records.items():
    assert ex["image"].shape == (_SIZE, _SIZE, 3)
    assert ex["mask"].shape == (_SIZE, _SIZE)
    if name.startswith("test/good/"):
      # Grayscale files come back as RGB with three equal channels.
      np.testing.assert_array_equal(
        ex["image"], np.repeat(images[name][..., None], 3, axis=-1)
      )
      assert ex["label"] == 0 and ex["defect_type"] == b"good"
      assert not ex["mask"].any()
    else:
      np.testing.assert_array_equal(ex["image"], images[name])
      assert ex["label"] == 1 and ex["defect_type"] == b"scratch"
      np.testing.assert_array_equal(ex["mask"], masks[name])


def test_stored_masks_are_0_255(widget):
  builder = widget[0]
  values = set()
  for ex in builder.as_dataset(split="test").as_numpy_iterator():
    values |= set(np.unique(ex["mask"]).tolist())
  assert values == {0, 255}


def test_prepared_data_is_reused_without_the_folder(widget, tmp_path):
  builder, _, _, _, data_dir = widget
  again = mvtec.build_mvtec_like(
    tmp_path / "gone" / "widget", data_dir=os.fspath(data_dir)
  )
  assert again.data_dir == builder.data_dir
  assert len(read(again, "test")) == 4
  # Class sizes are stored with the data, for sources to read.
  assert again.info.metadata["label_counts"] == {
    "train": [4, 0],
    "test": [2, 2],
  }


def test_category_folder_as_root(tmp_path):
  write_widget(tmp_path / "src")
  builder = mvtec.build_mvtec_like(
    tmp_path / "src" / "widget", data_dir=os.fspath(tmp_path / "tfds")
  )
  assert builder.info.splits["train"].num_examples == 4


def test_missing_mask(tmp_path):
  write_widget(tmp_path)
  (tmp_path / "widget/ground_truth/scratch/001_mask.png").unlink()
  with pytest.raises(
    DataError,
    match=r"Missing mask .*scratch/001_mask\.png"
    r" for defective test image .*test/scratch/001\.png",
  ):
    mvtec.build_mvtec_like(tmp_path, "widget", data_dir=tmp_path / "tfds")
  assert not (tmp_path / "tfds" / "mvtec_ad").exists()


def test_mask_of_other_size(tmp_path):
  write_widget(tmp_path, mask_size=8)
  with pytest.raises(DataError, match=r"000_mask\.png is \(8, 8\).*\(16, 16\)"):
    mvtec.build_mvtec_like(tmp_path, "widget", data_dir=tmp_path / "tfds")


def test_missing_folders(tmp_path):
  with pytest.raises(DataError, match=r"does not exist.*expected layout"):
    mvtec.build_mvtec_like(tmp_path / "nowhere", "bottle")
  with pytest.raises(DataError, match=r"No folder .*'bottle'.*expected layout"):
    mvtec.build_mvtec_like(tmp_path, "bottle", data_dir=tmp_path / "tfds")
  with pytest.raises(
    DataError,
    match=r"Unknown MVTec AD category .*bottle, "
    r"cable.*zipper; any other name must be a folder",
  ):
    mvtec.build_mvtec_like(tmp_path, "botle", data_dir=tmp_path / "tfds")
  (tmp_path / "widget" / "train" / "good").mkdir(parents=True)
  with pytest.raises(
    DataError, match=r"No readable training images in .*train/good"
  ):
    mvtec.build_mvtec_like(tmp_path, "widget", data_dir=tmp_path / "tfds")


def test_tfds_manual_dir_is_checked(tmp_path):
  builder = mvtec.mvtec_builder("bottle", data_dir=os.fspath(tmp_path / "tfds"))
  with pytest.raises(DataError, match=r"expected layout"):
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(tmp_path / "empty")
      )
    )


def test_records_errors(widget, tmp_path):
  with pytest.raises(ConfigError, match="Unknown split"):
    mvtec.mvtec_records(widget[0], "validation")
  unprepared = mvtec.mvtec_builder("widget", data_dir=os.fspath(tmp_path))
  with pytest.raises(DataError, match="not prepared"):
    mvtec.mvtec_records(unprepared, "test")


def test_an_mvtec_category_trains_and_evaluates_from_a_config(widget, tmp_path):
  # pylint: disable=g-import-not-at-top
  from jax_oneclass import data, train
  from tests.conftest import tiny_config

  _, _, _, root, data_dir = widget
  config = tiny_config(
    "ganomaly",
    steps=2,
    arg=f"mvtec,folder={root},category=widget,data_dir={data_dir}",
  )
  config.data.image_size = 16
  info = data.dataset_info(config)
  assert info.class_names == ("good", "defect")
  assert (info.num_train, info.num_test) == (4, 4)
  results = train.train_and_evaluate(config, tmp_path / "run")
  assert (results["num_test"], results["num_anomalous"]) == (4, 2)
  assert 0.0 <= results["auroc"]["latent_mse"] <= 1.0


LOCALISING = [m for m in METHODS if localises(m)]


@pytest.mark.parametrize("method", by_method(LOCALISING))
def test_localising_methods_run_from_the_command_line(trained_run, method):
  run = trained_run(method)
  workdir, results = run.workdir, run.results
  assert "RANDOM weights" in run.stdout + run.stderr
  scorers = scorer_names(workdir)
  assert set(results["auroc"]) == scorers
  if method == "gradient_preference":
    assert "Early stopping at step 4 of 40" in run.stdout + run.stderr
    assert results["step"] == 4
  pixel = results["localization"]["anomaly_map"]
  assert 0.0 <= pixel["pixel_auroc"] <= 1.0 and 0.0 <= pixel["aupro"] <= 1.0
  panels = sorted((workdir / "visualizations").glob("*.png"))
  assert len(panels) == NUM_OVERLAYS == 3
  with Image.open(panels[0]) as panel:  # Image and heat map, enlarged.
    assert panel.size[0] > 2 * 224 and panel.size[1] > 224
  assert (workdir / "plots" / f"{sorted(scorers)[0]}.png").is_file()


def test_bad_files_are_skipped_and_named(tmp_path, capsys):
  write_widget(tmp_path / "src")
  good = tmp_path / "src" / "widget" / "train" / "good"
  (good / "not_an_image.png").write_text("hello")
  whole = (good / "000.png").read_bytes()
  (good / "truncated.png").write_bytes(whole[: len(whole) // 2])
  (good / "notes.txt").write_text("x")
  pixels = np.full((_SIZE, _SIZE, 3), 7, np.uint8)
  for extension in ("bmp", "webp", "tif", "gif"):
    Image.fromarray(pixels).save(good / f"extra.{extension}")
  builder = mvtec.build_mvtec_like(
    tmp_path / "src", "widget", data_dir=os.fspath(tmp_path / "tfds")
  )
  err = capsys.readouterr().err
  assert (
    "Skipped 2 image files of" in err
    and "train/good/not_an_image.png" in err
    and "train/good/truncated.png (image file is truncated)" in err
  )
  assert "not images by their extension: .txt (1)" in err
  train = read(builder, "train")
  assert len(train) == 8  # 4 PNGs, and BMP, WebP, TIFF, GIF.
  np.testing.assert_array_equal(train["train/good/extra.bmp"]["image"], pixels)


def test_a_changed_source_folder_is_refused(tmp_path):
  write_widget(tmp_path / "src")
  data_dir = os.fspath(tmp_path / "tfds")
  mvtec.build_mvtec_like(tmp_path / "src", "widget", data_dir=data_dir)
  mvtec.build_mvtec_like(tmp_path / "src", "widget", data_dir=data_dir)
  good = tmp_path / "src" / "widget" / "train" / "good"
  (good / "004.png").write_bytes((good / "000.png").read_bytes())
  with pytest.raises(
    DataError,
    match=r"does not match .*src/widget: its "
    r"files changed since. Delete .*to prepare it again",
  ):
    mvtec.build_mvtec_like(tmp_path / "src", "widget", data_dir=data_dir)
  write_widget(tmp_path / "other")  # Same category name, other files.
  (tmp_path / "other" / "widget" / "train" / "good" / "000.png").unlink()
  with pytest.raises(DataError, match=r"it was prepared from .*src/widget"):
    mvtec.build_mvtec_like(tmp_path / "other", "widget", data_dir=data_dir)
