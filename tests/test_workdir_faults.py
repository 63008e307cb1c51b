"""A workdir that cannot be written, and a resume with a changed config."""

import json
import shutil
import subprocess
import sys

import pytest

from jax_oneclass import evaluate, logging_utils, train
from jax_oneclass import run as run_lib
from jax_oneclass.errors import ConfigError
from tests.conftest import REPO


@pytest.fixture(name="clr_run")
def _clr_run(trained_run, tmp_path):
  """A copy of the shared clr run's workdir (4 steps, finished)."""
  shutil.copytree(trained_run("clr").workdir, tmp_path / "run")
  return tmp_path / "run"


@pytest.mark.xdist_group("run_clr")
def test_resuming_with_a_changed_config_is_refused_then_recorded(clr_run):
  changed = run_lib.saved_config(clr_run)
  changed.num_train_steps = 6
  changed.optimizer.learning_rate = 0.5
  with pytest.raises(
    ConfigError,
    match=r"differs from the one the run .* "
    r"(num_train_steps: 4 -> 6|optimizer.learning_rate).*"
    r"--allow_config_change",
  ):
    train.train(changed, clr_run)
  assert (
    json.loads((clr_run / "config.json").read_text())["num_train_steps"] == 4
  )  # Nothing was overwritten.
  run, _ = train.train(changed, clr_run, allow_config_change=True)
  assert run.checkpointer.latest_step() == 6
  history = sorted(p.name for p in (clr_run / "config_history").iterdir())
  assert history == ["step_000000000.json", "step_000000004.json"]
  assert (
    json.loads((clr_run / "config_history" / history[1]).read_text())[
      "optimizer"
    ]["learning_rate"]
    == 0.5
  )


@pytest.mark.xdist_group("run_clr")
def test_another_run_in_the_workdir_is_refused_even_when_allowed(clr_run):
  other = run_lib.saved_config(clr_run)
  other.data.normal_class = 3
  with pytest.raises(ConfigError, match="data.normal_class: 2 -> 3"):
    train.train(other, clr_run, allow_config_change=True)


@pytest.mark.xdist_group("run_ganomaly")
def test_eval_of_an_unwritable_workdir_still_scores(
  tmp_path, monkeypatch, trained_run
):
  shutil.copytree(trained_run("ganomaly").workdir, tmp_path / "run")
  config = run_lib.saved_config(tmp_path / "run")
  config.eval.plots = False  # Pictures: not what is tested here.
  config.eval.num_overlays = 0
  shutil.rmtree(tmp_path / "run" / "fitted")  # As trained, not evaluated.
  (tmp_path / "run" / "results.json").unlink()
  real = logging_utils.writable
  monkeypatch.setattr(
    logging_utils,
    "writable",
    lambda d: not str(d).startswith(str(tmp_path / "run")) and real(d),
  )
  results = evaluate.evaluate(config, tmp_path / "run", output_dir=False)
  assert results["num_test"] == 599
  assert not (tmp_path / "run" / "results.json").exists()
  assert not (tmp_path / "run" / "fitted").exists()
  with pytest.raises(ConfigError, match="--results_path"):
    evaluate.evaluate(config, tmp_path / "run")
  evaluate.evaluate(config, tmp_path / "run", output_dir=tmp_path / "out")
  assert (tmp_path / "out" / "results.json").is_file()


def _read_only(source, target, command):
  """`command` run with `target` a read-only view of `source` (a private
  mount namespace), or None where this machine allows no such mount."""
  target.mkdir()
  script = (
    f"mount --bind {source} {target} && "
    f'mount -o remount,ro,bind {target} && exec "$@"'
  )
  probe = subprocess.run(
    ["unshare", "-m", "sh", "-c", script, "sh", "true"],
    capture_output=True,
    text=True,
    check=False,
  )
  if probe.returncode:
    return None
  return subprocess.run(
    ["unshare", "-m", "sh", "-c", script, "sh", *command],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=400,
    check=False,
  )


@pytest.mark.xdist_group("run_ganomaly")
def test_a_read_only_workdir_through_the_command_line(tmp_path, trained_run):
  shared = trained_run("ganomaly").workdir  # Seen read-only: never changed.
  main = [sys.executable, "-m", "jax_oneclass.main"]
  view = tmp_path / "view"
  done = _read_only(shared, view, [*main, f"--workdir={view}", "--mode=eval"])
  if done is None:
    pytest.skip("No mount namespaces here to make a read-only workdir.")
  assert done.returncode == 2
  assert "latent_mse" in done.stdout  # The results were printed.
  assert "is read-only" in done.stderr and "--results_path" in done.stderr
  assert "Traceback" not in done.stderr
  done = _read_only(
    shared,
    tmp_path / "view2",
    [
      *main,
      f"--workdir={tmp_path / 'view2'}",
      "--mode=eval",
      f"--results_path={tmp_path / 'out'}",
    ],
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert (tmp_path / "out" / "results.json").is_file()
  done = _read_only(
    shared,
    tmp_path / "view3",
    [
      *main,
      "--config=configs/ganomaly.py:digits",
      f"--workdir={tmp_path / 'view3' / 'new'}",
    ],
  )
  assert done.returncode == 2
  assert "Cannot write to --workdir" in done.stderr
  assert "Traceback" not in done.stderr
