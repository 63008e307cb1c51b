"""Anomaly maps, pixel metrics and overlays against SciPy, sklearn and loops."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from jax_oneclass import metrics, visualize
from jax_oneclass.components import anomaly_map
from jax_oneclass.errors import ConfigError, DataError

# numpy.pad mode name -> the SciPy mode it must equal.
SCIPY_MODES = {"symmetric": "reflect", "reflect": "mirror"}


# ----------------------------------------------------------------------------
# Slow references.
# ----------------------------------------------------------------------------


def resize_reference(image, height, width):
  """Pixel-by-pixel align-corners bilinear interpolation of one [h, w] map."""
  h, w = image.shape
  out = np.zeros((height, width))
  for i in range(height):
    for j in range(width):
      y = i * (h - 1) / (height - 1) if height > 1 else 0.0
      x = j * (w - 1) / (width - 1) if width > 1 else 0.0
      y0, x0 = int(np.floor(y)), int(np.floor(x))
      y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
      dy, dx = y - y0, x - x0
      out[i, j] = (
        (1 - dy) * (1 - dx) * image[y0, x0]
        + (1 - dy) * dx * image[y0, x1]
        + dy * (1 - dx) * image[y1, x0]
        + dy * dx * image[y1, x1]
      )
  return out


def regions_of(masks):
  """Boolean [N, H, W] array per 8-connected region."""
  regions = []
  for i, mask in enumerate(masks):
    labels, num = ndimage.label(mask, structure=np.ones((3, 3)))
    for r in range(1, num + 1):
      region = np.zeros(masks.shape, bool)
      region[i] = labels == r
      regions.append(region)
  return regions


def area_to(curve, max_fpr):
  """Trapezoid area of [(fpr, pro), ...] (fpr sorted) up to max_fpr."""
  area = 0.0
  for (x0, y0), (x1, y1) in zip(curve[:-1], curve[1:]):
    if x0 >= max_fpr:
      break
    if x1 > max_fpr:
      y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
      x1 = max_fpr
    area += (x1 - x0) * (y0 + y1) / 2
  return area


def aupro_reference(maps, masks, max_fpr=0.3, thresholds=None):
  """One threshold at a time, from the largest; positive = score >= t."""
  if thresholds is None:
    thresholds = np.unique(maps)
  regions = regions_of(masks)
  curve = [(0.0, 0.0)]
  for t in np.sort(thresholds)[::-1]:
    predicted = maps >= t
    pro = np.mean([predicted[r].mean() for r in regions])
    curve.append((predicted[~masks].mean(), pro))
  return area_to(curve, max_fpr) / max_fpr


def pro_per_image_reference(maps, masks, num_thresholds=200, max_fpr=0.3):
  """The official RD4AD per-image PRO, written as a plain loop."""
  values = []
  for amap, mask in zip(maps, masks):
    regions = regions_of(mask[None])
    if not regions:
      continue
    delta = (amap.max() - amap.min()) / num_thresholds
    points = []
    for k in range(num_thresholds):
      predicted = amap > amap.min() + delta * k
      pro = np.mean([predicted[r[0]].mean() for r in regions])
      fpr = predicted[~mask].mean()
      if fpr < max_fpr:
        points.append((fpr, pro))
    top = max(p[0] for p in points)
    # Integrate along the curve from the largest threshold down.
    values.append(area_to([(f / top, p) for f, p in points[::-1]], 1.0))
  return np.mean(values)


def random_case(seed, num_images=3, size=14, levels=12):
  """Maps with ties and masks with several rectangles (some touching)."""
  rng = np.random.default_rng(seed)
  masks = np.zeros((num_images, size, size), bool)
  for i in range(num_images - 1):  # The last image stays normal.
    for _ in range(rng.integers(1, 4)):
      top, left = rng.integers(0, size - 3, size=2)
      height, width = rng.integers(1, 4, size=2)
      masks[i, top : top + height, left : left + width] = True
  maps = rng.integers(0, levels, masks.shape) / levels + 0.3 * masks
  return maps, masks


def toy_case():
  """One 1x13 image: regions A = {0} and B = {11, 12}; 10 normal pixels.

  Standard curve (fpr, pro): (0, 0) (0, .5) (.1, .5) (.1, .75) (.3, .75)
  (.3, 1) (1, 1), so the area to 0.3 is .1 * .5 + .2 * .75 = .2.
  """
  scores = np.array([[[8, 7, 5, 5, 0, 0, 0, 0, 0, 0, 0, 6, 3]]], float)
  masks = np.zeros(scores.shape, bool)
  masks[0, 0, [0, 11, 12]] = True
  return scores, masks


# ----------------------------------------------------------------------------
# Anomaly maps.
# ----------------------------------------------------------------------------


def test_resize_of_a_ramp_is_exact():
  h, w, height, width = 4, 6, 13, 21
  ramp = 3.0 * np.arange(h)[:, None] + 0.5 * np.arange(w)[None, :]
  got = np.asarray(
    anomaly_map.resize_bilinear_align_corners(
      jnp.asarray(ramp[None], jnp.float32), (height, width)
    )
  )[0]
  for i, j in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
    assert got[i, j] == ramp[i, j]
  # Bilinear interpolation reproduces a linear function.
  rows = np.arange(height)[:, None] * (h - 1) / (height - 1)
  cols = np.arange(width)[None, :] * (w - 1) / (width - 1)
  np.testing.assert_allclose(got, 3.0 * rows + 0.5 * cols, atol=1e-5)


@pytest.mark.parametrize(
  "in_shape, size",
  [((5, 7), 16), ((9, 6), (4, 11)), ((1, 3), (2, 5)), ((6, 6), (1, 1))],
)
def test_resize_matches_reference(in_shape, size):
  maps = np.random.default_rng(0).random((2,) + in_shape)
  height, width = (size, size) if isinstance(size, int) else size
  resize = jax.jit(lambda m: anomaly_map.resize_bilinear_align_corners(m, size))
  got = np.asarray(resize(jnp.asarray(maps, jnp.float32)))
  want = np.stack([resize_reference(m, height, width) for m in maps])
  assert got.shape == (2, height, width)
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("mode", ["symmetric", "reflect"])
@pytest.mark.parametrize("shape", [(2, 40, 33), (1, 6, 5)])
def test_gaussian_blur_matches_scipy(mode, shape):
  # (1, 6, 5): the 33-tap kernel is wider than the map.
  maps = np.random.default_rng(1).random(shape).astype(np.float32)
  got = np.asarray(anomaly_map.gaussian_blur(jnp.asarray(maps), mode=mode))
  want = np.stack(
    [
      ndimage.gaussian_filter(
        m, sigma=4.0, truncate=4.0, mode=SCIPY_MODES[mode]
      )
      for m in maps
    ]
  )
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_gaussian_blur_float64_matches_scipy():
  maps = np.random.default_rng(2).random((1, 24, 20))
  with jax.enable_x64(True):
    got = np.asarray(anomaly_map.gaussian_blur(jnp.asarray(maps)))
  want = ndimage.gaussian_filter(maps[0], sigma=4.0, truncate=4.0)
  np.testing.assert_allclose(got[0], want, atol=1e-12, rtol=0)


def test_gaussian_blur_modes_differ_only_near_the_border():
  maps = jnp.asarray(np.random.default_rng(3).random((1, 48, 48)), jnp.float32)
  diff = np.abs(
    np.asarray(
      anomaly_map.gaussian_blur(maps, mode="symmetric")
      - anomaly_map.gaussian_blur(maps, mode="reflect")
    )
  )
  assert diff.max() > 1e-3
  assert diff[0, 17:-17, 17:-17].max() == 0.0  # Beyond the 16-pixel radius.


def test_gaussian_blur_rejects_unknown_mode():
  with pytest.raises(ConfigError, match="mode"):
    anomaly_map.gaussian_blur(jnp.zeros((1, 4, 4)), mode="mirror")


def test_anomaly_map_composes_resize_and_blur():
  maps = jnp.asarray(np.random.default_rng(4).random((2, 5, 5)), jnp.float32)
  got = anomaly_map.anomaly_map(maps, 20, sigma=2.0, mode="reflect")
  want = anomaly_map.gaussian_blur(
    anomaly_map.resize_bilinear_align_corners(maps, 20),
    sigma=2.0,
    mode="reflect",
  )
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(
    np.asarray(anomaly_map.image_scores(got)), np.asarray(got).max(axis=(1, 2))
  )


# ----------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------


def test_pixel_auroc_matches_sklearn():
  maps, masks = random_case(5)
  want = roc_auc_score(masks.ravel(), maps.ravel())
  assert metrics.pixel_auroc(maps, masks) == pytest.approx(want)
  assert metrics.pixel_auroc(
    jnp.asarray(maps, jnp.float32), masks.astype(int)
  ) == pytest.approx(want)


def test_label_regions_uses_8_connectivity():
  masks = np.zeros((2, 5, 5), bool)
  masks[0, 0, 0] = masks[0, 1, 1] = True  # Diagonal neighbours: one region.
  masks[0, 3:, 3:] = True
  masks[1, 2, 2] = True
  labels, count = metrics.label_regions(masks)
  assert count == 3
  assert labels[0, 0, 0] == labels[0, 1, 1] == 1
  assert labels[1, 2, 2] == 3


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("max_fpr", [0.3, 0.05])
def test_aupro_matches_reference(seed, max_fpr):
  maps, masks = random_case(seed)
  want = aupro_reference(maps, masks, max_fpr)
  assert metrics.aupro(maps, masks, max_fpr) == pytest.approx(want)


def test_aupro_threshold_grid_matches_reference():
  maps, masks = random_case(6, levels=50)
  want = aupro_reference(
    maps, masks, thresholds=np.linspace(maps.min(), maps.max(), 7)
  )
  got = metrics.aupro(maps, masks, num_thresholds=7)
  assert got == pytest.approx(want)


def test_aupro_hand_computed():
  scores, masks = toy_case()
  assert metrics.aupro(scores, masks) == pytest.approx(0.2 / 0.3)
  # The cut at 0.2 falls inside the flat (.1, .75)-(.3, .75) segment.
  assert metrics.aupro(scores, masks, max_fpr=0.2) == pytest.approx(
    (0.1 * 0.5 + 0.1 * 0.75) / 0.2
  )


def test_aupro_perfect_and_constant_maps():
  _, masks = random_case(7)
  assert metrics.aupro(masks.astype(float), masks) == pytest.approx(1.0)
  # One threshold: the curve is the diagonal, area 0.3^2 / 2 over 0.3.
  assert metrics.aupro(np.zeros(masks.shape), masks) == pytest.approx(0.15)


def test_aupro_handles_a_test_set_quickly():
  maps, masks = random_case(8, num_images=20, size=128, levels=1000)
  assert 0.0 < metrics.aupro(maps.astype(np.float32), masks) <= 1.0


@pytest.mark.parametrize(
  "masks, match",
  [
    (np.zeros((1, 3, 3), bool), "anomalous and normal"),
    (np.ones((1, 3, 3), bool), "anomalous and normal"),
    (np.zeros((1, 3, 4), bool), r"\[N, H, W\]"),
    (np.full((1, 3, 3), 2), "boolean"),
  ],
)
def test_aupro_errors(masks, match):
  with pytest.raises(DataError, match=match):
    metrics.aupro(np.zeros((1, 3, 3)), masks)


def test_pro_rd4ad_per_image_hand_computed():
  scores, masks = toy_case()
  # Thresholds 0..7 (min 0, max 8, 8 of them), positive = score > t. Kept
  # points (FPR < .3): t=5 (.1, .75), t=6 (.1, .5), t=7 (0, .5); FPR / .1
  # gives a flat line at .5 from 0 to 1. A normal image is skipped.
  scores = np.concatenate([scores, np.ones_like(scores)])
  masks = np.concatenate([masks, np.zeros_like(masks)])
  got = metrics.pro_rd4ad_per_image(scores, masks, num_thresholds=8)
  assert got == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1])
def test_pro_rd4ad_per_image_matches_reference(seed):
  maps, masks = random_case(seed, levels=40)
  want = pro_per_image_reference(maps, masks, num_thresholds=30)
  got = metrics.pro_rd4ad_per_image(maps, masks, num_thresholds=30)
  assert got == pytest.approx(want)


# ----------------------------------------------------------------------------
# Overlays.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("channels, with_maps", [(3, True), (1, False)])
def test_save_panels_draws_images_maps_and_outlines(
  tmp_path, channels, with_maps
):
  rng = np.random.default_rng(9)
  images = rng.random((2, 10, 14, channels))
  maps = np.zeros((2, 10, 14))
  maps[0, 1:3, 1:3] = 5.0  # Above the pixel threshold: predicted.
  masks = np.zeros((2, 10, 14), bool)
  masks[0, 6:9, 8:12] = True
  stats = {"threshold": 1.0, "min": 0.0, "max": 2.0}
  paths = visualize.save_panels(
    tmp_path,
    images,
    ["good/000.png", ""],
    np.array([0.5, 3.0]),
    stats,
    "map_max",
    maps=maps if with_maps else None,
    map_calibration=stats if with_maps else None,
    masks=masks if with_maps else None,
    is_anomaly=[0, 1],
  )
  assert [Path(p).name for p in paths] == ["0000_000.png", "0001.png"]
  with Image.open(paths[0]) as picture:
    pixels = np.asarray(picture)
  factor = -(-224 // 14)  # Enlarged to at least 224 px.
  assert pixels.shape[0] > 10 * factor
  if with_maps:  # Two tiles; both outline colours appear in the second.
    assert pixels.shape[1] >= 2 * 14 * factor
    for color in (visualize.PREDICTED_COLOR, visualize.TRUTH_COLOR):
      assert (pixels == color).all(axis=-1).sum() > 10


def test_save_score_plot_writes_a_png(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.arange(40) % 4 == 0
  scores = rng.normal(size=40) + 2 * labels
  path = tmp_path / "plots" / "x.png"
  visualize.save_score_plot(path, scores, labels, 1.0, "title")
  with Image.open(path) as picture:
    assert picture.size[0] > 600


def test_jet_colormap_ends():
  np.testing.assert_allclose(
    visualize.jet_colormap(np.array([0.0, 0.5, 1.0])),
    [[0.0, 0.0, 0.5], [0.5, 1.0, 0.5], [0.5, 0.0, 0.0]],
  )


def test_map_fusions_by_name_registration_and_import_path(
  tmp_path, monkeypatch
):
  (tmp_path / "my_fusions.py").write_text(
    "import functools\nimport jax.numpy as jnp\n"
    "def largest(maps):\n  return functools.reduce(jnp.maximum, maps)\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  rng = np.random.default_rng(0)
  maps = [jnp.asarray(rng.random((2, s, s)), jnp.float32) for s in (4, 8)]
  fused = {
    name: anomaly_map.anomaly_map(maps, 16, sigma=1.0, fusion=name)
    for name in ("sum", "mean", "product")
  }
  resized = [anomaly_map.resize_bilinear_align_corners(m, 16) for m in maps]
  np.testing.assert_allclose(
    fused["product"],
    anomaly_map.gaussian_blur(resized[0] * resized[1], sigma=1.0),
    rtol=1e-5,
    atol=1e-6,
  )
  np.testing.assert_allclose(fused["mean"], fused["sum"] / 2, rtol=1e-5)
  assert not np.allclose(fused["sum"], fused["product"])
  by_path = anomaly_map.anomaly_map(
    maps, 16, sigma=1.0, fusion="my_fusions.largest"
  )
  np.testing.assert_allclose(
    by_path,
    anomaly_map.gaussian_blur(jnp.maximum(*resized), sigma=1.0),
    rtol=1e-6,
  )
  with pytest.raises(ConfigError, match="Unknown model.map_fusion 'max'"):
    anomaly_map.map_fusion("max")
  with pytest.raises(ConfigError, match="cannot be imported"):
    anomaly_map.map_fusion("no_such_lab.fusions.max")
  with pytest.raises(ConfigError, match="registered already"):
    anomaly_map.register_map_fusion("sum", max)
  anomaly_map.register_map_fusion("first", lambda ms: ms[0])
  try:
    np.testing.assert_allclose(
      anomaly_map.anomaly_map(maps, 16, sigma=1.0, fusion="first"),
      anomaly_map.gaussian_blur(resized[0], sigma=1.0),
      rtol=1e-6,
    )
  finally:
    del anomaly_map.MAP_FUSIONS["first"]
