"""Calibration: cross-fitting the fitted stage, and the normalised score."""

import shutil
import types

import numpy as np
import pytest

import jax_oneclass
from jax_oneclass import data, evaluate, parallel, thresholds
from jax_oneclass import run as run_lib
from jax_oneclass.components import oneclass
from jax_oneclass.errors import ConfigError, DataError
from tests.conftest import load_config
from tests.trained import by_method

_CLASSIFIERS = {"kde": {}, "gde": {}, "nn": {}}


def _fit(embeddings):
  return oneclass.fit_each(embeddings["feature"], _CLASSIFIERS)


def _score(stage, features):
  scores = oneclass.score_each(stage, features)
  return {k: np.asarray(v) for k, v in scores.items()}


def _binomial_bound(fpr: float, num_calib: int, num_test: int) -> float:
  """4 standard deviations of (test FPR - fpr) when the threshold is the
  order statistic of `num_calib` exchangeable normal scores (a Beta(k+1,
  n-k) false-positive rate) measured on `num_test` normals, plus the
  1/num_calib step between order statistics."""
  var = fpr * (1 - fpr) * (1 / (num_calib + 2) + 1 / num_test)
  return 4.0 * np.sqrt(var) + 1.0 / num_calib


def _features(num: int, seed: int) -> np.ndarray:
  """[num, 8] Gaussian features, off the origin and of unequal scales, so
  their L2-normalised copies (what the classifiers see) spread out."""
  noise = np.random.default_rng(seed).normal(size=(num, 8))
  return (noise * np.linspace(1.0, 0.2, 8) + np.eye(8)[0] * 2.0).astype(
    np.float32
  )


def test_cross_fit_thresholds_hold_their_fpr_on_new_normals():
  train, test = _features(2000, 0), _features(4000, 1)
  fpr, folds = 0.05, 5
  stages, fold = evaluate.cross_fit_stages(_fit, {"feature": train}, folds)
  out_of_fold = evaluate.pick_folds([_score(s, train) for s in stages], fold)
  full = _fit({"feature": train})
  in_sample = _score(full, train)
  on_test = _score(full, test)
  bound = _binomial_bound(fpr, len(train), len(test))
  measured = {
    name: np.mean(on_test[name] > thresholds.fpr_threshold(v, fpr))
    for name, v in out_of_fold.items()
  }
  for name in _CLASSIFIERS:
    assert abs(measured[name] - fpr) <= bound, (name, measured)
  # Scoring the images the stage was fitted on misses it by far: each is
  # its own nearest neighbour.
  threshold = thresholds.fpr_threshold(in_sample["nn"], fpr)
  assert np.mean(on_test["nn"] > threshold) - fpr > 10 * bound


def test_fold_ids_and_pick_folds():
  np.testing.assert_array_equal(thresholds.fold_ids(7, 3), [0, 1, 2] * 2 + [0])
  per_stage = [{"s": np.full(4, 10.0 * j) + np.arange(4)} for j in range(3)]
  picked = evaluate.pick_folds(per_stage, np.array([2, 0, 1, 2]))
  np.testing.assert_array_equal(picked["s"], [20.0, 1.0, 12.0, 23.0])
  with pytest.raises(DataError, match="calibration_folds"):
    thresholds.fold_ids(3, 4)


def test_normalized_scores_keep_the_order():
  stats = thresholds.calibrate(np.array([1.0, 2.0, 3.0, 5.0]), fpr=0.25)
  scores = np.array([-1e6, -100.0, 0.999, 1.0, 3.0, 3.001, 5.0, 100.0, 1e6])
  got = thresholds.normalize(scores, stats)
  assert np.all(np.diff(got) > 0) and got.min() > 0.0 and got.max() < 1.0
  assert thresholds.normalize(3.0, stats) == 0.5
  # Near the threshold, the slope of anomalib's line (1 / (max - min)).
  assert thresholds.normalize(3.0 + 1e-6, stats) - 0.5 == pytest.approx(
    1e-6 / 4.0, rel=1e-4
  )
  # Float32 (exports) too, far out.
  far = np.array([1e3, 1e4, 1e5], np.float32)
  assert np.all(np.diff(thresholds.normalize(far, stats).astype(np.float32)))


def _record(monkeypatch, module, names) -> dict:
  """{name: what module.name last returned}, filled as the module calls
  its own functions `names`."""
  seen = {}

  def recording(name, fn):
    def call(*args, **kwargs):
      seen[name] = fn(*args, **kwargs)
      return seen[name]

    return call

  for name in names:
    monkeypatch.setattr(module, name, recording(name, getattr(module, name)))
  return seen


@pytest.mark.parametrize("method", by_method(["rotnet"]))
def test_cross_fit_calibrates_on_every_normal_image(
  method, trained_run, tmp_path, monkeypatch
):
  workdir = tmp_path / "run"
  shutil.copytree(trained_run(method).workdir, workdir)
  config = run_lib.saved_config(workdir)
  # One classifier keeps the k extra fits and the k + 1 scorings cheap.
  config.classifiers = {"gde": {}}
  config.eval.calibration = "cross_fit"
  config.eval.calibration_folds = 3
  # What the refit computes on the way (the training images' embeddings,
  # the stages without each fold, the pooled scores) is kept to check.
  seen = _record(
    monkeypatch,
    evaluate,
    ["_train_pass", "cross_fit_stages", "_cross_fit_scores"],
  )
  det = jax_oneclass.Detector.load(workdir, config=config, refit=True)
  run, state, calib = det.run, det.state, det.stage.calibration
  embeddings, _ = seen["_train_pass"]
  num_train = len(next(iter(embeddings.values())))
  assert calib["kind"] == "cross_fit"
  assert calib["num_images"] == num_train + run.info.num_holdout
  assert set(calib["image"]) == set(run.method.scorer_names(config))
  # The pass picked each image's score from the stage fitted without its
  # fold: fold 0's images, scored by that stage alone, agree.
  stages, fold = seen["cross_fit_stages"]
  assert len(stages) == 3 and len(fold) == num_train
  pooled = seen["_cross_fit_scores"]
  alone, _ = evaluate._collect(  # pylint: disable=protected-access
    evaluate.score_fn(run),
    (state, parallel.replicate(run.mesh, stages[0])),
    data.eval_batches(run.config, "train", run.config.eval.batch_size),
    run.mesh,
  )
  for name, values in pooled.image.items():
    np.testing.assert_allclose(
      values[:num_train][fold == 0],
      alone.image[name][:num_train][fold == 0],
      rtol=1e-4,
      atol=1e-6,
    )


def test_cross_fit_without_a_fitted_stage_is_refused():
  config = load_config("ganomaly")
  config.eval.calibration = "cross_fit"
  run = types.SimpleNamespace(
    config=config, info=types.SimpleNamespace(num_holdout=0)
  )
  with pytest.raises(ConfigError, match="no fitted stage to cross-fit"):
    evaluate.calibrate(run, None, {}, embeddings=None)
  config.eval.calibration = "crossfit"
  with pytest.raises(ConfigError, match="choose one of holdout, cross_fit"):
    evaluate.calibrate(run, None, {}, embeddings=None)
