"""The two-stage family's patch mode: dense patches, their pixel map, and a
tiny patch-mode run on an MVTec-shaped folder through evaluate, predict and
export."""

import os

import jax
import numpy as np
import pytest

from jax_oneclass import cli_checks, methods
from jax_oneclass.errors import ConfigError
from jax_oneclass.methods.two_stage import patches
from tests.conftest import load_config, tiny_config
from tests.test_mvtec import write_widget

PATCH, STRIDE = 8, 4


def _slow_map(scores, height, width, patch, stride):
  """Per pixel, the mean of the covering patches' scores, by loops."""
  ys = patches.positions(height, patch, stride)
  xs = patches.positions(width, patch, stride)
  total = np.zeros((len(scores), height, width))
  count = np.zeros((height, width))
  for i, y in enumerate(ys):
    for j, x in enumerate(xs):
      total[:, y : y + patch, x : x + patch] += scores[:, i, j, None, None]
      count[y : y + patch, x : x + patch] += 1
  assert count.min() >= 1  # Every pixel is covered.
  return total / count


@pytest.mark.parametrize(
  "height, width, patch, stride", [(10, 13, 4, 3), (16, 16, 8, 4)]
)
def test_map_is_the_mean_of_the_covering_patch_scores(
  height, width, patch, stride
):
  rng = np.random.default_rng(0)
  images = rng.random((2, height, width, 3), np.float32)
  got = jax.jit(patches.extract, static_argnums=(1, 2))(images, patch, stride)
  ys = patches.positions(height, patch, stride)
  xs = patches.positions(width, patch, stride)
  assert ys[-1] == height - patch and xs[-1] == width - patch
  assert got.shape == (2, len(ys), len(xs), patch, patch, 3)
  np.testing.assert_array_equal(
    got[:, 1, 2], images[:, ys[1] : ys[1] + patch, xs[2] : xs[2] + patch]
  )
  scores = rng.random((2, len(ys), len(xs))).astype(np.float32)
  amap = patches.score_map(scores, height, width, patch, stride)
  assert amap.shape == (2, height, width)
  np.testing.assert_allclose(
    amap, _slow_map(scores, height, width, patch, stride), rtol=1e-5
  )


def test_resize_equals_jax_image_resize():
  images = np.random.default_rng(0).random((2, 16, 12, 3), np.float32)
  np.testing.assert_allclose(
    patches.resize(images, 8),
    jax.image.resize(images, (2, 8, 8, 3), "linear"),
    rtol=1e-5,
    atol=1e-6,
  )


def test_patch_geometry_is_checked_before_jax():
  config = load_config("disaug", "mvtec_patch")
  assert cli_checks.patch_geometry(config) == (32, 16)
  assert config.data.image_size == 256
  assert config.eval.scorer == "pool/gde/rot_avg/map_max"
  config.eval.patch_stride = 0
  assert cli_checks.patch_geometry(config) == (32, 16)  # Half the patch.
  config.eval.patch_stride = 40
  with pytest.raises(ConfigError, match="exceeds config.data.patch_size"):
    cli_checks.patch_geometry(config)
  config.data.patch_size = 512
  with pytest.raises(ConfigError, match="exceeds config.data.image_size"):
    cli_checks.patch_geometry(config)
  config.data.patch_size = 0
  assert cli_checks.patch_geometry(config) == (0, 0)


def test_a_whole_image_scorer_is_refused_before_training():
  from jax_oneclass import methods  # pylint: disable=g-import-not-at-top

  config = load_config("rotnet", "mvtec_patch")
  config.eval.scorer = "pool/gde/rot_avg"  # The whole-image run's name.
  with pytest.raises(ConfigError, match="map_max"):
    methods.get_method(config, None)


@pytest.fixture(scope="module")
def patch_run(tmp_path_factory):
  """A 2-step DisAug patch-mode run on 16 px widget images: (config,
  workdir, results)."""
  from jax_oneclass import train  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("patch_widget")
  write_widget(root)
  config = tiny_config(
    "disaug",
    steps=2,
    arg=f"mvtec,folder={root},category=widget,"
    f"data_dir={os.fspath(root / 'tfds')}",
  )
  config.data.image_size = 16
  config.data.patch_size = PATCH
  config.eval.patch_stride = STRIDE
  config.eval.batch_size = 4
  config.eval.num_overlays = 2
  config.eval.plots = False
  # Two classifiers, no rotations: fewer programs to compile.
  config.classifiers = {"gde": {}, "kde": {}}
  config.eval.rotation_averaging = False
  config.eval.patch_maps = ("pool/gde", "embed/kde")
  config.eval.scorer = "pool/gde/map_max"
  config.data.holdout_fraction = 0.25
  workdir = tmp_path_factory.mktemp("patch_run")
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_patch_run_reports_maps_and_both_image_scores(patch_run):
  config, workdir, results = patch_run
  assert set(results["localization"]) == set(config.eval.patch_maps)
  for per_map in results["localization"].values():
    assert 0.0 <= per_map["pixel_auroc"] <= 1.0
    assert 0.0 <= per_map["aupro"] <= 1.0
  assert "pool/gde/map_max" in results["auroc"]
  assert "whole/pool/gde" in results["auroc"]
  assert "pool/gde" not in results["auroc"]
  method = methods.method_module(config.method).Method
  assert set(results["auroc"]) == set(method.scorer_names(config))
  assert len(list((workdir / "visualizations").glob("*.png"))) == 2


def test_patch_training_batches_are_patches(patch_run):
  from jax_oneclass import data  # pylint: disable=g-import-not-at-top

  config = patch_run[0]
  batch = next(data.train_batches(config))
  assert batch["image"].shape == (config.batch_size, 2, PATCH, PATCH, 3)


def test_patch_run_predicts_and_exports_maps(patch_run, tmp_path):
  # pylint: disable=g-import-not-at-top
  import jax_oneclass
  from jax_oneclass import detector, export

  _, workdir, results = patch_run
  det = jax_oneclass.Detector.load(workdir)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (3, 16, 16, 3), np.uint8)
  out = det.predict(list(images))
  assert set(out.maps) == set(results["localization"])
  amap = out.maps["pool/gde"]
  assert amap.shape == (3, 16, 16)
  np.testing.assert_allclose(
    out.scores["pool/gde/map_max"], amap.max(axis=(1, 2)), rtol=1e-6
  )
  folder = tmp_path / "in"
  folder.mkdir()
  from PIL import Image

  Image.fromarray(images[0]).save(folder / "a.png")
  records = detector.predict_folder(
    workdir, str(folder), tmp_path / "pred", progress=False
  )
  saved = records[0]["maps"]["pool/gde"]["map"]
  assert np.load(tmp_path / "pred" / saved).shape == (16, 16)
  got = export.load(export.export(det, "jax", tmp_path / "jax"))(images)
  np.testing.assert_allclose(got["anomaly_map"], amap, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(got["score"], out.score, rtol=2e-4, atol=2e-4)
