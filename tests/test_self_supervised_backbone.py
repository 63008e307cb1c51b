"""A two-stage run's ImageNet-layout backbone, reused by the localisers."""

import json
import types

import numpy as np
import pytest

from jax_oneclass import checkpointing, train
from jax_oneclass.components import pretrained
from jax_oneclass.errors import CheckpointError, ConfigError
from jax_oneclass.methods.gradient_preference import (
  method as gradient_preference,
)
from jax_oneclass.methods.reverse_distillation import (
  method as reverse_distillation,
)
from jax_oneclass.methods.two_stage import family as two_stage
from jax_oneclass.components import backbones
from tests.conftest import load_config, tiny_config

pytestmark = pytest.mark.xdist_group("ssl_run")  # One worker trains it once.


# Session-scoped: a module fixture is rebuilt when xdist interleaves modules.
@pytest.fixture(scope="session")
def ssl_run(tmp_path_factory):
  """Two DisAug steps of a torchvision-layout ResNet on digits."""
  workdir = tmp_path_factory.mktemp("disaug_resnet_tiny")
  config = tiny_config("disaug", steps=2)
  config.model.arch = "resnet_tiny"
  config.data.image_size = 16
  train.train(config, workdir)
  return workdir


def _saved_backbone(workdir):
  checkpointer = checkpointing.Checkpointer(workdir / "checkpoints")
  state, _ = checkpointer.restore(checkpointer.latest_step(), None)
  checkpointer.close()
  return state["params"]["backbone"], state["batch_stats"]["backbone"]


def test_the_run_trains_torchvisions_layout(ssl_run):
  params, batch_stats = _saved_backbone(ssl_run)
  # Grey digits are repeated to RGB, so the stem takes 3 channels.
  assert params["conv1"]["kernel"].shape == (7, 7, 3, 8)
  assert "layer4_0" in params and "layer4_0" in batch_stats


def test_its_backbone_loads_without_layer4(ssl_run):
  variables = pretrained.load_or_announce_random(
    str(ssl_run), "resnet_tiny", "Backbone"
  )
  params, batch_stats = _saved_backbone(ssl_run)
  assert not any(k.startswith("layer4") for k in variables["params"])
  np.testing.assert_array_equal(
    variables["params"]["layer3_0"]["conv2"]["kernel"],
    params["layer3_0"]["conv2"]["kernel"],
  )
  np.testing.assert_array_equal(
    variables["batch_stats"]["bn1"]["mean"], batch_stats["bn1"]["mean"]
  )
  features = backbones.frozen_features(
    backbones.resnet_tiny(), variables, np.zeros((2, 32, 32, 3), np.float32)
  )
  assert features["layer3"].shape == (2, 2, 2, 32)


def test_only_the_backbone_is_read_from_the_checkpoint(ssl_run):
  checkpoint_dir = ssl_run / "checkpoints"
  step = checkpointing.Checkpointer(checkpoint_dir).latest_step()
  state, meta = checkpointing.restore_parts(
    checkpoint_dir, step, [("params", "backbone")]
  )
  assert list(state) == ["params"] and list(state["params"]) == ["backbone"]
  assert meta["method"] == "disaug"
  params, _ = _saved_backbone(ssl_run)
  np.testing.assert_array_equal(
    state["params"]["backbone"]["conv1"]["kernel"], params["conv1"]["kernel"]
  )
  with pytest.raises(CheckpointError, match="has no params/generator"):
    checkpointing.restore_parts(checkpoint_dir, step, [("params", "generator")])


@pytest.mark.parametrize(
  "name, module, role",
  [
    ("gradient_preference", gradient_preference, "backbone"),
    ("reverse_distillation", reverse_distillation, "teacher"),
  ],
)
def test_localisers_take_the_workdir_as_model_pretrained(
  ssl_run, name, module, role
):
  config = load_config(name, "digits")
  config.model.backbone = "resnet_tiny"
  config.model.pretrained = str(ssl_run)
  config.data.image_size = 32
  info = types.SimpleNamespace(
    image_shape=(32, 32, 1),
    num_train=64,
    epoch_size=64,
    class_names=[str(i) for i in range(10)],
  )
  method = module.Method(config, info)
  params, _ = _saved_backbone(ssl_run)
  assert method.pretrained is not None, role
  np.testing.assert_array_equal(
    method.pretrained["params"]["conv1"]["kernel"], params["conv1"]["kernel"]
  )


def test_workdirs_that_do_not_fit_are_refused(ssl_run, tmp_path):
  with pytest.raises(CheckpointError, match="model.arch='resnet_tiny'"):
    pretrained.load_self_supervised(str(ssl_run), "resnet50")
  with pytest.raises(CheckpointError, match="no readable config.json"):
    pretrained.load_self_supervised(str(tmp_path), "resnet_tiny")
  (tmp_path / "config.json").write_text(
    json.dumps({"model": {"arch": "cifar"}})
  )
  with pytest.raises(CheckpointError, match="--config.model.arch=resnet_tiny"):
    pretrained.load_self_supervised(str(tmp_path), "resnet_tiny")
  (tmp_path / "config.json").write_text(
    json.dumps({"model": {"arch": "resnet_tiny"}})
  )
  with pytest.raises(CheckpointError, match="No checkpoints/"):
    pretrained.load_self_supervised(str(tmp_path), "resnet_tiny")


def test_unknown_two_stage_arch_is_a_config_error():
  config = load_config("disaug", "digits")
  config.model.arch = "vgg16"
  info = types.SimpleNamespace(
    image_shape=(16, 16, 1), num_train=64, epoch_size=256
  )
  with pytest.raises(ConfigError, match="Unknown model.arch 'vgg16'"):
    two_stage.TwoStageMethod(config, info)
