"""End-to-end training, evaluation, resume and failure handling."""

import shutil

import jax
import numpy as np
import pytest

from jax_oneclass import checkpointing, train
from jax_oneclass import run as run_lib
from jax_oneclass.errors import CheckpointError, Interrupted, NonFiniteLossError
from tests.conftest import tiny_config


def _params(workdir, config):
  run = run_lib.setup(config, workdir)
  state, meta = run_lib.restore(run, run.checkpointer.latest_step())
  run.checkpointer.close()
  return jax.device_get(state.params), meta


def _resume_config(method):
  config = tiny_config(method, steps=6)
  if method == "gradient_preference":  # Halting at 3 splits its phases.
    config.data.image_size = 16
    config.model.mlp_widths = (16, 8)
    config.center_steps = 2
  return config


# DisAug: data position, augmentation keys and optimiser; gradient
# preference: its centre and early-stopping statistics too.
@pytest.mark.parametrize("method", ["disaug", "gradient_preference"])
def test_resume_continues_exactly(tmp_path, method):
  config = _resume_config(method)
  train.train(config, tmp_path / "straight")
  halted = _resume_config(method)
  halted.halt_after_step = 3
  train.train(halted, tmp_path / "resumed")
  assert (
    checkpointing.Checkpointer(
      tmp_path / "resumed" / "checkpoints"
    ).latest_step()
    == 3
  )
  train.train(config, tmp_path / "resumed")  # Continues from step 3.
  straight, meta = _params(tmp_path / "straight", config)
  resumed, meta_resumed = _params(tmp_path / "resumed", config)
  assert meta == meta_resumed and meta["step"] == 6
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), straight, resumed
  )


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = tiny_config("rotnet", steps=30)
  config.optimizer.learning_rate = 1e12
  config.optimizer.schedule = "constant"
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1
  with pytest.raises(NonFiniteLossError, match="last good checkpoint is step"):
    train.train(config, tmp_path)
  params, meta = _params(tmp_path, config)
  assert 0 < meta["step"] < 30
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_corrupt_checkpoint_gives_clear_error_and_keeps_files(tmp_path):
  config = tiny_config("clr", steps=2)
  train.train(config, tmp_path)
  step_dir = tmp_path / "checkpoints" / "2" / "state"
  corrupted = 0
  for path in step_dir.rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(b"garbage")
      corrupted += 1
  assert corrupted
  with pytest.raises(
    CheckpointError,
    match="No checkpoint in .* passed "
    "verification .*corrupt_checkpoints.*step 0",
  ):
    train.train(config, tmp_path)
  moved = list((tmp_path / checkpointing.CORRUPT_DIR).iterdir())
  assert [p.name.split("-")[0] for p in moved] == ["2"]  # Kept, not deleted.
  assert (moved[0] / "state").is_dir()


def test_workdir_of_another_method_is_refused(tmp_path):
  train.train(tiny_config("clr", steps=2), tmp_path)
  shutil.rmtree(tmp_path / "tensorboard")
  with pytest.raises(Exception, match="cannot be restored|another --workdir"):
    train.train(tiny_config("disaug", steps=2), tmp_path)


def test_interrupt_saves_the_current_step(tmp_path, monkeypatch):
  config = tiny_config("clr", steps=10)
  config.checkpoint_every_steps = 100
  config.log_every_steps = 3
  real_batches = train.data.train_batches

  def interrupted_after_three(cfg, start_step):
    batches = real_batches(cfg, start_step)
    for _ in range(3):
      yield next(batches)
    raise KeyboardInterrupt

  monkeypatch.setattr(train.data, "train_batches", interrupted_after_three)
  with pytest.raises(
    Interrupted,
    match="at step 3 of 10; saved the "
    "checkpoint .*3. Run the same command again",
  ):
    train.train(config, tmp_path)
  assert checkpointing.Checkpointer(tmp_path / "checkpoints").latest_step() == 3

  def interrupted_at_once(cfg, start_step):  # E.g. while compiling.
    del cfg, start_step
    raise KeyboardInterrupt
    yield  # pylint: disable=unreachable

  monkeypatch.setattr(train.data, "train_batches", interrupted_at_once)
  with pytest.raises(
    Interrupted,
    match="nothing new to save.*continue from the checkpoint at step 3",
  ):
    train.train(config, tmp_path)


def test_time_based_checkpoints(tmp_path):
  config = tiny_config("clr", steps=3)
  config.checkpoint_every_steps = 100
  config.checkpoint_every_secs = 1e-6  # Due after every step.
  train.train(config, tmp_path)
  assert checkpointing.Checkpointer(tmp_path / "checkpoints").all_steps() == [
    1,
    2,
    3,
  ]


def test_pixel_baseline_is_the_distance_to_the_mean_normal_image(tmp_path):
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  from jax_oneclass import data, evaluate  # pylint: disable=g-import-not-at-top

  config = tiny_config("clr")
  run = run_lib.setup(config, tmp_path, mode="eval")
  scores = evaluate.pixel_baseline(run)
  run.checkpointer.close()

  def images(split):
    out, anomalous = [], []
    for batch in data.eval_batches(config, split, 128):
      keep = batch["mask"].astype(bool)
      out.append(batch["image"][keep])
      anomalous.append(batch["is_anomaly"][keep])
    return np.concatenate(out), np.concatenate(anomalous)

  train_images, _ = images("train")
  test_images, is_anomaly = images("test")
  expected = ((test_images - train_images.mean(0)) ** 2).sum((1, 2, 3))
  np.testing.assert_allclose(scores, expected, rtol=1e-4)
  # Digit 1, the digits default, is the raw pixels' hardest class.
  assert config.data.normal_class == 1
  assert 0.8 < roc_auc_score(is_anomaly, scores) < 0.97


def test_dataset_info_carries_the_epoch_size_and_old_runs_default_it(tmp_path):
  import dataclasses  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from jax_oneclass import data, optim  # pylint: disable=g-import-not-at-top

  config = tiny_config("disaug")  # Rotation copies: 4 examples per image.
  info = data.dataset_info(config)
  assert info.epoch_size == 4 * info.num_train
  assert optim.steps_per_epoch(config, info) == (
    4 * info.num_train // config.batch_size
  )
  fields = dataclasses.asdict(info)
  (tmp_path / "dataset_info.json").write_text(json.dumps(fields))
  assert run_lib.saved_info(tmp_path, config) == info
  del fields["epoch_size"]  # A run saved before the field existed.
  (tmp_path / "dataset_info.json").write_text(json.dumps(fields))
  assert run_lib.saved_info(tmp_path, config) == info
