"""Input pipelines: sources, augmentations and one-class batch iterators."""

import os

from jax_oneclass import logging_utils

# TensorFlow's C++ start-up lines (oneDNN, absl) reach a Python API user too
# unless it is first imported here, quietly; JAX_ONECLASS_VERBOSE=1 keeps
# them (the CLI's --verbose imports it earlier, loudly).
logging_utils.import_tensorflow(
  quiet=os.environ.get("JAX_ONECLASS_VERBOSE", "") in ("", "0")
)

# pylint: disable=g-import-not-at-top,wrong-import-position
from jax_oneclass.data.augment import parse_augment
from jax_oneclass.data.pipeline import DatasetInfo
from jax_oneclass.data.pipeline import decode_filenames
from jax_oneclass.data.pipeline import dataset_info
from jax_oneclass.data.pipeline import eval_batches
from jax_oneclass.data.pipeline import examples_per_epoch
from jax_oneclass.data.pipeline import to_model_input
from jax_oneclass.data.pipeline import to_model_inputs
from jax_oneclass.data.pipeline import train_batches
from jax_oneclass.data.sources import SOURCE_NAMES

__all__ = [
  "DatasetInfo",
  "SOURCE_NAMES",
  "dataset_info",
  "decode_filenames",
  "eval_batches",
  "examples_per_epoch",
  "parse_augment",
  "to_model_input",
  "to_model_inputs",
  "train_batches",
]
