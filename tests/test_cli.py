"""The command line as a user runs it."""

import json
import shutil

import pytest

from jax_oneclass import methods
from jax_oneclass import main as main_lib
from jax_oneclass import run as run_lib
from tests.conftest import METHODS, command_in_process, localises
from tests.trained import by_method, command

DIGITS_METHODS = [m for m in METHODS if not localises(m)]


def scorer_names(workdir) -> set[str]:
  """The image scorers the run's method reports for the run's config."""
  config = run_lib.saved_config(workdir)
  return set(methods.method_module(config.method).Method.scorer_names(config))


@pytest.mark.parametrize("method", by_method(DIGITS_METHODS))
def test_each_method_trains_and_evaluates_from_the_command_line(
  method, trained_run, tmp_path, monkeypatch, capsys
):
  run = trained_run(method)
  workdir, results = run.workdir, run.results
  assert "step 4: 599 test images, 540 anomalous" in run.stdout
  assert "loss=" in run.stderr  # The progress bar.
  assert "599/599" in run.stderr  # Eval's progress bar over test images.
  assert results["normal_class"] == 2 and results["method"] == method
  assert set(results["auroc"]) == scorer_names(workdir)
  assert all(0.0 <= v <= 1.0 for v in results["auroc"].values())
  config = json.loads((workdir / "config.json").read_text())
  assert config["num_train_steps"] == 4 and config["batch_size"] == 16
  assert list((workdir / "tensorboard" / "train").glob("events.out.*"))
  assert sorted(
    p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()
  ) == ["2", "4"]
  # --mode=eval gives the same numbers; through main's entry point in this
  # process (tests/test_extending.py runs it as a command of its own).
  if method in ("disaug", "dgad"):
    copy = tmp_path / "run"  # Other tests read the shared run meanwhile.
    shutil.copytree(workdir, copy)
    flags = command(method, workdir.parent)[3:-1]  # Without --workdir.
    code, _, err = command_in_process(
      main_lib.run,
      [*flags, f"--workdir={copy}", "--mode=eval"],
      monkeypatch,
      capsys,
    )
    assert code == 0, err[-3000:]
    assert json.loads((copy / "results.json").read_text())["auroc"] == (
      pytest.approx(results["auroc"], abs=1e-6)
    )
