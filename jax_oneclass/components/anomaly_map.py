"""Pixel-level anomaly maps and localisation metrics.

Shared by the localisation methods (reverse distillation, gradient
preference). The map post-processing follows RD4AD's evaluation
(../shared/specs/ganomaly_and_reverse_distillation.md, B7): upsample each
map with align-corners bilinear interpolation, smooth it with a Gaussian
(sigma 4, truncated at 4 sigma, SciPy's default boundary), and take the
maximum as the image score. The metrics (B9) are pixel AUROC, the standard
AUPRO of Bergmann et al. (IJCV 2021) and the official RD4AD per-image PRO.

The map functions are jnp and jit-able; the metrics and the overlay writer
run on the host in NumPy.

Convention throughout: higher score = more anomalous, mask True = anomaly.
"""

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from scipy import ndimage

from jax_oneclass.errors import ConfigError, DataError
from jax_oneclass.metrics import auroc

# Boundary modes by numpy.pad's names: 'symmetric' is SciPy's 'reflect' (its
# default), 'reflect' is SciPy's 'mirror' (torch's reflect padding).
BOUNDARY_MODES = ('symmetric', 'reflect')


# ----------------------------------------------------------------------------
# Anomaly maps (jnp).
# ----------------------------------------------------------------------------


def _size_pair(size) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  height, width = size
  return int(height), int(width)


def _align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] linear-interpolation weights with corners mapped to corners."""
  weights = np.zeros((out_size, in_size))
  if in_size == 1:
    weights[:, 0] = 1.0
    return weights
  scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  source = np.arange(out_size) * scale
  # Clip so the last output row interpolates (in-2, in-1) with fraction 1.
  low = np.minimum(np.floor(source).astype(int), in_size - 2)
  frac = source - low
  rows = np.arange(out_size)
  weights[rows, low] = 1.0 - frac
  weights[rows, low + 1] = frac
  return weights


@functools.partial(jax.jit, static_argnames=('size',))
def resize_bilinear_align_corners(maps: jax.Array, size) -> jax.Array:
  """Bilinear resize with `align_corners=True` (PyTorch's convention).

  Output pixel i samples the input at i * (in - 1) / (out - 1), so corner
  pixels are copied exactly. `jax.image.resize` uses half-pixel centres
  instead, which is why this exists.

  Args:
    maps: [..., h, w] maps, e.g. [B, h, w].
    size: Output side (int) or (H, W); static under jit.

  Returns:
    [..., H, W] maps in the dtype of `maps`.
  """
  height, width = _size_pair(size)
  rows = jnp.asarray(_align_corners_matrix(maps.shape[-2], height), maps.dtype)
  cols = jnp.asarray(_align_corners_matrix(maps.shape[-1], width), maps.dtype)
  # HIGHEST keeps the weights exact on accelerators that default to TF32.
  return jnp.einsum('Hh,...hw,Ww->...HW', rows, maps, cols,
                    precision=jax.lax.Precision.HIGHEST)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
  """SciPy's normalised 1-D Gaussian: radius int(truncate * sigma + 0.5)."""
  radius = int(truncate * sigma + 0.5)
  taps = np.arange(-radius, radius + 1)
  kernel = np.exp(-0.5 * taps**2 / sigma**2)
  return kernel / kernel.sum()


def _padded_indices(size: int, radius: int, mode: str) -> np.ndarray:
  """Source index of each of the size + 2 * radius padded positions.

  Folding indices (rather than calling jnp.pad) keeps SciPy's periodic
  extension when the kernel is wider than the map.
  """
  index = np.arange(-radius, size + radius)
  if mode == 'symmetric':  # d c b a | a b c d | d c b a: period 2 * size.
    period = 2 * size
    index = index % period
    return np.where(index < size, index, period - 1 - index)
  if size == 1:
    return np.zeros_like(index)
  period = 2 * size - 2  # d c b | a b c d | c b a: edge pixel not repeated.
  index = index % period
  return np.where(index < size, index, period - index)


def _blur_axis(maps: jax.Array, kernel: np.ndarray, axis: int,
               mode: str) -> jax.Array:
  """Correlates `maps` with a symmetric 1-D kernel along `axis`."""
  size, radius = maps.shape[axis], len(kernel) // 2
  padded = jnp.take(maps, _padded_indices(size, radius, mode), axis=axis)
  out = jnp.zeros_like(maps)
  # One shifted slice per tap: plain multiply-adds, exact in float32 on any
  # backend (no TF32 convolutions), and XLA fuses them.
  for tap, weight in enumerate(kernel.astype(maps.dtype)):
    window = jax.lax.slice_in_dim(padded, tap, tap + size, axis=axis)
    out = out + weight * window
  return out


@functools.partial(jax.jit, static_argnames=('sigma', 'truncate', 'mode'))
def gaussian_blur(maps: jax.Array, sigma: float = 4.0, truncate: float = 4.0,
                  mode: str = 'symmetric') -> jax.Array:
  """Separable Gaussian smoothing over the last two axes.

  Equals `scipy.ndimage.gaussian_filter(m, sigma, truncate=truncate,
  mode=...)` applied to each [H, W] map. Boundary modes use numpy.pad's
  names:
  - 'symmetric' (d c b a | a b c d, edge pixel repeated) is SciPy's
    'reflect', SciPy's default and the official RD4AD evaluation;
  - 'reflect' (d c b | a b c d, edge pixel not repeated) is SciPy's
    'mirror' and torch's 'reflect' padding, as in anomalib's GaussianBlur2d.

  Args:
    maps: [..., H, W] maps, e.g. [B, H, W].
    sigma: Standard deviation in pixels; static under jit.
    truncate: The kernel radius is int(truncate * sigma + 0.5).
    mode: 'symmetric' or 'reflect' (see above).

  Returns:
    The smoothed maps, same shape and dtype.
  """
  if mode not in BOUNDARY_MODES:
    raise ConfigError(f'gaussian_blur: mode must be one of {BOUNDARY_MODES}, '
                     f'got {mode!r}.')
  kernel = gaussian_kernel(sigma, truncate)
  maps = _blur_axis(maps, kernel, maps.ndim - 2, mode)
  return _blur_axis(maps, kernel, maps.ndim - 1, mode)


def anomaly_map(maps, size, sigma: float = 4.0, mode: str = 'symmetric',
                truncate: float = 4.0) -> jax.Array:
  """Upsamples [..., h, w] maps to `size` (align corners), then smooths them.

  `maps` is one array, or a sequence of arrays at several scales that are
  summed after upsampling. With the defaults this is RD4AD's
  post-processing of its multi-scale maps; `mode='reflect'` gives
  anomalib's boundary instead.
  """
  if isinstance(maps, (list, tuple)):
    resized = sum(resize_bilinear_align_corners(m, size) for m in maps)
  else:
    resized = resize_bilinear_align_corners(maps, size)
  return gaussian_blur(resized, sigma=sigma, truncate=truncate, mode=mode)


def image_scores(maps: jax.Array) -> jax.Array:
  """Image-level anomaly score: the maximum of each [..., H, W] map."""
  return jnp.max(maps, axis=(-2, -1))


# ----------------------------------------------------------------------------
# Pixel metrics (NumPy, host side).
# ----------------------------------------------------------------------------


def _check_pixel_inputs(maps: Any, masks: Any,
                        name: str) -> tuple[np.ndarray, np.ndarray]:
  """Host arrays [N, H, W] of finite scores and boolean masks."""
  maps, masks = np.asarray(maps), np.asarray(masks)
  if maps.ndim != 3 or maps.shape != masks.shape:
    raise DataError(f'{name}: maps {maps.shape} and masks {masks.shape} must '
                    'both be [N, H, W].')
  if masks.dtype != np.bool_:
    if not np.isin(masks, (0, 1)).all():
      raise DataError(f'{name}: masks must be boolean or 0/1.')
    masks = masks.astype(bool)
  if not np.isfinite(maps).all():
    raise DataError(f'{name}: {np.count_nonzero(~np.isfinite(maps))} map '
                    'values are NaN or infinite.')
  return maps, masks


def pixel_auroc(maps: Any, masks: Any) -> float:
  """AUROC over all pixels of all images, normal images included.

  Args:
    maps: [N, H, W] anomaly maps (higher = more anomalous).
    masks: [N, H, W] ground truth, True (or 1) = anomalous pixel.

  Returns:
    The AUROC as a Python float.
  """
  maps, masks = _check_pixel_inputs(maps, masks, 'pixel_auroc')
  return auroc(maps, masks)


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
  """8-connected ground-truth regions, numbered 1..R across all images.

  Args:
    masks: [N, H, W] boolean masks.

  Returns:
    [N, H, W] int labels (0 = normal pixel) and the number of regions R.
  """
  structure = np.ones((3, 3), dtype=bool)
  labels = np.zeros(masks.shape, dtype=np.int64)
  count = 0
  for i, mask in enumerate(masks):
    image_labels, num = ndimage.label(mask, structure=structure)
    labels[i] = np.where(image_labels > 0, image_labels + count, 0)
    count += num
  return labels, count


def truncated_auc(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
  """Trapezoid area under (fpr, pro) for fpr in [0, max_fpr], / max_fpr.

  `fpr` must be non-decreasing. The curve is interpolated linearly at
  `max_fpr` when no point lies exactly there.
  """
  keep = int(np.searchsorted(fpr, max_fpr, side='right'))
  x, y = fpr[:keep], pro[:keep]
  if keep < len(fpr) and x[-1] < max_fpr:
    step = (max_fpr - fpr[keep - 1]) / (fpr[keep] - fpr[keep - 1])
    cut = pro[keep - 1] + step * (pro[keep] - pro[keep - 1])
    x, y = np.append(x, max_fpr), np.append(y, cut)
  return float(np.trapezoid(y, x) / max_fpr)


def pro_curve(maps: Any, masks: Any, num_thresholds: int | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-region-overlap curve with thresholds shared by all images.

  A pixel is predicted anomalous at threshold t when its score is >= t.
  PRO(t) is the mean, over every 8-connected ground-truth region of every
  image, of the fraction of the region's pixels predicted anomalous; FPR(t)
  is the fraction of all normal pixels (normal images included) predicted
  anomalous.

  Thresholds: with `num_thresholds=None` every distinct map value, which
  gives the exact curve (what Bergmann et al.'s evaluation code computes);
  with an int, that many values spaced evenly from the smallest to the
  largest map value (an approximation that gets coarse where scores are
  skewed). Either way the curve starts at (0, 0), a threshold above every
  score, and ends at (1, 1).

  Args:
    maps: [N, H, W] anomaly maps.
    masks: [N, H, W] ground truth, True (or 1) = anomalous pixel.
    num_thresholds: See above.

  Returns:
    (fpr, pro, thresholds), fpr non-decreasing; thresholds[k] belongs to
    point k + 1 (point 0 is the (0, 0) start).
  """
  maps, masks = _check_pixel_inputs(maps, masks, 'aupro')
  labels, num_regions = label_regions(masks)
  num_normal = masks.size - np.count_nonzero(masks)
  if num_regions == 0 or num_normal == 0:
    raise DataError(f'aupro: needs both anomalous and normal pixels, got '
                    f'{masks.size - num_normal} anomalous of {masks.size}.')
  scores, labels = maps.ravel(), labels.ravel()
  if num_thresholds is None:
    thresholds, bins = np.unique(scores, return_inverse=True)
  else:
    if num_thresholds < 2:
      raise DataError(f'aupro: num_thresholds must be >= 2 or None, got '
                      f'{num_thresholds}.')
    thresholds = np.linspace(scores.min(), scores.max(), num_thresholds)
    # bins[p] = index of the largest threshold <= score p.
    bins = np.searchsorted(thresholds, scores, side='right') - 1
  anomalous = labels > 0
  # Each anomalous pixel adds 1 / (R * |its region|) to PRO once positive.
  region_sizes = np.bincount(labels[anomalous])
  weights = 1.0 / (num_regions * region_sizes[labels[anomalous]])
  normal_counts = np.bincount(bins[~anomalous], minlength=len(thresholds))
  region_mass = np.bincount(bins[anomalous], weights=weights,
                            minlength=len(thresholds))
  # Walk thresholds from the largest down; accumulate what becomes positive.
  fpr = np.cumsum(normal_counts[::-1]) / num_normal
  pro = np.cumsum(region_mass[::-1])
  return (np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro]),
          thresholds[::-1])


def aupro(maps: Any, masks: Any, max_fpr: float = 0.3,
          num_thresholds: int | None = None) -> float:
  """Standard AUPRO (Bergmann et al., IJCV 2021), normalised to [0, 1].

  The area under the PRO-versus-FPR curve of `pro_curve` (shared thresholds,
  PRO averaged over all regions of all images, FPR over all normal pixels)
  for FPR in [0, max_fpr], interpolated linearly at max_fpr, divided by
  max_fpr. Exact by default; see `pro_curve` for `num_thresholds`. A few
  seconds on one CPU core for 100 maps of 256x256 (it sorts every pixel).

  Args:
    maps: [N, H, W] anomaly maps (higher = more anomalous).
    masks: [N, H, W] ground truth, True (or 1) = anomalous pixel.
    max_fpr: Upper integration limit, in (0, 1].
    num_thresholds: None for the exact curve, or an int for an even grid.

  Returns:
    The normalised AUPRO as a Python float.
  """
  if not 0.0 < max_fpr <= 1.0:
    raise DataError(f'aupro: max_fpr must be in (0, 1], got {max_fpr}.')
  fpr, pro, _ = pro_curve(maps, masks, num_thresholds)
  return truncated_auc(fpr, pro, max_fpr)


def pro_rd4ad_per_image(maps: Any, masks: Any, num_thresholds: int = 200,
                        max_fpr: float = 0.3) -> float:
  """The PRO score of the official RD4AD evaluation (non-standard).

  How it differs from `aupro`: it is computed per anomalous image and then
  averaged over those images (images without anomalous pixels are skipped);
  each image gets its own `num_thresholds` thresholds min + k * (max - min) /
  num_thresholds, k = 0..num_thresholds-1, from that image's map range; a
  pixel is positive when its score is strictly above the threshold; FPR
  counts only that image's normal pixels; points with FPR < max_fpr are kept
  and FPR is divided by its own largest kept value (not by max_fpr) before
  the trapezoid, with no interpolation at the cut and no (0, 0) point.
  Regions are 8-connected, as with skimage's default labelling. An image
  whose kept FPRs are all zero gives NaN, as in the official code.

  Args:
    maps: [N, H, W] anomaly maps.
    masks: [N, H, W] ground truth, True (or 1) = anomalous pixel.
    num_thresholds: Thresholds per image (200 in the official code).
    max_fpr: Points with FPR below this are kept.

  Returns:
    The mean over anomalous images, as a Python float.
  """
  maps, masks = _check_pixel_inputs(maps, masks, 'pro_rd4ad_per_image')
  per_image = []
  for amap, mask in zip(maps, masks):
    labels, num_regions = label_regions(mask[None])
    if num_regions == 0:
      continue
    amap, labels = amap.ravel().astype(np.float64), labels.ravel()
    low = amap.min()
    delta = (amap.max() - low) / num_thresholds
    thresholds = low + delta * np.arange(num_thresholds)
    # Pixel p is above threshold k exactly when k < above[p].
    above = np.searchsorted(thresholds, amap, side='left')
    counts = np.bincount(labels * (num_thresholds + 1) + above,
                         minlength=(num_regions + 1) * (num_thresholds + 1))
    counts = counts.reshape(num_regions + 1, num_thresholds + 1)
    # positives[r, k] = number of pixels of region r (0: normal) above k.
    positives = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1][:, 1:]
    sizes = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid='ignore', divide='ignore'):
      pro = np.mean(positives[1:] / sizes[1:], axis=0)
      fpr = positives[0] / sizes[0]
      kept = fpr < max_fpr
      fpr, pro = fpr[kept], pro[kept]
      fpr = fpr / fpr.max() if fpr.size else fpr
    # FPR falls as the threshold rises; integrate left to right.
    per_image.append(float(np.trapezoid(pro[::-1], fpr[::-1])))
  if not per_image:
    raise DataError('pro_rd4ad_per_image: no image has anomalous pixels.')
  return float(np.mean(per_image))


# ----------------------------------------------------------------------------
# Visualisation.
# ----------------------------------------------------------------------------


def jet_colormap(values: np.ndarray) -> np.ndarray:
  """Blue-cyan-yellow-red ramp of values in [0, 1]: [...] -> [..., 3]."""
  values = np.clip(values, 0.0, 1.0)[..., None]
  centres = np.array([0.75, 0.5, 0.25])  # Where red, green, blue peak.
  return np.clip(1.5 - np.abs(4.0 * (values - centres)), 0.0, 1.0)


def mask_contour(masks: np.ndarray) -> np.ndarray:
  """Mask pixels with a 4-neighbour outside the mask: [..., H, W] bool."""
  padded = np.pad(masks, [(0, 0)] * (masks.ndim - 2) + [(1, 1), (1, 1)],
                  mode='edge')
  inner = (padded[..., :-2, 1:-1] & padded[..., 2:, 1:-1]
           & padded[..., 1:-1, :-2] & padded[..., 1:-1, 2:])
  return masks & ~inner


def save_overlays(images: Any, maps: Any, masks: Any, directory: Any,
                  names: Sequence[str] | None = None, alpha: float = 0.5,
                  contour_color: Sequence[float] = (1.0, 1.0, 1.0)
                  ) -> list[str]:
  """Writes heat-map overlays as PNG files.

  The maps are min-max normalised over the whole set (so colours compare
  across images), coloured with `jet_colormap` and alpha-blended onto the
  images; the ground-truth outline is drawn on top when masks are given.

  Args:
    images: [N, H, W, C] images in [0, 1], C = 1 or 3.
    maps: [N, H, W] anomaly maps at the image resolution.
    masks: [N, H, W] ground truth, or None.
    directory: Output folder (str or path), created if missing.
    names: N file names without extension (may contain subfolders);
      default '0000', '0001', ...
    alpha: Weight of the heat map in the blend.
    contour_color: RGB in [0, 1] of the mask outline.

  Returns:
    The paths written, in order.
  """
  images, maps = np.asarray(images, np.float64), np.asarray(maps, np.float64)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise DataError(f'save_overlays: images must be [N, H, W, 1 or 3], got '
                    f'{images.shape}.')
  if maps.shape != images.shape[:3]:
    raise DataError(f'save_overlays: maps {maps.shape} must be [N, H, W] of '
                    f'images {images.shape}.')
  if masks is not None and np.shape(masks) != maps.shape:
    raise DataError(f'save_overlays: masks {np.shape(masks)} must match maps '
                    f'{maps.shape}.')
  if names is None:
    names = [f'{i:04d}' for i in range(len(maps))]
  if len(names) != len(maps):
    raise DataError(f'save_overlays: {len(names)} names for {len(maps)} maps.')
  span = maps.max() - maps.min()
  normalised = (maps - maps.min()) / span if span > 0 else np.zeros_like(maps)
  rgb = np.broadcast_to(images, images.shape[:3] + (3,))
  blended = (1.0 - alpha) * np.clip(rgb, 0.0, 1.0) + alpha * jet_colormap(
      normalised)
  if masks is not None:
    blended[mask_contour(np.asarray(masks, bool))] = contour_color
  pixels = np.round(blended * 255.0).astype(np.uint8)
  paths = []
  for name, image in zip(names, pixels):
    path = os.path.join(directory, f'{name}.png')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path)
    paths.append(path)
  return paths
