"""Evaluation metrics for anomaly scores (host-side NumPy / scikit-learn).

Convention throughout: higher score = more anomalous, label 1 = anomaly.
"""

from typing import Any

import numpy as np
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
        f'auroc: scores {scores.shape} and is_anomaly {labels.shape} must '
        'have the same shape.')
  if mask is not None:
    mask = np.asarray(mask)
    if mask.shape != scores.shape:
      raise DataError(
          f'auroc: mask {mask.shape} must have the shape of scores '
          f'{scores.shape}.')
    if mask.dtype != np.bool_:
      raise DataError(f'auroc: mask must be boolean, got {mask.dtype}.')
    scores, labels = scores[mask], labels[mask]
  scores, labels = scores.ravel(), labels.ravel()
  if scores.size == 0:
    raise DataError('auroc: no scores to evaluate (empty input or all masked).')
  if not np.isin(labels, (0, 1)).all():
    raise DataError(
        'auroc: is_anomaly must be binary (bool or 0/1), got values '
        f'{np.unique(labels)[:10].tolist()}.')
  if not np.isfinite(scores).all():
    raise DataError(
        f'auroc: {np.count_nonzero(~np.isfinite(scores))} of {scores.size} '
        'scores are NaN or infinite.')
  labels = labels.astype(bool)
  num_anomalies = int(labels.sum())
  if num_anomalies in (0, labels.size):
    present = 'anomalous' if num_anomalies else 'normal'
    raise DataError(
        f'auroc: needs both normal and anomalous samples, but all '
        f'{labels.size} are {present}.')
  return float(roc_auc_score(labels, scores))
