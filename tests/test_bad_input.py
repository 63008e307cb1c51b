"""Bad input to the commands: one 'error:' line, exit code 2, no traceback.

The table runs each command's entry point in this process; one test runs
the real command in a fresh process.
"""

import json
import os
import subprocess
import sys

import pytest

from jax_oneclass import cli_checks, export, predict, sweep_cli
from jax_oneclass import main as main_lib
from tests.conftest import REPO, command_in_process, load_config

_LIGHT_IMPORTS = """\
import glob, importlib.util, sys
import jax_oneclass.cli_checks, jax_oneclass.logging_utils, jax_oneclass.main
import jax_oneclass.export, jax_oneclass.predict, jax_oneclass.sweep_cli
for path in sorted(glob.glob("configs/*.py")):
  spec = importlib.util.spec_from_file_location("c", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.get_config("digits")
sys.argv = ["sweep", "--config=configs/rotnet.py:digits", "--workdir=/tmp/x",
            "--classes=12"]
try:  # A refused sweep imports neither.
  jax_oneclass.sweep_cli.run(None)
except SystemExit as e:
  assert e.code == 2, e.code
heavy = [m for m in ("jax", "tensorflow") if m in sys.modules]
assert not heavy, heavy
"""


def test_the_checks_and_configs_load_without_jax_or_tensorflow():
  done = subprocess.run(
    [sys.executable, "-c", _LIGHT_IMPORTS],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert done.returncode == 0, done.stderr[-2000:]


def test_the_checks_know_the_methods_and_class_counts():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from jax_oneclass import methods  # pylint: disable=g-import-not-at-top
  from jax_oneclass.data import mvtec, sources  # pylint: disable=g-import-not-at-top

  assert list(cli_checks.METHODS) == methods.available_methods()
  assert set(cli_checks.DATA_SETS) == set(sources.SOURCE_NAMES)
  catalog = sources._CATALOG  # pylint: disable=protected-access
  counts = {
    name: tfds.builder(tfds_name).info.features[key].num_classes
    for name, (tfds_name, key, _, _) in catalog.items()
  }
  counts.update(digits=10, mvtec=len(mvtec.LABEL_NAMES))
  assert counts == cli_checks.NUM_CLASSES


def _never(*args):
  raise AssertionError(f"bad input passed the checks: {args[1:]}")


_ENTRIES = {
  "main": main_lib.run,
  "predict": predict.main,
  "export": export.main,
  "sweep": lambda: sweep_cli.run(_never),
}


def _fake_run(workdir, config=None):
  """A folder the checks take for a trained run (nothing in it loads)."""
  (workdir / "checkpoints" / "2").mkdir(parents=True)
  if config is not None:
    (workdir / "config.json").write_text(json.dumps(config.to_dict()))
  return workdir


def _inputs(tmp_path):
  """{name: path} of the files and folders the cases name."""
  folder = tmp_path / "images"
  for name in ("cat", "dog"):
    (folder / "train" / name).mkdir(parents=True)
    (tmp_path / "classes" / "test" / name).mkdir(parents=True)
    (tmp_path / "classes" / "train" / name).mkdir(parents=True)
  (tmp_path / "empty").mkdir()
  (tmp_path / "a_file").write_text("")
  syntax = tmp_path / "syntax_error.py"
  syntax.write_text("def get_config(arg=None:\n  pass\n")
  raises = tmp_path / "raises.py"
  raises.write_text("def get_config(arg=None):\n  del arg\n  return 1 / 0\n")
  return {
    "folder": folder,
    "classes": tmp_path / "classes",
    "empty": tmp_path / "empty",
    "file": tmp_path / "a_file",
    "syntax": syntax,
    "raises": raises,
    "run": _fake_run(tmp_path / "run", load_config("clr")),
    "no_config": _fake_run(tmp_path / "no_config"),
    "missing": tmp_path / "missing",
    "new": tmp_path / "new",
  }


_WORKDIR = "--workdir={new}"
# (entry point, arguments, the message's expected part): one row per case.
_CASES = {
  "unknown flag": (
    "main",
    ["--bogus", _WORKDIR],
    "Unknown command line flag 'bogus'",
  ),
  "bad flag value": (
    "main",
    ["--mode=bogus", _WORKDIR],
    "value should be one of",
  ),
  "no config file": (
    "main",
    ["--config=configs/nope.py", _WORKDIR],
    "no config file 'configs/nope.py' (from --config)",
  ),
  "config syntax error": (
    "main",
    ["--config={syntax}", _WORKDIR],
    "{syntax}:1: SyntaxError: ",
  ),
  "config raises": (
    "main",
    ["--config={raises}", _WORKDIR],
    "{raises}:3: ZeroDivisionError: division by zero "
    "(in get_config of the config file)",
  ),
  "unknown data set": (
    "main",
    ["--config=configs/disaug.py:imagenet", _WORKDIR],
    "Unknown data set 'imagenet'",
  ),
  "unknown config key": (
    "main",
    ["--config=configs/disaug.py:digits", "--config.lr=1", _WORKDIR],
    "unknown config key 'lr'",
  ),
  "config value type": (
    "main",
    ["--config=configs/clr.py:digits", "--config.batch_size=abc", _WORKDIR],
    "config key 'batch_size' cannot take the value 'abc'",
  ),
  "unknown method": (
    "main",
    ["--config=configs/disaug.py:digits", "--config.method=gan", _WORKDIR],
    "Unknown method 'gan'",
  ),
  "class index 42": (
    "main",
    [
      "--config=configs/disaug.py:digits",
      "--config.data.normal_class=42",
      _WORKDIR,
    ],
    "config.data.normal_class=42 is out of range for "
    "'digits': valid range 0..9",
  ),
  "class index 10": (
    "main",
    ["--config=configs/rotnet.py:digits,normal_class=10", _WORKDIR],
    "out of range",
  ),
  "folder class name": (
    "main",
    [
      "--config=configs/clr.py:folder,folder={folder},normal_class=cow",
      _WORKDIR,
    ],
    "normal_class='cow' is not a class of the folder "
    "'{folder}'; its classes are 0 cat, 1 dog.",
  ),
  "class name, digits": (
    "main",
    ["--config=configs/clr.py:digits,normal_class=x", _WORKDIR],
    "the digits data set takes a class index",
  ),
  "missing data folder": (
    "main",
    ["--config=configs/disaug.py:folder,folder=/no/such/dir", _WORKDIR],
    "does not exist",
  ),
  "folder without test/": (
    "main",
    ["--config=configs/clr.py:folder,folder={folder}", _WORKDIR],
    "has no 'test' subfolder",
  ),
  "missing mvtec folder": (
    "main",
    [
      "--config=configs/reverse_distillation.py:mvtec,folder={missing},"
      "category=widget,data_dir={missing}",
      _WORKDIR,
    ],
    "MVTec root folder '{missing}' does not exist",
  ),
  "channels": (
    "main",
    ["--config=configs/clr.py:digits", "--config.data.channels=2", _WORKDIR],
    "must be 1 or 3",
  ),
  "zero steps": (
    "main",
    ["--config=configs/clr.py:digits", "--config.num_train_steps=0", _WORKDIR],
    "config.num_train_steps=0 would train nothing. Pass a "
    "number of steps > 0, or --config.num_train_steps=-1 to "
    "train for config.num_epochs (2048) epochs",
  ),
  "zero epochs": (
    "main",
    [
      "--config=configs/clr.py",  # Steps -1.
      "--config.num_epochs=0",
      _WORKDIR,
    ],
    "but num_epochs is 0",
  ),
  "train without config": ("main", [_WORKDIR], "Training needs --config"),
  "workdir under a file": (
    "main",
    ["--config=configs/clr.py:digits", "--workdir={file}/run"],
    "Cannot write to --workdir",
  ),
  "eval, not a run": (
    "main",
    ["--config=configs/clr.py:digits", "--mode=eval", _WORKDIR],
    "train first",
  ),
  "eval, no config.json": (
    "main",
    ["--mode=eval", "--workdir={no_config}"],
    "No config.json in {no_config}",
  ),
  "eval, results path": (
    "main",
    ["--mode=eval", "--workdir={run}", "--results_path={file}"],
    "Cannot write to --results_path",
  ),
  "predict, not a run": (
    "predict",
    [_WORKDIR, "--input={folder}", "--output={new}"],
    "does not exist: train first",
  ),
  "predict, no input": (
    "predict",
    ["--workdir={run}", "--output={new}"],
    "Predicting needs --input",
  ),
  "predict, missing input": (
    "predict",
    ["--workdir={run}", "--input={missing}", "--output={new}"],
    "is no file, folder or glob",
  ),
  "predict, no images": (
    "predict",
    ["--workdir={run}", "--input={empty}", "--output={new}"],
    "holds no image files",
  ),
  "predict, no output": (
    "predict",
    ["--workdir={run}", "--input={file}"],
    "--output is needed",
  ),
  "predict, output a file": (
    "predict",
    ["--workdir={run}", "--input={file}", "--output={file}"],
    "is a file, not a folder",
  ),
  "export, not a run": (
    "export",
    ["--workdir={empty}", "--output={new}"],
    "No checkpoint in {empty}/checkpoints: train first",
  ),
  "export, no config.json": (
    "export",
    ["--workdir={no_config}", "--output={new}"],
    "No config.json in {no_config}",
  ),
  "export, no output": ("export", ["--workdir={run}"], "--output is needed"),
  "export, output under a file": (
    "export",
    ["--workdir={run}", "--output={file}/x"],
    "is a file, not a folder",
  ),
  "export, bad format": (
    "export",
    ["--workdir={run}", "--output={new}", "--format=tflite"],
    "value should be one of",
  ),
  "sweep, unknown class": (
    "sweep",
    ["--config=configs/rotnet.py:digits", "--classes=0,12", _WORKDIR],
    "--classes: 12 is not a class of digits (classes 0..9).",
  ),
  "sweep, unknown folder class": (
    "sweep",
    [
      "--config=configs/clr.py:folder,folder={classes}",
      "--classes=2",
      _WORKDIR,
    ],
    "--classes: 2 is not a class of folder (0=cat, 1=dog).",
  ),
  "sweep, bad classes": (
    "sweep",
    ["--config=configs/rotnet.py:digits", "--classes=0-3", _WORKDIR],
    "--classes='0-3' must be integers separated by commas",
  ),
  "sweep, bad seeds": (
    "sweep",
    ["--config=configs/rotnet.py:digits", "--seeds=0,0", _WORKDIR],
    "--seeds='0,0' names a value twice.",
  ),
  "sweep, no seeds": (
    "sweep",
    ["--config=configs/rotnet.py:digits", "--seeds=", _WORKDIR],
    "--seeds='' must be integers",
  ),
  "sweep, empty grid": (
    "sweep",
    ["--config=configs/rotnet.py:digits", "--grid=", _WORKDIR],
    "--grid='' must be key=value1,value2",
  ),
  "sweep, grid without values": (
    "sweep",
    [
      "--config=configs/rotnet.py:digits",
      "--grid=optimizer.learning_rate=",
      _WORKDIR,
    ],
    "gives optimizer.learning_rate no values",
  ),
  "sweep, unknown grid key": (
    "sweep",
    [
      "--config=configs/rotnet.py:digits",
      "--grid=optimizer.nope=1,2",
      _WORKDIR,
    ],
    "Unknown config key 'optimizer.nope'",
  ),
  "sweep, grid of a member key": (
    "sweep",
    ["--config=configs/rotnet.py:digits", "--grid=seed=1,2", _WORKDIR],
    "sweep seed with --classes / --seeds instead",
  ),
  "sweep, bad shard": (
    "sweep",
    ["--config=configs/rotnet.py:digits", "--shard=4/4", _WORKDIR],
    "--shard='4/4' must be i/n with 0 <= i < n",
  ),
  "sweep, stack 0": (
    "sweep",
    ["--config=configs/rotnet.py:digits", "--stack=0", _WORKDIR],
    "--stack=0 must be at least 1",
  ),
  "sweep, single-run flag": (
    "sweep",
    ["--config=configs/rotnet.py:digits", "--mode=eval", _WORKDIR],
    "--mode is not a sweep flag",
  ),
  "sweep, no config": ("sweep", [_WORKDIR], "A sweep needs --config"),
  "sweep, no config file": (
    "sweep",
    ["--config=configs/nope.py", _WORKDIR],
    "no config file 'configs/nope.py' (from --config)",
  ),
  "sweep, config syntax error": (
    "sweep",
    ["--config={syntax}", _WORKDIR],
    "{syntax}:1: SyntaxError: ",
  ),
  "sweep, unknown method": (
    "sweep",
    ["--config=configs/rotnet.py:digits", "--config.method=gan", _WORKDIR],
    "Unknown method 'gan'",
  ),
}


def _run_in_process(entry, args, monkeypatch, capfd):
  """(exit code, stderr) of `python -m jax_oneclass.<entry>` run in this
  process."""
  code, _, stderr = command_in_process(
    _ENTRIES[entry], args, monkeypatch, capfd, prog=f"jax_oneclass.{entry}"
  )
  return code, stderr


def _assert_one_error_line(code, stderr, message):
  assert code == 2, stderr[-3000:]
  assert "Traceback" not in stderr
  errors = [line for line in stderr.splitlines() if "error:" in line]
  assert len(errors) == 1, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert lines[-1] == errors[0] and errors[0].startswith("error: ")
  assert message in errors[0]


@pytest.mark.parametrize("case", sorted(_CASES))
def test_bad_input_table(case, tmp_path, monkeypatch, capfd):
  paths = _inputs(tmp_path)
  entry, args, message = _CASES[case]
  args = [a.format(**paths) for a in args]
  code, stderr = _run_in_process(entry, args, monkeypatch, capfd)
  _assert_one_error_line(code, stderr, message.format(**paths))


# Bad input found once the data or the method is read (after the checks).
@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["--config=configs/ganomaly.py:digits", "--config.data.image_size=24"],
      "power-of-two",
    ),
    (
      ["--config=configs/dgad.py:digits", "--config.transforms=shift"],
      "Unknown transforms 'shift'",
    ),
  ],
)
def test_bad_method_config(args, message, tmp_path, monkeypatch, capfd):
  code, stderr = _run_in_process(
    "main", [*args, f"--workdir={tmp_path / 'run'}"], monkeypatch, capfd
  )
  _assert_one_error_line(code, stderr, message)


def test_eval_with_another_runs_config(tmp_path, monkeypatch, capfd):
  workdir = _fake_run(tmp_path / "run", load_config("dgad"))
  code, stderr = _run_in_process(
    "main",
    [
      f"--workdir={workdir}",
      "--mode=eval",
      "--config=configs/dgad.py:digits,normal_class=5",
    ],
    monkeypatch,
    capfd,
  )
  _assert_one_error_line(code, stderr, "The config differs from the run")
  assert "data.normal_class: 1 -> 5" in stderr


def test_bad_data_files(tmp_path, monkeypatch, capfd):
  """A class left without a readable image, and an MVTec-like folder
  changed since it was prepared."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from jax_oneclass.data import mvtec  # pylint: disable=g-import-not-at-top
  from tests.test_mvtec import write_widget  # pylint: disable=g-import-not-at-top

  folder = tmp_path / "images"
  for split in ("train", "test"):
    for name in ("cat", "dog"):
      (folder / split / name).mkdir(parents=True)
      Image.new("RGB", (8, 8)).save(folder / split / name / "0.png")
  (folder / "train" / "cat" / "0.png").write_bytes(b"\x89PNG broken")
  write_widget(tmp_path / "mvtec")
  data_dir = tmp_path / "tfds"
  mvtec.build_mvtec_like(
    tmp_path / "mvtec", "widget", data_dir=os.fspath(data_dir)
  )
  (tmp_path / "mvtec" / "widget" / "train" / "good" / "000.png").unlink()
  cases = [
    (
      f"--config=configs/clr.py:folder,folder={folder}",
      f"No image of {folder}/train/cat can be decoded",
    ),
    (
      f"--config=configs/reverse_distillation.py:mvtec,folder="
      f"{tmp_path / 'mvtec'},category=widget,data_dir={data_dir}",
      "its files changed since. Delete",
    ),
  ]
  for config_arg, message in cases:
    code, stderr = _run_in_process(
      "main", [config_arg, f"--workdir={tmp_path / 'run'}"], monkeypatch, capfd
    )
    _assert_one_error_line(code, stderr, message)


def test_the_real_command_fails_in_one_line(tmp_path):
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "jax_oneclass.main",
      "--config=configs/disaug.py:digits",
      "--config.data.normal_class=42",
      f"--workdir={tmp_path / 'run'}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
    "error: config.data.normal_class=42 is out of range for 'digits': "
    "valid range 0..9 (10 classes)."
  ]
  assert not done.stdout
