"""Research extensions from outside the package: config.plugins, import-path
methods, methods.register and oneclass.register_classifier.

The end-to-end test copies docs/examples (a small Deep SVDD and a k-NN
classifier, as docs/extending.md shows them) to a temporary folder, trains
it through the CLI and, in a new process, predicts, exports, evaluates and
sweeps it.
"""

import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from jax_oneclass import cli_checks, methods
from jax_oneclass.errors import ConfigError
from tests.conftest import REPO

EXAMPLES = REPO / "docs" / "examples"


@pytest.fixture
def registry(monkeypatch):
  """methods' registry, restored after the test."""
  monkeypatch.setattr(methods, "_MODULES", dict(methods._MODULES))  # pylint: disable=protected-access


@pytest.fixture
def lab(tmp_path):
  """A folder outside the repository holding my_lab/ and the config."""
  folder = tmp_path / "lab"
  shutil.copytree(
    EXAMPLES / "my_lab",
    folder / "my_lab",
    ignore=shutil.ignore_patterns("__pycache__"),
  )
  shutil.copy(EXAMPLES / "deep_svdd_config.py", folder)
  return folder


def test_register_refuses_a_taken_name_unless_replace(registry):
  with pytest.raises(ConfigError, match="already registered.*replace=True"):
    methods.register("rotnet", "jax_oneclass.methods.two_stage.clr")
  methods.register("rotnet", "jax_oneclass.methods.two_stage.clr", replace=True)
  assert methods.method_module("rotnet").__name__.endswith(".clr")


def test_a_registered_name_finds_its_module(registry):
  methods.register("rotnet_again", "jax_oneclass.methods.two_stage.rotnet")
  assert "rotnet_again" in methods.available_methods()
  assert methods.family("rotnet_again") == "two_stage"


@pytest.mark.parametrize(
  "name, module, message",
  [
    ("my.name", "jax_oneclass.methods.two_stage.rotnet", "identifier"),
    ("svdd", "my_lab_that_is_not_there.svdd", "PYTHONPATH"),
  ],
)
def test_register_refuses_bad_input(registry, name, module, message):
  with pytest.raises(ConfigError, match=message):
    methods.register(name, module)
  assert name not in methods.available_methods()


def test_an_unknown_name_never_falls_back():
  with pytest.raises(ConfigError, match="Unknown method 'rotnett'.*plugins"):
    methods.method_module("rotnett")


def test_an_import_path_without_method_is_refused(tmp_path, monkeypatch):
  (tmp_path / "my_empty_lab").mkdir()
  (tmp_path / "my_empty_lab" / "__init__.py").write_text("")
  (tmp_path / "my_empty_lab" / "nothing.py").write_text("X = 1\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ConfigError, match="defines no Method"):
    methods.method_module("my_empty_lab.nothing")


def test_an_import_path_is_a_method_of_its_package(lab, monkeypatch):
  monkeypatch.syspath_prepend(str(lab))
  assert methods.method_module("my_lab.deep_svdd").Method
  assert methods.family("my_lab.deep_svdd") == "my_lab"
  assert "my_lab.deep_svdd" not in methods.available_methods()


def test_a_module_with_a_missing_import_is_one_line(tmp_path, monkeypatch):
  (tmp_path / "my_broken_lab.py").write_text("import not_installed_lib\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  config = ml_collections.ConfigDict({"plugins": ("my_broken_lab",)})
  from jax_oneclass import plugins  # pylint: disable=g-import-not-at-top

  with pytest.raises(ConfigError) as e:
    plugins.import_plugins(config, "the run in /tmp/run")
  assert "my_broken_lab" in str(e.value)
  assert "not_installed_lib" in str(e.value)
  assert "\n" not in str(e.value)


def _config(**values):
  from jax_oneclass import config as config_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.base_config("rotnet")
  config.data.name = "digits"
  config.num_train_steps = 2
  return ml_collections.ConfigDict({**config.to_dict(), **values})


@pytest.mark.parametrize(
  "values, message",
  [
    (
      {"plugins": ("my_lab_gone.classifiers",)},
      "module 'my_lab_gone.classifiers' \\(config.plugins\\), which "
      "the run in /r needs.*PYTHONPATH",
    ),
    (
      {"method": "my_lab_gone.deep_svdd"},
      "module 'my_lab_gone.deep_svdd' \\(config.method\\), which "
      "the run in /r needs.*PYTHONPATH",
    ),
    ({"method": "deep_svdd"}, "Unknown method 'deep_svdd'"),
    ({"plugins": "my_lab.classifiers"}, "tuple of module names"),
  ],
)
def test_cli_checks_refuse_what_cannot_be_imported(values, message):
  with pytest.raises(ConfigError, match=message):
    cli_checks.check_train_args(_config(**values), "the run in /r")


def test_cli_checks_leave_a_plugin_registered_name_to_the_run(lab, monkeypatch):
  monkeypatch.syspath_prepend(str(lab))
  # 'deep_svdd' may be registered by the plugin, which the check does not
  # import (it would import JAX): the run decides.
  cli_checks.check_train_args(
    _config(method="deep_svdd", plugins=("my_lab.classifiers",))
  )


def test_register_classifier_refuses_a_taken_name_unless_replace(monkeypatch):
  from jax_oneclass.components import oneclass  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(oneclass, "CLASSIFIERS", dict(oneclass.CLASSIFIERS))
  nn = oneclass.CLASSIFIERS["nn"]
  with pytest.raises(ConfigError, match="already registered"):
    oneclass.register_classifier("nn", nn.fit, nn.score)
  with pytest.raises(
    ConfigError,
    match="Unknown one-class classifier.*register_classifier.*config.plugins",
  ):
    oneclass.get_classifier("nn2")
  oneclass.register_classifier("nn2", nn.fit, nn.score)
  oneclass.register_classifier("nn2", nn.fit, nn.score, replace=True)
  assert oneclass.get_classifier("nn2") == nn


_READ_THE_RUN = """
import json, sys
from pathlib import Path
import numpy as np
import jax_oneclass
from jax_oneclass import export
from jax_oneclass import main as main_lib

workdir, out, sweep_args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
assert "my_lab.classifiers" not in sys.modules
det = jax_oneclass.Detector.load(workdir)
assert "my_lab.classifiers" in sys.modules  # Imported by the run's config.
images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 1), np.uint8)
want = det.predict(list(images))
result = {"scores": sorted(want.scores), "score": want.score.tolist()}
for fmt in ("jax", "onnx"):
  got = export.load(export.export(det, fmt, out / fmt))(images)
  result[fmt] = np.asarray(got["score"]).tolist()
# `--mode=eval`, through main's entry point in this process.
sys.argv = [
  "jax_oneclass.main",
  f"--workdir={workdir}",
  "--mode=eval",
  f"--results_path={out / 'eval'}",
]
try:
  main_lib.run()
except SystemExit as e:
  result["eval_exit_code"] = e.code or 0
# Then the sweep's command line, as `python -m jax_oneclass.sweep` runs it.
from jax_oneclass import sweep, sweep_cli

sys.argv = ["jax_oneclass.sweep", *sweep_args]
try:
  sweep_cli.run(sweep.run_checked)
except SystemExit as e:
  result["sweep_exit_code"] = e.code or 0
print(json.dumps(result))
"""


def test_an_out_of_tree_method_and_classifier_train_and_are_read_again(
  lab, tmp_path
):
  workdir = tmp_path / "run"
  env = {**os.environ, "PYTHONPATH": str(lab)}
  main = [sys.executable, "-m", "jax_oneclass.main", f"--workdir={workdir}"]

  def run(args, environ=None):
    return subprocess.run(
      args,
      cwd=REPO,
      env=environ or env,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
    )

  tiny = [
    f"--config={lab / 'deep_svdd_config.py'}:digits",
    "--config.num_train_steps=3",
    "--config.batch_size=16",
    "--config.model.width=4",
    "--config.eval.batch_size=128",
    "--config.checkpoint_every_steps=3",
    "--config.log_every_steps=1",
    "--config.progress_bar=False",
    "--config.eval.num_overlays=0",
    "--config.eval.plots=False",
  ]
  train = run(main + tiny)
  assert train.returncode == 0, train.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert sorted(results["auroc"]) == ["gde", "knn", "svdd"]

  saved = json.loads((workdir / "config.json").read_text())
  assert saved["method"] == "my_lab.deep_svdd"
  assert saved["plugins"] == ["my_lab.classifiers"]

  # Without PYTHONPATH the run's modules are missing: one line, before JAX.
  no_path = {k: v for k, v in env.items() if k != "PYTHONPATH"}
  for mode in ("eval", "predict", "export"):
    lost = run(
      main
      + [f"--mode={mode}", f"--input={lab}", f"--output={tmp_path / 'out'}"],
      no_path,
    )
    assert lost.returncode == 2, mode
    (line,) = lost.stderr.strip().splitlines()
    assert "'my_lab.classifiers'" in line and str(workdir) in line, line
    assert "PYTHONPATH" in line

  # A new process predicts, exports and evaluates the run, then sweeps.
  sweep_dir = tmp_path / "sweep"
  read = run(
    [
      sys.executable,
      "-c",
      _READ_THE_RUN,
      str(workdir),
      str(tmp_path / "read"),
      "--classes=0,3",
      "--seeds=0",
      *tiny,
      f"--workdir={sweep_dir}",
    ]
  )
  assert read.returncode == 0, read.stderr[-3000:]
  out = json.loads(read.stdout.strip().splitlines()[-1])
  assert out["eval_exit_code"] == 0, read.stderr[-3000:]
  again = json.loads((tmp_path / "read" / "eval" / "results.json").read_text())
  assert again["auroc"] == pytest.approx(results["auroc"], abs=1e-6)
  assert out["scores"] == ["gde", "knn", "svdd"]
  for fmt in ("jax", "onnx"):
    np.testing.assert_allclose(
      out[fmt], out["score"], rtol=2e-4, atol=2e-4, err_msg=fmt
    )
  assert out["sweep_exit_code"] == 0, read.stderr[-3000:]
  assert "**overall**" in (sweep_dir / "sweep_table.md").read_text()
  for normal_class in (0, 3):
    member = sweep_dir / f"class_{normal_class}" / "seed_0"
    member_results = json.loads((member / "results.json").read_text())
    assert sorted(member_results["auroc"]) == ["gde", "knn", "svdd"]


def test_a_run_saved_before_plugins_existed_is_unchanged():
  from jax_oneclass import run as run_lib  # pylint: disable=g-import-not-at-top

  config = _config()
  saved = ml_collections.ConfigDict(
    {k: v for k, v in config.to_dict().items() if k != "plugins"}
  )
  assert run_lib.config_changes(saved, config) == {}
  config.plugins = ("my_lab.classifiers",)
  assert run_lib.config_changes(saved, config) == {
    "plugins": ([], ["my_lab.classifiers"])
  }


def _svdd_config(lab, **values):
  from jax_oneclass import config as config_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.load(str(lab / "deep_svdd_config.py"), "digits")
  config_lib.override(
    config,
    {
      "num_train_steps": 2,
      "batch_size": 16,
      "model.width": 4,
      "checkpoint_every_steps": 1,
      "log_every_steps": 1,
      "progress_bar": False,
      **values,
    },
  )
  return config


def test_prepare_runs_once_before_the_first_step_and_resumes_the_same(
  lab, tmp_path, monkeypatch
):
  monkeypatch.syspath_prepend(str(lab))
  from jax_oneclass import data, train  # pylint: disable=g-import-not-at-top
  from jax_oneclass import run as run_lib  # pylint: disable=g-import-not-at-top

  deep_svdd = methods.method_module("my_lab.deep_svdd")
  calls = []
  prepare = deep_svdd.Method.prepare
  monkeypatch.setattr(
    deep_svdd.Method,
    "prepare",
    lambda self, *a: calls.append(1) or prepare(self, *a),
  )

  run, whole = train.train(_svdd_config(lab), tmp_path / "whole")
  assert int(whole.step) == 2 and len(calls) == 1  # Not a step.
  first = next(data.train_batches(run.config, 0))
  initial = run_lib.run_initial_state(run)
  center = run.method.encoder.apply(initial.params, first["image"][:, 0]).mean(
    0
  )
  np.testing.assert_allclose(whole.center, center, rtol=1e-5, atol=1e-6)

  train.train(_svdd_config(lab, halt_after_step=1), tmp_path / "halted")
  _, resumed = train.train(_svdd_config(lab), tmp_path / "halted")
  assert len(calls) == 2  # The resumed run restored the prepared state.
  np.testing.assert_array_equal(resumed.center, whole.center)
  for got, want in zip(_leaves(resumed.params), _leaves(whole.params)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top

  return [np.asarray(x) for x in jax.tree.leaves(tree)]
