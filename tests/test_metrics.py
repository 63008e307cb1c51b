"""Tests for jax_oneclass.metrics."""

import jax.numpy as jnp
import numpy as np
import pytest

from jax_oneclass.errors import DataError
from jax_oneclass.metrics import auroc


def test_auroc_hand_computed():
  # Pairs (anomaly, normal): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4.
  assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_auroc_accepts_jax_and_bool_labels():
  got = auroc(
    jnp.array([0.1, 0.4, 0.35, 0.8]), jnp.array([False, False, True, True])
  )
  assert got == pytest.approx(0.75)


def test_auroc_ties_count_half():
  assert auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)


def test_auroc_mask_drops_entries():
  scores = [0.1, 0.4, 0.35, 0.8, np.nan]
  labels = [0, 0, 1, 1, 0]
  # Dropping the 0.4 normal and the NaN leaves a perfect ranking.
  mask = np.array([True, False, True, True, False])
  assert auroc(scores, labels, mask=mask) == pytest.approx(1.0)


def test_auroc_multidimensional():
  scores = np.array([[0.1, 0.4], [0.35, 0.8]])
  labels = np.array([[0, 0], [1, 1]])
  assert auroc(scores, labels) == pytest.approx(0.75)


@pytest.mark.parametrize(
  "scores, labels, mask, match",
  [
    ([0.1, 0.2], [0, 0], None, "both normal and anomalous"),
    ([0.1, 0.2], [1, 1], None, "both normal and anomalous"),
    ([0.1, 0.2, 0.3], [0, 1], None, "same shape"),
    ([0.1, np.nan], [0, 1], None, "NaN"),
    ([0.1, 0.2], [0, 2], None, "binary"),
    ([0.1, 0.2], [0, 1], [True], "mask"),
    ([0.1, 0.2], [0, 1], [1, 1], "boolean"),
    ([0.1, 0.2], [0, 1], [False, False], "no scores"),
  ],
)
def test_auroc_errors(scores, labels, mask, match):
  with pytest.raises(DataError, match=match):
    auroc(scores, labels, mask=None if mask is None else np.asarray(mask))
