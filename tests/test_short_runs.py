"""Runs too short to mean anything: zero steps, a below-chance AUROC, and
thresholds on too few normal images."""

import pytest

from jax_oneclass import evaluate
from jax_oneclass import main as main_lib
from jax_oneclass import run as run_lib
from jax_oneclass.errors import ConfigError
from tests.conftest import tiny_config


class _Info:
  num_train = 100
  epoch_size = 100  # No rotation copies in this config.


def test_zero_steps_is_refused_and_minus_one_means_epochs():
  config = tiny_config("clr", steps=0)
  config.num_epochs = 3
  with pytest.raises(
    ConfigError,
    match=r"num_train_steps=0 would train "
    r"nothing.*--config.num_train_steps=-1 to train for "
    r"config.num_epochs \(3\) epochs",
  ):
    run_lib.resolve_duration(config, _Info())
  config.num_train_steps = -1
  resolved = run_lib.resolve_duration(config, _Info())
  assert resolved.num_train_steps == 3 * (100 // 16)
  config.num_epochs = 0
  with pytest.raises(ConfigError, match="but num_epochs is 0"):
    run_lib.resolve_duration(config, _Info())


def _results(auroc: float) -> dict:
  return {
    "method": "clr",
    "data": "digits",
    "normal_class": 2,
    "class_name": "2",
    "step": 4,
    "num_test": 10,
    "num_anomalous": 5,
    "scorer": "kde",
    "auroc": {"kde": auroc, "other": 0.9},
    "calibration": {"fpr": 0.05, "num_images": 20, "split": "holdout"},
    "thresholds": {k: {"at_threshold": {"f1": 0.5}} for k in ("kde", "other")},
  }


def test_the_table_explains_a_headline_auroc_below_chance():
  table = main_lib.format_results(_results(0.3125))
  assert table.splitlines()[-1] == (
    "note: AUROC 0.3125 < 0.5: the kde scores rank normal images above "
    "anomalous ones. The model has probably not trained enough (4 steps): "
    "train longer, e.g. a larger --config.num_train_steps, or "
    "--config.num_train_steps=-1 for the paper's num_epochs schedule."
  )
  assert "note:" not in main_lib.format_results(_results(0.5))


def test_the_table_says_what_the_thresholds_rest_on():
  table = main_lib.format_results(_results(0.9))
  assert (
    "Thresholds at FPR 0.05 on 20 holdout images (the smallest FPR "
    "they resolve: 1/20 = 0.05)"
  ) in table


@pytest.mark.parametrize(
  "fpr, warned", [(0.01, True), (0.05, False), (0.0, False)]
)
def test_an_fpr_below_what_the_images_resolve_is_warned(fpr, warned, capsys):
  config = tiny_config("clr")
  config.eval.fpr = fpr
  summary = evaluate.calibration_summary(
    config, {"split": "holdout", "num_images": 20}
  )
  assert summary["min_fpr"] == 0.05 and summary["num_images"] == 20
  err = capsys.readouterr().err
  assert (
    "warning: eval.fpr=0.01 is below 1/20 = 0.05, the smallest "
    "false-positive rate 20 holdout images resolve" in err
  ) == warned
  assert bool(err) == warned
