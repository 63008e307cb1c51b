"""Thresholds, normalisation and binary metrics against direct NumPy."""

import numpy as np
import pytest

from jax_oneclass import thresholds
from jax_oneclass.errors import DataError


def _brute_fpr_threshold(normal, fpr):
  """The smallest normal score t with mean(normal > t) <= fpr."""
  return min(t for t in normal if np.mean(normal > t) <= fpr + 1e-12)


def _brute_f1(scores, labels):
  """(threshold, F1) maximising F1 over 'score > t', largest t on ties."""
  candidates = sorted(set(scores.tolist()) | {scores.min() - 1.0}, reverse=True)
  best = None
  for t in candidates:
    predicted = scores > t
    tp = np.sum(predicted & labels)
    f1 = 2 * tp / (predicted.sum() + labels.sum())
    if best is None or f1 > best[1] + 1e-12:
      best = (t, f1)
  return best


@pytest.mark.parametrize(
  "seed, n, fpr",
  [(0, 11, 0.01), (1, 200, 0.05), (2, 1000, 0.01), (3, 40, 0.0), (4, 7, 0.5)],
)
def test_fpr_threshold_equals_a_direct_computation(seed, n, fpr):
  normal = np.random.default_rng(seed).normal(size=n)
  got = thresholds.fpr_threshold(normal, fpr)
  assert got == _brute_fpr_threshold(normal, fpr)
  assert np.mean(normal > got) <= fpr


def test_fpr_threshold_hand_computed():
  scores = np.arange(1.0, 101.0)  # 1 .. 100.
  assert thresholds.fpr_threshold(scores, 0.01) == 99.0  # Only 100 above.
  assert thresholds.fpr_threshold(scores, 0.1) == 90.0
  assert thresholds.fpr_threshold(scores, 0.0) == 100.0


@pytest.mark.parametrize("seed", range(5))
def test_f1_threshold_equals_a_direct_computation(seed):
  rng = np.random.default_rng(seed)
  labels = rng.random(120) < 0.4
  scores = np.round(rng.normal(size=120) + labels, 1)  # Ties on purpose.
  threshold, f1 = thresholds.f1_optimal_threshold(scores, labels)
  want_threshold, want_f1 = _brute_f1(scores, labels)
  assert f1 == pytest.approx(want_f1)
  assert threshold == pytest.approx(want_threshold)
  assert thresholds.binary_metrics(scores, labels, threshold)["f1"] == (
    pytest.approx(f1)
  )


def test_binary_metrics_hand_computed():
  scores = np.array([0.1, 0.4, 0.6, 0.9, 0.2, 0.7])
  labels = np.array([0, 0, 1, 1, 1, 0], bool)
  got = thresholds.binary_metrics(scores, labels, 0.5)
  # Flagged: 0.6, 0.9, 0.7 -> 2 true positives, 1 false positive.
  assert got == pytest.approx(
    {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "fpr": 1 / 3}
  )


def test_normalize_puts_the_threshold_at_one_half():
  stats = thresholds.calibrate(np.array([1.0, 2.0, 3.0, 5.0]), fpr=0.25)
  assert stats["threshold"] == 3.0 and stats["count"] == 4
  # z = 2 (s - 3) / 4; 0.5 + 0.5 z / (1 + |z|).
  np.testing.assert_allclose(
    thresholds.normalize(np.array([3.0, 5.0, 1.0, 7.0, -1.0]), stats),
    [0.5, 0.75, 0.25, 5 / 6, 1 / 6],
  )


def test_bad_inputs_are_refused():
  with pytest.raises(DataError, match="no normal scores"):
    thresholds.fpr_threshold(np.array([]), 0.01)
  with pytest.raises(DataError, match="fpr must be in"):
    thresholds.fpr_threshold(np.ones(3), 1.0)
  with pytest.raises(DataError, match="no anomalous"):
    thresholds.f1_optimal_threshold(np.ones(3), np.zeros(3))
