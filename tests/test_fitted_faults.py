"""The fitted stage verified: damaged, stale or unverified stages."""

import shutil

import pytest

from jax_oneclass import checkpointing, detector, evaluate, train
from jax_oneclass import run as run_lib
from jax_oneclass.errors import CheckpointError

pytestmark = pytest.mark.xdist_group("run_clr")
STEP = 4  # The shared run's last checkpoint.


@pytest.fixture(name="work")
def _work(trained_run, tmp_path):
  """(a copy of the shared clr run's workdir, its trained run)."""
  shared = trained_run("clr")
  shutil.copytree(shared.workdir, tmp_path / "run")
  return tmp_path / "run", shared


def _config(workdir):
  """The run's saved config, evaluated without pictures (the shared run
  has drawn them; they cost more than the scoring)."""
  config = run_lib.saved_config(workdir)
  config.eval.plots = False
  config.eval.num_overlays = 0
  return config


def _stage_dir(workdir):
  return workdir / "fitted" / str(STEP)


def _damage(workdir, how: str) -> None:
  """Flips bytes in, or truncates, the stage's largest array file."""
  files = [
    p for p in (_stage_dir(workdir) / "fitted").rglob("*") if p.is_file()
  ]
  path = max(files, key=lambda p: p.stat().st_size)
  raw = bytearray(path.read_bytes())
  if how == "flip":
    middle = len(raw) // 2
    raw[middle : middle + 8] = bytes(b ^ 0xFF for b in raw[middle : middle + 8])
  else:
    raw = raw[: len(raw) // 2]
  path.write_bytes(bytes(raw))


def _problem(workdir):
  store = checkpointing.FittedStore(workdir / "fitted")
  try:
    return store.problem(
      STEP, checkpointing.checksums_digest(workdir / "checkpoints" / str(STEP))
    )
  finally:
    store.close()


def test_the_saved_stage_records_its_checkpoint(work):
  workdir, _ = work
  assert _problem(workdir) is None


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_eval_refits_a_damaged_stage_with_a_warning(work, capsys, how):
  workdir, shared = work
  _damage(workdir, how)
  assert "fails its checksums (changed: fitted/" in _problem(workdir)
  results = evaluate.evaluate(_config(workdir), workdir)
  err = capsys.readouterr().err
  assert (
    f"warning: The fitted stage at {_stage_dir(workdir)} fails its "
    "checksums (changed: fitted/"
  ) in err
  assert "fitting it anew." in err
  assert results["auroc"] == shared.results["auroc"]  # As a fresh fit.
  assert _problem(workdir) is None  # Saved anew.


def test_detector_refuses_a_damaged_stage_and_writes_nothing(work):
  workdir, _ = work
  _damage(workdir, "truncate")
  with pytest.raises(
    CheckpointError,
    match=(
      r"fitted stage at .*fitted/4 fails its checksums.* Fit it anew: "
      rf"python -m jax_oneclass.main --workdir={workdir} --mode=eval "
      r"--refit$"
    ),
  ):
    detector.Detector.load(workdir)
  assert "fails its checksums" in _problem(workdir)


def test_a_stage_of_a_replaced_checkpoint_is_not_reused(work, capsys):
  workdir, _ = work
  shutil.move(workdir / "checkpoints", workdir.parent / "aside")
  config = _config(workdir)
  config.seed += 1  # Another model at the same step.
  train.train(config, workdir)
  assert "was fitted on another checkpoint" in _problem(workdir)
  with pytest.raises(CheckpointError, match="another checkpoint of step 4"):
    detector.Detector.load(workdir)
  evaluate.evaluate(config, workdir)
  assert (
    f"The fitted stage at {_stage_dir(workdir)} was fitted on another "
    "checkpoint of step 4 (the checkpoint has been replaced since): "
    "fitting it anew."
  ) in capsys.readouterr().err
  assert _problem(workdir) is None


def test_a_stage_saved_before_checksums(work, capsys):
  workdir, _ = work
  (_stage_dir(workdir) / checkpointing.CHECKSUMS).unlink()
  detector.Detector.load(workdir)  # Used, with a warning.
  err = capsys.readouterr().err
  assert (
    "has no checksums (saved by an older version): using it unverified" in err
  )
  assert _problem(workdir) == checkpointing.UNVERIFIED  # Nothing written.
  evaluate.evaluate(_config(workdir), workdir)
  assert (
    "has no checksums (saved by an older version): fitting it anew."
    in capsys.readouterr().err
  )
  assert _problem(workdir) is None
