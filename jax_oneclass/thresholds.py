"""Decision thresholds, score normalisation and binary metrics (NumPy).

An image (or pixel) is predicted anomalous when its score is strictly above
the threshold. Thresholds are calibrated on normal images held out from
training (or, with cross-fitting, scored by a stage fitted without them):
the threshold at a target false-positive rate is the smallest such score
that at most `fpr` of them exceed. The normalised score maps the threshold
to 0.5 and keeps the order of scores (see `normalize`).
"""

from typing import Any

import numpy as np

from jax_oneclass.errors import DataError


def fpr_threshold(normal_scores: Any, fpr: float) -> float:
  """The threshold at which at most `fpr` of `normal_scores` are flagged.

  With n scores sorted ascending, floor(fpr * n) of them may lie above it,
  so it is the (n - floor(fpr * n))-th smallest score.
  """
  scores = np.sort(np.asarray(normal_scores, np.float64).ravel())
  if scores.size == 0:
    raise DataError("fpr_threshold: no normal scores to calibrate on.")
  if not 0.0 <= fpr < 1.0:
    raise DataError(f"fpr_threshold: fpr must be in [0, 1), got {fpr}.")
  allowed = int(np.floor(fpr * scores.size + 1e-9))
  return float(scores[scores.size - allowed - 1])


def f1_optimal_threshold(scores: Any, is_anomaly: Any) -> tuple[float, float]:
  """(threshold, F1) of the threshold that maximises F1 on labelled scores.

  Candidates are every distinct score (predicting those strictly above it)
  and one below all scores (predicting every image anomalous); the largest
  threshold wins a tie.
  """
  scores = np.asarray(scores, np.float64).ravel()
  labels = np.asarray(is_anomaly).ravel().astype(bool)
  if not labels.any():
    raise DataError("f1_optimal_threshold: no anomalous examples.")
  order = np.argsort(-scores, kind="stable")
  sorted_scores, sorted_labels = scores[order], labels[order]
  # Cutting after position k flags the k + 1 highest scores; only cuts
  # between distinct values are thresholds.
  true_pos = np.cumsum(sorted_labels)
  flagged = np.arange(1, scores.size + 1)
  cuts = np.flatnonzero(np.append(sorted_scores[1:] < sorted_scores[:-1], True))
  f1 = 2.0 * true_pos[cuts] / (flagged[cuts] + labels.sum())
  best = int(np.argmax(f1))  # First maximum: the fewest flagged images.
  cut = cuts[best]
  below = (
    sorted_scores[cut + 1]
    if cut + 1 < scores.size
    else (sorted_scores[cut] - 1.0)
  )
  return float(below), float(f1[best])


def binary_metrics(scores: Any, is_anomaly: Any, threshold: float) -> dict:
  """Precision, recall, F1 and false-positive rate at `threshold`."""
  predicted = np.asarray(scores).ravel() > threshold
  labels = np.asarray(is_anomaly).ravel().astype(bool)
  true_pos = int(np.sum(predicted & labels))
  flagged, positives = int(predicted.sum()), int(labels.sum())
  negatives = labels.size - positives
  precision = true_pos / flagged if flagged else 0.0
  recall = true_pos / positives if positives else 0.0
  f1 = (
    2 * precision * recall / (precision + recall) if precision + recall else 0.0
  )
  fpr = (flagged - true_pos) / negatives if negatives else 0.0
  return {"precision": precision, "recall": recall, "f1": f1, "fpr": fpr}


def calibrate(normal_scores: Any, fpr: float) -> dict:
  """{'threshold', 'min', 'max', 'fpr', 'count'} of held-out normal scores."""
  scores = np.asarray(normal_scores, np.float64).ravel()
  return {
    "threshold": fpr_threshold(scores, fpr),
    "min": float(scores.min()),
    "max": float(scores.max()),
    "fpr": float(fpr),
    "count": int(scores.size),
  }


def normalize(scores: Any, calibration: dict, xp=np):
  """Scores mapped into (0, 1), the threshold at 0.5, order kept.

  0.5 + 0.5 z / (1 + |z|) with z = 2 (s - threshold) / (max - min) over
  the calibration scores: strictly increasing, so distinct scores stay
  distinct (up to float resolution), with the slope of anomalib's clipped
  line (s - threshold) / (max - min) + 0.5 at the threshold. Its tails
  decay as 1/|z|, not exponentially, so float32 separates scores up to
  about 10^6 spans from the threshold. `xp`: np, or jnp inside a jitted
  export.
  """
  span = calibration["max"] - calibration["min"]
  span = span if span > 0 else 1.0
  scores = xp.asarray(scores, np.float64 if xp is np else None)
  z = 2.0 * (scores - calibration["threshold"]) / span
  return 0.5 + 0.5 * z / (1.0 + xp.abs(z))


def fold_ids(num: int, folds: int) -> np.ndarray:
  """[num] cross-fitting fold of each example: i mod `folds`, so folds
  differ in size by at most one and need no shuffling of an unordered
  training set."""
  if folds < 2 or folds > num:
    raise DataError(
      f"Cross-fitting needs 2 <= eval.calibration_folds <= {num} (the "
      f"normal images fitted on), got {folds}."
    )
  return np.arange(num) % folds
