"""Each method trained once per test session through the real command line.

The CLI, predict, export and Detector tests all need a trained run of every
method. Training it once, in a subprocess exactly as a user starts it, and
sharing the workdir and the captured output saves most of the suite's time.
Runs live in a folder every xdist worker sees; a file lock per method makes
the first worker that asks train it while the others wait.
"""

import dataclasses
import fcntl
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, localises

DIGITS_NORMAL_CLASS = 2
# Per localising method: flags beyond the shared ones. Gradient preference:
# nothing improves by min_delta=1, so step 2 decides to stop, the trainer
# sees it at the log of step 4, saves there and evaluates that state.
_LOCALISING_FLAGS = {
  "reverse_distillation": ["--config.num_train_steps=2"],
  "gradient_preference": [
    "--config.center_steps=1",
    "--config.early_stopping.patience=1",
    "--config.early_stopping.min_delta=1.0",
    "--config.num_train_steps=40",
  ],
}
NUM_OVERLAYS = 3


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A finished CLI run: its workdir, its output and its first results."""

  method: str
  workdir: Path
  stdout: str
  stderr: str
  results: dict


def tiny_flags() -> list[str]:
  """Command-line flags of `tests.conftest.tiny_config`'s run length (the
  networks come from the config file's `test` preset)."""
  return [
    "--config.num_train_steps=4",
    "--config.batch_size=16",
    "--config.eval.batch_size=128",
    "--config.log_every_steps=2",
    "--config.checkpoint_every_steps=2",
  ]


def _localising_args(method: str, root: Path) -> list[str]:
  from tests.test_mvtec import write_widget  # pylint: disable=g-import-not-at-top

  widget = root / "widget_images"
  if not (widget / "widget").is_dir():
    write_widget(widget)
  return [
    f"--config=configs/{method}.py:mvtec,folder={widget},"
    f"category=widget,data_dir={root / f'tfds_{method}'}",
    "--config.data.image_size=32",
    "--config.model.backbone=resnet_tiny",
    "--config.batch_size=4",
    "--config.eval.batch_size=4",
    "--config.log_every_steps=2",
    f"--config.eval.num_overlays={NUM_OVERLAYS}",
    "--config.checkpoint_every_steps=2",
    "--config.data.holdout_fraction=0.25",  # 1 of the 4 good images.
    *_LOCALISING_FLAGS.get(method, []),
  ]


def command(method: str, root: Path) -> list[str]:
  """The CLI command that trains `method`'s shared run under `root`."""
  if localises(method):
    args = _localising_args(method, root)
  else:
    arg = f"digits,test,normal_class={DIGITS_NORMAL_CLASS}"
    # Score plots cost a third of a digits run (26 scorers for RotNet and
    # CLR); the localising runs draw them (tests/test_mvtec.py checks).
    args = [
      f"--config=configs/{method}.py:{arg}",
      *tiny_flags(),
      f"--config.eval.num_overlays={NUM_OVERLAYS}",
      "--config.eval.plots=False",
    ]
  return [
    sys.executable,
    "-m",
    "jax_oneclass.main",
    *args,
    f"--workdir={root / method}",
  ]


def train_once(method: str, root: Path) -> TrainedRun:
  """`method`'s shared run under `root`, trained by the first caller."""
  root.mkdir(parents=True, exist_ok=True)
  record = root / f"{method}.run.json"
  with open(root / f"{method}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not record.is_file():
      done = subprocess.run(
        command(method, root),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
      )
      assert done.returncode == 0, done.stderr[-3000:]
      results = json.loads((root / method / "results.json").read_text())
      record.write_text(
        json.dumps(
          {"stdout": done.stdout, "stderr": done.stderr, "results": results}
        )
      )
  saved = json.loads(record.read_text())
  return TrainedRun(
    method, root / method, saved["stdout"], saved["stderr"], saved["results"]
  )


def by_method(methods):
  """Parameters over `methods`, each in the xdist group of its run, so a
  run's tests share the worker that trained it."""
  return [
    pytest.param(m, id=m, marks=pytest.mark.xdist_group(f"run_{m}"))
    for m in methods
  ]
