"""Shared test fixtures: tiny configs that train in seconds on a CPU."""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Many tests (and the CLI subprocesses they start) compile the same tiny
# steps: one persistent compilation cache for the session saves minutes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(
    prefix="jax_oneclass_test_compile_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import importlib.util  # pylint: disable=g-import-not-at-top
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_config(method: str, arg: str = "digits"):
  """`configs/<method>.py:<arg>` as the CLI would load it."""
  spec = importlib.util.spec_from_file_location(
      f"config_{method}", REPO / "configs" / f"{method}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_config(method: str, steps: int = 4, arg: str = "digits"):
  """A very small network and run on the digits data."""
  config = load_config(method, arg)
  config.num_train_steps = steps
  config.batch_size = 16
  config.data.shuffle_buffer = 64
  config.model.width = 4
  if "head_dims" in config.model:  # Two-stage family: ResNet + MLP head.
    config.data.image_size = 8
    config.model.stage_sizes = (1, 1)
    config.model.head_dims = (16, 8)
  else:  # GAN family: DCGANs need a power-of-two side >= 16.
    config.model.latent_size = 8
  config.eval.batch_size = 128
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.progress_bar = False
  config.optimizer.warmup_steps = 0
  return config


TWO_STAGE_METHODS = ("rotnet", "clr", "disaug")
GAN_METHODS = ("ganomaly", "dgad")


@pytest.fixture(params=TWO_STAGE_METHODS + GAN_METHODS)
def method_name(request):
  return request.param
