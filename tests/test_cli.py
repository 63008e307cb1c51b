"""The command line as a user runs it."""

import json
import subprocess
import sys

import pytest

from tests.conftest import METHODS, REPO, load_config, localises
from tests.conftest import tiny_overrides

DIGITS_METHODS = [m for m in METHODS if not localises(m)]
EXPECTED_SCORERS = {
    "rotnet": {"pool/kde", "pool/gde", "pool/ocsvm", "embed/kde/rot_avg",
               "rotation_head", "rotation_head/rot_avg"},
    "clr": {"pool/kde", "pool/gde", "pool/ocsvm", "embed/kde/rot_avg"},
    "disaug": {"pool/kde", "pool/gde", "pool/ocsvm", "embed/kde/rot_avg",
               "pool/gde_lw/rot_avg"},
    "ganomaly": {"latent_mse", "latent_l1", "reconstruction_l1"},
    "dgad": {"pretext/generated", "pretext/real", "latent/gde", "latent/kde"},
}


def tiny_flags(method: str) -> list[str]:
  """Command-line flags of `tests.conftest.tiny_config`'s run."""
  overrides = tiny_overrides(load_config(method, "digits"))
  model = [f"--config.{k}={str(v).replace(' ', '')}"
           for k, v in overrides.items()]
  return model + ["--config.num_train_steps=4", "--config.batch_size=16",
                  "--config.eval.batch_size=128",
                  "--config.log_every_steps=2",
                  "--config.checkpoint_every_steps=2"]


def test_every_method_on_digits_is_checked_here():
  assert sorted(EXPECTED_SCORERS) == DIGITS_METHODS


def _main(*args):
  return subprocess.run([sys.executable, "-m", "jax_oneclass.main", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=400,
                        check=False)


@pytest.mark.parametrize("method", DIGITS_METHODS)
def test_each_method_trains_and_evaluates_from_the_command_line(
    method, tmp_path):
  config_arg = f"--config=configs/{method}.py:digits,normal_class=2"
  tiny = tiny_flags(method)
  out = _main(config_arg, f"--workdir={tmp_path}", *tiny)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "step 4: 599 test images, 540 anomalous" in out.stdout
  assert "loss=" in out.stderr  # The progress bar.
  assert "599/599" in out.stderr  # Eval's progress bar over test images.
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["normal_class"] == 2 and results["method"] == method
  assert EXPECTED_SCORERS[method] <= set(results["auroc"])
  assert all(0.0 <= v <= 1.0 for v in results["auroc"].values())
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["num_train_steps"] == 4 and config["batch_size"] == 16
  assert list((tmp_path / "tensorboard" / "train").glob("events.out.*"))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == ["2", "4"]
  if method in ("disaug", "dgad"):  # --mode=eval gives the same numbers.
    again = _main(config_arg, f"--workdir={tmp_path}", "--mode=eval", *tiny)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["auroc"] == (
        pytest.approx(results["auroc"], abs=1e-6))
