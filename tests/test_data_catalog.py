"""TFDS catalog data sets, read through tfds.testing.mock_data (offline)."""

from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jax_oneclass import data
from tests.conftest import tiny_config


@pytest.mark.parametrize(
  "name, num_classes",
  [
    ("cifar10", 10),
    ("cifar100", 20),
    ("fashion_mnist", 10),
    ("mnist", 10),
    ("cats_vs_dogs", 2),
  ],
)
def test_catalog_sources_give_one_class_batches(name, num_classes):
  # mock_data serves random examples with each data set's real features;
  # the builder is marked prepared since nothing is on disk.
  with (
    tfds.testing.mock_data(num_examples=48),
    mock.patch.object(
      tfds.core.DatasetBuilder, "is_prepared", return_value=True
    ),
  ):
    config = tiny_config("clr", arg=name)
    config.data.normal_class = 1
    info = data.dataset_info(config)
    assert len(info.class_names) == num_classes  # cifar100: super-classes.
    assert info.image_shape == (8, 8, 3)  # Grayscale sets tiled to RGB.
    batch = next(data.train_batches(config))
    assert batch["image"].shape == (16, 2, 8, 8, 3)
    assert (batch["label"] == 1).all() and not batch["is_anomaly"].any()
    test = list(data.eval_batches(config, "test", 32))
    assert sum(b["mask"].sum() for b in test) == info.num_test
    labels = np.concatenate([b["label"][b["mask"]] for b in test])
    anomalies = np.concatenate([b["is_anomaly"][b["mask"]] for b in test])
    np.testing.assert_array_equal(anomalies, labels != 1)
