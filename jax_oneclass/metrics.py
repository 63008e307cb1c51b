"""Evaluation metrics for anomaly scores and maps (host-side NumPy).

Image AUROC, pixel AUROC, the standard AUPRO of Bergmann et al. (IJCV 2021)
and the official RD4AD per-image PRO. Convention throughout: higher score =
more anomalous, label / mask 1 = anomaly.
"""

from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from jax_oneclass.errors import DataError


def auroc(scores: Any, is_anomaly: Any, mask: Any = None) -> float:
  """Area under the ROC curve of anomaly scores, in [0, 1].

  The reference (Sohn et al. 2021, util/metric.py) reports 100 * this value.

  Args:
    scores: Anomaly scores of any shape, e.g. [N] per image or [N, H, W] per
      pixel; higher = more anomalous. NumPy or JAX array.
    is_anomaly: Binary labels (bool or 0/1) of the same shape; 1 = anomaly.
    mask: Optional boolean array of the same shape; entries where it is False
      are dropped before computing the metric.

  Returns:
    The AUROC as a Python float.

  Raises:
    DataError: shapes differ, labels are not binary, kept scores are not
      finite, nothing is kept, or only one class is present.
  """
  scores = np.asarray(scores)
  labels = np.asarray(is_anomaly)
  if scores.shape != labels.shape:
    raise DataError(
      f"auroc: scores {scores.shape} and is_anomaly {labels.shape} must "
      "have the same shape."
    )
  if mask is not None:
    mask = np.asarray(mask)
    if mask.shape != scores.shape:
      raise DataError(
        f"auroc: mask {mask.shape} must have the shape of scores "
        f"{scores.shape}."
      )
    if mask.dtype != np.bool_:
      raise DataError(f"auroc: mask must be boolean, got {mask.dtype}.")
    scores, labels = scores[mask], labels[mask]
  scores, labels = scores.ravel(), labels.ravel()
  if scores.size == 0:
    raise DataError("auroc: no scores to evaluate (empty input or all masked).")
  if not np.isin(labels, (0, 1)).all():
    raise DataError(
      "auroc: is_anomaly must be binary (bool or 0/1), got values "
      f"{np.unique(labels)[:10].tolist()}."
    )
  if not np.isfinite(scores).all():
    raise DataError(
      f"auroc: {np.count_nonzero(~np.isfinite(scores))} of {scores.size} "
      "scores are NaN or infinite."
    )
  labels = labels.astype(bool)
  num_anomalies = int(labels.sum())
  if num_anomalies in (0, labels.size):
    present = "anomalous" if num_anomalies else "normal"
    raise DataError(
      f"auroc: needs both normal and anomalous samples, but all "
      f"{labels.size} are {present}."
    )
  return float(roc_auc_score(labels, scores))


def _check_pixel_inputs(
  maps: Any, masks: Any, name: str
) -> tuple[np.ndarray, np.ndarray]:
  """Host arrays [N, H, W] of finite scores and boolean masks."""
  maps, masks = np.asarray(maps), np.asarray(masks)
  if maps.ndim != 3 or maps.shape != masks.shape:
    raise DataError(
      f"{name}: maps {maps.shape} and masks {masks.shape} must "
      "both be [N, H, W]."
    )
  if masks.dtype != np.bool_:
    if not np.isin(masks, (0, 1)).all():
      raise DataError(f"{name}: masks must be boolean or 0/1.")
    masks = masks.astype(bool)
  if not np.isfinite(maps).all():
    raise DataError(
      f"{name}: {np.count_nonzero(~np.isfinite(maps))} map "
      "values are NaN or infinite."
    )
  return maps, masks


def pixel_auroc(maps: Any, masks: Any) -> float:
  """AUROC over all pixels of all images, normal images included.

  Args:
    maps: [N, H, W] anomaly maps (higher = more anomalous).
    masks: [N, H, W] ground truth, True (or 1) = anomalous pixel.

  Returns:
    The AUROC as a Python float.
  """
  maps, masks = _check_pixel_inputs(maps, masks, "pixel_auroc")
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
  keep = int(np.searchsorted(fpr, max_fpr, side="right"))
  x, y = fpr[:keep], pro[:keep]
  if keep < len(fpr) and x[-1] < max_fpr:
    step = (max_fpr - fpr[keep - 1]) / (fpr[keep] - fpr[keep - 1])
    cut = pro[keep - 1] + step * (pro[keep] - pro[keep - 1])
    x, y = np.append(x, max_fpr), np.append(y, cut)
  return float(np.trapezoid(y, x) / max_fpr)


def pro_curve(
  maps: Any, masks: Any, num_thresholds: int | None = None
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
  maps, masks = _check_pixel_inputs(maps, masks, "aupro")
  labels, num_regions = label_regions(masks)
  num_normal = masks.size - np.count_nonzero(masks)
  if num_regions == 0 or num_normal == 0:
    raise DataError(
      f"aupro: needs both anomalous and normal pixels, got "
      f"{masks.size - num_normal} anomalous of {masks.size}."
    )
  scores, labels = maps.ravel(), labels.ravel()
  if num_thresholds is None:
    thresholds, bins = np.unique(scores, return_inverse=True)
  else:
    if num_thresholds < 2:
      raise DataError(
        f"aupro: num_thresholds must be >= 2 or None, got {num_thresholds}."
      )
    thresholds = np.linspace(scores.min(), scores.max(), num_thresholds)
    # bins[p] = index of the largest threshold <= score p.
    bins = np.searchsorted(thresholds, scores, side="right") - 1
  anomalous = labels > 0
  # Each anomalous pixel adds 1 / (R * |its region|) to PRO once positive.
  region_sizes = np.bincount(labels[anomalous])
  weights = 1.0 / (num_regions * region_sizes[labels[anomalous]])
  normal_counts = np.bincount(bins[~anomalous], minlength=len(thresholds))
  region_mass = np.bincount(
    bins[anomalous], weights=weights, minlength=len(thresholds)
  )
  # Walk thresholds from the largest down; accumulate what becomes positive.
  fpr = np.cumsum(normal_counts[::-1]) / num_normal
  pro = np.cumsum(region_mass[::-1])
  return (
    np.concatenate([[0.0], fpr]),
    np.concatenate([[0.0], pro]),
    thresholds[::-1],
  )


def aupro(
  maps: Any, masks: Any, max_fpr: float = 0.3, num_thresholds: int | None = None
) -> float:
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
    raise DataError(f"aupro: max_fpr must be in (0, 1], got {max_fpr}.")
  fpr, pro, _ = pro_curve(maps, masks, num_thresholds)
  return truncated_auc(fpr, pro, max_fpr)


def pro_rd4ad_per_image(
  maps: Any, masks: Any, num_thresholds: int = 200, max_fpr: float = 0.3
) -> float:
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
  maps, masks = _check_pixel_inputs(maps, masks, "pro_rd4ad_per_image")
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
    above = np.searchsorted(thresholds, amap, side="left")
    counts = np.bincount(
      labels * (num_thresholds + 1) + above,
      minlength=(num_regions + 1) * (num_thresholds + 1),
    )
    counts = counts.reshape(num_regions + 1, num_thresholds + 1)
    # positives[r, k] = number of pixels of region r (0: normal) above k.
    positives = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1][:, 1:]
    sizes = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
      pro = np.mean(positives[1:] / sizes[1:], axis=0)
      fpr = positives[0] / sizes[0]
      kept = fpr < max_fpr
      fpr, pro = fpr[kept], pro[kept]
      fpr = fpr / fpr.max() if fpr.size else fpr
    # FPR falls as the threshold rises; integrate left to right.
    per_image.append(float(np.trapezoid(pro[::-1], fpr[::-1])))
  if not per_image:
    raise DataError("pro_rd4ad_per_image: no image has anomalous pixels.")
  return float(np.mean(per_image))
