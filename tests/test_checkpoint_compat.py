"""Checkpoints written by earlier versions restore and score the same.

The fixtures were written at commit a054736 by
tests/fixtures/make_checkpoint_fixtures.py (see its docstring). Methods
whose scores changed on purpose since (its MOVED) are checked against the
expected_auroc.json the current code recorded.
"""

import json
import shutil

import pytest

from jax_oneclass import evaluate
from jax_oneclass import run as run_lib
from tests.conftest import METHODS, load_config
from tests.fixtures import make_checkpoint_fixtures as fixtures


def _config(method):
  config = load_config(method, fixtures.CONFIG_ARG)
  for key, value in fixtures.RUNS[method].items():
    config.update_from_flattened_dict({key: value})
  # Those runs fitted on every normal training image: no held-out split.
  config.data.holdout_fraction = 0.0
  return config


def test_every_method_has_a_fixture():
  assert sorted(fixtures.RUNS) == METHODS


@pytest.mark.parametrize("method", METHODS)
def test_the_saved_state_tree_is_unchanged(method, tmp_path):
  run = run_lib.setup(_config(method), tmp_path)
  state = run_lib.run_initial_state(run)
  run.checkpointer.save(1, state, run_lib.checkpoint_meta(run.config, 1))
  run.checkpointer.close()
  saved = json.loads((fixtures.OUT / method / "state_tree.json").read_text())
  assert fixtures.state_tree(tmp_path / "checkpoints", 1) == saved


@pytest.mark.parametrize("method", fixtures.SMALL)
def test_an_old_checkpoint_restores_and_scores_the_same(method, tmp_path):
  shutil.copytree(
    fixtures.OUT / method / "checkpoints", tmp_path / "checkpoints"
  )
  config = _config(method)
  # Scores are the claim; pictures of 26 scorers would cost most of it.
  config.eval.plots = False
  config.eval.num_overlays = 0
  results = evaluate.evaluate(config, tmp_path)
  old = json.loads((fixtures.OUT / method / "results.json").read_text())
  assert results["step"] == old["step"] == 4
  if method in fixtures.MOVED:
    # Scores that changed on purpose (see MOVED): the values the current
    # code recorded, by rescore_checkpoint_fixtures.py.
    old = json.loads(
      (fixtures.OUT / method / "expected_auroc.json").read_text()
    )
  assert results["auroc"] == pytest.approx(old["auroc"], abs=1e-3)


def test_the_fixture_script_never_rewrites_a_fixture_unasked(capsys):
  before = {p: p.stat().st_mtime_ns for p in fixtures.OUT.rglob("*")}
  for argv, message in [
    (["--method=rotnet"], "pass --replace"),
    (["--method=nope"], "no RUNS entry for nope"),
    ([], "--method"),
  ]:
    with pytest.raises(SystemExit) as exit_info:
      fixtures.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
  assert {p: p.stat().st_mtime_ns for p in fixtures.OUT.rglob("*")} == before
