"""Pictures for people: per-image panels and per-scorer score plots.

A panel shows one image, titled with its name, score, threshold and
verdict; for localising methods also its heat map (normalised so the pixel
threshold is the middle of the colour ramp), the predicted mask's outline
and the ground-truth outline. A score plot shows a scorer's ROC curve and
its normal vs anomalous score histograms with the threshold.
"""

import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jax_oneclass import thresholds
from jax_oneclass.errors import DataError

PREDICTED_COLOR = (255, 40, 40)  # Outline of the predicted mask.
TRUTH_COLOR = (40, 255, 40)  # Outline of the ground-truth mask.
_MIN_SIDE = 224  # Small images are enlarged (nearest) to this side.
_MIN_TITLE_WIDTH = 460  # Room for the title lines.


def jet_colormap(values: np.ndarray) -> np.ndarray:
  """Blue-cyan-yellow-red ramp of values in [0, 1]: [...] -> [..., 3]."""
  values = np.clip(values, 0.0, 1.0)[..., None]
  centres = np.array([0.75, 0.5, 0.25])  # Where red, green, blue peak.
  return np.clip(1.5 - np.abs(4.0 * (values - centres)), 0.0, 1.0)


def mask_contour(masks: np.ndarray) -> np.ndarray:
  """Mask pixels with a 4-neighbour outside the mask: [..., H, W] bool."""
  padded = np.pad(
    masks, [(0, 0)] * (masks.ndim - 2) + [(1, 1), (1, 1)], mode="edge"
  )
  inner = (
    padded[..., :-2, 1:-1]
    & padded[..., 2:, 1:-1]
    & padded[..., 1:-1, :-2]
    & padded[..., 1:-1, 2:]
  )
  return masks & ~inner


def _rgb(image: np.ndarray) -> np.ndarray:
  """[H, W, 1 or 3] in [0, 1] -> uint8 [H, W, 3]."""
  image = np.asarray(image, np.float64)
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise DataError(f"Images must be [H, W, 1 or 3], got {image.shape}.")
  image = np.broadcast_to(image, image.shape[:2] + (3,))
  return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _enlarge(pixels: np.ndarray, factor: int) -> np.ndarray:
  return pixels.repeat(factor, axis=0).repeat(factor, axis=1)


def _outline(pixels: np.ndarray, mask: np.ndarray, factor: int, color) -> None:
  """Draws the outline of `mask` (at the image's size) onto enlarged
  `pixels`, in place."""
  pixels[mask_contour(_enlarge(np.asarray(mask, bool), factor))] = color


def overlay(
  image: np.ndarray, normalized_map: np.ndarray, alpha: float = 0.5
) -> np.ndarray:
  """A heat map in [0, 1] blended onto an image: uint8 [H, W, 3]."""
  heat = jet_colormap(np.asarray(normalized_map, np.float64)) * 255.0
  blended = (1.0 - alpha) * _rgb(image) + alpha * heat
  return np.round(blended).astype(np.uint8)


def _font(size: int):
  return ImageFont.load_default(size=size)


def panel(
  image,
  name: str,
  score: float,
  calibration: dict,
  scorer: str,
  anomaly_map=None,
  map_calibration: dict | None = None,
  mask=None,
  is_anomaly: int | None = None,
) -> Image.Image:
  """One image's panel (see the module docstring) as a PIL image."""
  pixels = _rgb(image)
  factor = max(1, -(-_MIN_SIDE // max(pixels.shape[:2])))
  tiles = [_enlarge(pixels, factor)]
  if anomaly_map is not None:
    normalized = thresholds.normalize(anomaly_map, map_calibration)
    heat = _enlarge(overlay(image, normalized), factor)
    predicted = anomaly_map > map_calibration["threshold"]
    _outline(heat, predicted, factor, PREDICTED_COLOR)
    if mask is not None:
      _outline(heat, mask, factor, TRUTH_COLOR)
    tiles.append(heat)
  truth = (
    ""
    if is_anomaly is None
    else f"   (truth: {'anomalous' if is_anomaly else 'normal'})"
  )
  legend = "image"
  if anomaly_map is not None:
    legend += " | heat map (blue low, red high); outlines: red = predicted"
    legend += ", green = ground truth" if mask is not None else ""
  return _compose(tiles, name, score, calibration, scorer, legend, truth)


def explanation_panel(
  image,
  name: str,
  score: float,
  calibration: dict,
  scorer: str,
  maps: dict,
) -> Image.Image:
  """One image's explanations: the image, then per explanation its heat
  map and its overlay on the image (`maps`: {name: [H, W] in [0, 1]})."""
  pixels = _rgb(image)
  factor = max(1, -(-_MIN_SIDE // max(pixels.shape[:2])))
  tiles = [_enlarge(pixels, factor)]
  for values in maps.values():
    heat = np.round(jet_colormap(np.asarray(values)) * 255.0).astype(np.uint8)
    tiles.append(_enlarge(heat, factor))
    tiles.append(_enlarge(overlay(image, values), factor))
  legend = "image | " + " | ".join(f"{k}: heat map, overlay" for k in maps)
  return _compose(
    tiles, name, score, calibration, scorer, legend + " (blue low, red high)"
  )


def _compose(
  tiles: list,
  name: str,
  score: float,
  calibration: dict,
  scorer: str,
  legend: str,
  truth: str = "",
) -> Image.Image:
  """Tiles side by side under a title (name, score, threshold, verdict)
  and above a legend."""
  height, width = tiles[0].shape[:2]
  gap, title_height = 8, 62
  tiles_width = len(tiles) * (width + gap) + gap
  canvas_width = max(tiles_width, _MIN_TITLE_WIDTH)
  left = (canvas_width - tiles_width) // 2
  canvas = Image.new(
    "RGB", (canvas_width, height + title_height + gap + 16), (24, 24, 24)
  )
  for i, tile in enumerate(tiles):
    canvas.paste(
      Image.fromarray(tile), (left + gap + i * (width + gap), title_height)
    )
  draw = ImageDraw.Draw(canvas)
  flagged = score > calibration["threshold"]
  verdict = "ANOMALOUS" if flagged else "normal"
  normalized_score = float(thresholds.normalize(score, calibration))
  draw.text((gap, 4), name[-64:], fill=(235, 235, 235), font=_font(15))
  draw.text(
    (gap, 24),
    f"{scorer}: {score:.4g}   threshold {calibration['threshold']:.4g}"
    f"   normalised {normalized_score:.2f}",
    fill=(200, 200, 200),
    font=_font(13),
  )
  draw.text(
    (gap, 42),
    verdict + truth,
    fill=(255, 90, 90) if flagged else (120, 220, 120),
    font=_font(13),
  )
  draw.text(
    (gap, title_height + height + 4),
    legend,
    fill=(160, 160, 160),
    font=_font(11),
  )
  return canvas


def _file_stem(index: int, name: str) -> str:
  base = os.path.splitext(os.path.basename(name))[0] if name else ""
  return f"{index:04d}" + (
    ("_" + re.sub(r"[^A-Za-z0-9._-]", "_", base)) if base else ""
  )


def save_panels(
  directory,
  images: Any,
  names: Sequence[str],
  scores: Any,
  calibration: dict,
  scorer: str,
  maps: Any = None,
  map_calibration: dict | None = None,
  masks: Sequence[Any] | None = None,
  is_anomaly: Sequence[int] | None = None,
) -> list[str]:
  """Writes one `panel` PNG per image as <directory>/<index>_<name>.png."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  paths = []
  for i, image in enumerate(images):
    picture = panel(
      image,
      names[i],
      float(scores[i]),
      calibration,
      scorer,
      anomaly_map=None if maps is None else maps[i],
      map_calibration=map_calibration,
      mask=None if masks is None else masks[i],
      is_anomaly=None if is_anomaly is None else int(is_anomaly[i]),
    )
    path = directory / f"{_file_stem(i, names[i])}.png"
    picture.save(path)
    paths.append(str(path))
  return paths


def save_score_plot(
  path, scores: Any, is_anomaly: Any, threshold: float, title: str
) -> None:
  """ROC curve and normal / anomalous score histograms of one scorer."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from sklearn.metrics import roc_curve  # pylint: disable=g-import-not-at-top

  scores = np.asarray(scores, np.float64)
  labels = np.asarray(is_anomaly).astype(bool)
  fpr, tpr, _ = roc_curve(labels, scores)
  at = thresholds.binary_metrics(scores, labels, threshold)
  figure, (roc, hist) = plt.subplots(1, 2, figsize=(10, 4))
  roc.plot(fpr, tpr, color="tab:blue")
  roc.plot([0, 1], [0, 1], color="0.7", linestyle="--")
  roc.plot(
    [at["fpr"]],
    [at["recall"]],
    "o",
    color="tab:red",
    label=f"threshold: FPR {at['fpr']:.3f}, TPR {at['recall']:.3f}",
  )
  roc.set(
    xlabel="false-positive rate",
    ylabel="true-positive rate",
    title="ROC curve",
    xlim=(0, 1),
    ylim=(0, 1.01),
  )
  roc.legend(loc="lower right")
  bins = np.histogram_bin_edges(scores, bins=40)
  # Densities, so a class of a few images shows beside one of thousands.
  hist.hist(
    scores[~labels],
    bins=bins,
    alpha=0.6,
    color="tab:green",
    density=True,
    label=f"normal ({(~labels).sum()} images)",
  )
  hist.hist(
    scores[labels],
    bins=bins,
    alpha=0.6,
    color="tab:red",
    density=True,
    label=f"anomalous ({labels.sum()} images)",
  )
  hist.axvline(
    threshold,
    color="black",
    linestyle="--",
    label=f"held-out threshold {threshold:.4g}",
  )
  hist.set(
    xlabel="score (higher = more anomalous)",
    ylabel="density",
    title="Test scores",
  )
  hist.legend()
  figure.suptitle(title)
  figure.tight_layout()
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=90)
  plt.close(figure)
