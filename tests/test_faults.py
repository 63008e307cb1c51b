"""Faults injected through the command line: SIGTERM, corrupt checkpoints
and a full disk each end with one clear line, and a rerun continues.

Each fault hits a real `python -m jax_oneclass.main` process; the runs
before it and the reruns after it go through main's entry point in this
process (a fresh interpreter costs seconds of imports)."""

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

from jax_oneclass import checkpointing, train
from jax_oneclass import main as main_lib
from jax_oneclass import run as run_lib
from jax_oneclass.errors import CheckpointError
from tests.conftest import (
  REPO,
  command_in_process,
  sigterm_once_saved,
  tiny_config,
)


def _config(steps: int, **keys):
  """`tiny_config('clr', steps)` with `keys` set: what `_config_file`
  gives the command line."""
  config = tiny_config("clr", steps=steps)
  config.update_from_flattened_dict(keys)
  return config


def _config_file(tmp_path, steps: int, **keys) -> str:
  """The --config flag of a file giving `_config(steps, **keys)`."""
  path = tmp_path / "tiny_clr.py"
  path.write_text(
    textwrap.dedent(f"""\
      from tests.conftest import tiny_config
      def get_config(arg=None):
        config = tiny_config("clr", steps={steps})
        config.update_from_flattened_dict({keys!r})
        return config
      """)
  )
  return f"--config={path}"


def _command(*args) -> list[str]:
  return [sys.executable, "-m", "jax_oneclass.main", *args]


def _run(command, **kwargs):
  return subprocess.run(
    command,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=400,
    check=False,
    **kwargs,
  )


def _last_line(text: str) -> str:
  return [line for line in text.splitlines() if line.strip()][-1]


def _final_params(workdir, config):
  run = run_lib.setup(config, workdir)
  try:
    state, meta = run_lib.restore(run, run.checkpointer.latest_step())
  finally:
    run.checkpointer.close()
  return jax.device_get(state.params), meta["step"]


def test_sigterm_saves_and_the_rerun_is_bit_identical(
  tmp_path, monkeypatch, capfd
):
  # Halting one step before the end skips evaluation: training is tested.
  keys = {
    "checkpoint_every_steps": 10,
    "log_every_steps": 5,
    "halt_after_step": 80,
  }
  args = [_config_file(tmp_path, 81, **keys), f"--workdir={tmp_path / 'run'}"]
  code, stderr = sigterm_once_saved(
    _command(*args), tmp_path / "run" / "checkpoints" / "10"
  )
  assert code == 2, stderr[-3000:]
  line = _last_line(stderr)
  assert "Stopped by SIGTERM at step" in line
  assert "Run the same command again" in line and "Traceback" not in stderr
  stopped = int(line.split("at step ")[1].split()[0])
  assert 10 <= stopped < 80
  assert (tmp_path / "run" / "checkpoints" / str(stopped)).is_dir()
  assert not (tmp_path / "run" / ".lock").exists()  # Released on the way out.

  code, stdout, stderr = command_in_process(
    main_lib.run, args, monkeypatch, capfd
  )
  assert code == 0, stderr[-3000:]
  assert f"Resumed from the checkpoint at step {stopped}" in stdout
  config = _config(81, **keys)
  train.train(config, tmp_path / "straight")
  resumed, step = _final_params(tmp_path / "run", config)
  straight, _ = _final_params(tmp_path / "straight", config)
  assert step == 80
  jax.tree.map(np.testing.assert_array_equal, straight, resumed)


def _data_files(step_dir):
  files = [
    p
    for p in (step_dir / "state").rglob("*")
    if p.is_file() and "/d/" in str(p)
  ]
  return sorted(files, key=lambda p: -p.stat().st_size)


def test_flipped_and_truncated_checkpoints_fall_back(tmp_path):
  # Halted at the last checkpoint, one step before the end: no evaluation.
  keys = {"halt_after_step": 6}
  workdir = tmp_path / "run"
  train.train(_config(7, **keys), workdir)
  checkpoints = workdir / "checkpoints"
  flipped = _data_files(checkpoints / "6")[0]
  data = bytearray(flipped.read_bytes())
  data[:4096] = bytes(b ^ 0xFF for b in data[:4096])
  flipped.write_bytes(bytes(data))
  truncated = _data_files(checkpoints / "4")[0]
  truncated.write_bytes(truncated.read_bytes()[:100])
  assert checkpointing.verify(checkpoints / "6").startswith(
    "fails its checksums"
  )

  done = _run(
    _command(_config_file(tmp_path, 7, **keys), f"--workdir={workdir}")
  )
  assert done.returncode == 0, done.stderr[-3000:]
  for step in (6, 4):
    assert (
      f"warning: Skipping the checkpoint {checkpoints / str(step)}: "
      "it fails its checksums" in done.stderr
    )
  assert "Resumed from the checkpoint at step 2" in done.stdout
  assert "Traceback" not in done.stderr
  assert "Event loop is closed" not in done.stderr
  moved = sorted(
    p.name.split("-")[0]
    for p in (workdir / checkpointing.CORRUPT_DIR).iterdir()
  )
  assert moved == ["4", "6"]  # Moved aside, never deleted.
  assert checkpointing.Checkpointer(checkpoints).latest_step() == 6


@pytest.mark.xdist_group("run_clr")
def test_unverified_unreadable_checkpoint_is_skipped(tmp_path, trained_run):
  """A checkpoint from before checksums (none written) that cannot be read
  is skipped as well."""
  workdir = tmp_path / "run"
  shutil.copytree(trained_run("clr").workdir, workdir)  # 4 steps.
  step_dir = workdir / "checkpoints" / "4"
  (step_dir / checkpointing.CHECKSUMS).unlink()
  for path in (step_dir / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  run, _ = train.train(run_lib.saved_config(workdir), workdir)
  assert run.checkpointer.latest_step() == 4
  assert len(list((workdir / checkpointing.CORRUPT_DIR).iterdir())) == 1


def _can_mount_tmpfs(tmp_path) -> bool:
  probe = subprocess.run(
    [
      "unshare",
      "-m",
      "sh",
      "-c",
      f"mkdir -p {tmp_path}/probe && mount -t tmpfs -o size=1m tmpfs "
      f"{tmp_path}/probe",
    ],
    capture_output=True,
    check=False,
  )
  return probe.returncode == 0


def test_disk_full_during_save_then_a_clean_rerun(tmp_path, monkeypatch, capfd):
  if not _can_mount_tmpfs(tmp_path):
    pytest.skip("No mount namespaces here for a small tmpfs.")
  # The command halts at step 4, one step before the end: no evaluation.
  train.train(_config(5, halt_after_step=2), tmp_path / "at_2")
  disk = tmp_path / "disk"
  args = [
    _config_file(tmp_path, 5, halt_after_step=4),
    f"--workdir={disk / 'run'}",
  ]
  main = " ".join(_command(*args))
  # The run halted at step 2 on a small disk filled but for 40 KiB (less
  # than one checkpoint) trains on; what it leaves is copied out.
  script = textwrap.dedent(f"""\
      mkdir -p {disk} && mount -t tmpfs -o size=4m tmpfs {disk} || exit 90
      cp -a {tmp_path / "at_2"} {disk / "run"} || exit 91
      free=$(df -k --output=avail {disk} | tail -1)
      fallocate -l $(( (free - 40) * 1024 )) {disk}/filler || exit 92
      {main} > {tmp_path}/full.out 2> {tmp_path}/full.err
      echo $? > {tmp_path}/full.rc
      ls -a {disk}/run/checkpoints > {tmp_path}/left.txt
      cp -a {disk / "run"} {tmp_path / "left"} || exit 93
      """)
  done = subprocess.run(
    ["unshare", "-m", "sh", "-c", script],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert done.returncode == 0, done.stdout + done.stderr
  stderr = (tmp_path / "full.err").read_text()
  assert (tmp_path / "full.rc").read_text().strip() == "2", stderr[-3000:]
  line = _last_line(stderr)
  assert "Disk full while saving the checkpoint of step 4" in line
  assert "free, a checkpoint needs about" in line
  assert "continue from step 2" in line
  assert "Traceback" not in stderr and "RESOURCE_EXHAUSTED" not in stderr
  assert "tmp" not in (tmp_path / "left.txt").read_text()  # No partial left.
  # The same command on what it left, with room to spare.
  args[1] = f"--workdir={tmp_path / 'left'}"
  code, stdout, rerun = command_in_process(
    main_lib.run, args, monkeypatch, capfd
  )
  assert code == 0, rerun[-3000:]
  assert "Resumed from the checkpoint at step 2" in stdout
  assert sorted(os.listdir(tmp_path / "left" / "checkpoints")) == ["2", "4"]


def test_disk_full_reported_by_the_writer(tmp_path, monkeypatch):
  """The same path where no tmpfs can be mounted: the writer raises ENOSPC."""
  checkpointer = checkpointing.Checkpointer(tmp_path / "checkpoints")
  partial = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234"

  def full(step, args):
    del step, args
    partial.mkdir(parents=True)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(checkpointer.manager, "save", full)
  with pytest.raises(
    CheckpointError,
    match=r"Disk full while saving the "
    r"checkpoint of step 3 .* free, .*Removed the partial "
    r"3.orbax-checkpoint-tmp-1234",
  ):
    checkpointer.save(3, {"x": np.zeros(3)}, {"step": 3})
  assert not partial.exists()
  checkpointer.close()


def test_a_partial_still_being_written_is_removed_once_settled(tmp_path):
  """Writer threads that outlive the failed save must not recreate it."""
  partial = tmp_path / "4.orbax-checkpoint-tmp"

  def late_writer():
    for i in range(5):
      (partial / "state").mkdir(parents=True, exist_ok=True)
      (partial / "state" / f"chunk{i}").write_bytes(b"x" * 10)
      time.sleep(0.1)

  writer = threading.Thread(target=late_writer)
  writer.start()
  time.sleep(0.05)
  removed = checkpointing.remove_when_settled(
    tmp_path, "4.orbax-checkpoint-tmp*"
  )
  writer.join()
  assert removed == ["4.orbax-checkpoint-tmp"]
  assert not partial.exists()


def test_folder_classes_by_name(tmp_path):
  from jax_oneclass import config as config_lib  # pylint: disable=g-import-not-at-top

  for name in ("cat", "dog"):
    (tmp_path / "train" / name).mkdir(parents=True)
  config = config_lib.load("clr", f"folder,folder={tmp_path},normal_class=dog")
  assert config.data.normal_class == 1


def test_a_batch_larger_than_the_training_set_warns(capsys):
  from jax_oneclass import data  # pylint: disable=g-import-not-at-top

  config = tiny_config("clr")
  info = data.dataset_info(config)
  run_lib.warn_small_training_set(config, info)
  assert not capsys.readouterr().err
  config.batch_size = 256
  run_lib.warn_small_training_set(config, info)
  err = capsys.readouterr().err
  assert (
    f"batch_size 256 is larger than the {info.num_train} normal training images"
    in err
    and "negatives" in err
  )


def test_make_mvtec_like_without_its_source(tmp_path, monkeypatch, capsys):
  from experiments import make_mvtec_like  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(
    sys,
    "argv",
    [
      "make_mvtec_like.py",
      f"--out={tmp_path}",
      f"--source={tmp_path / 'none.tar.gz'}",
    ],
  )
  with pytest.raises(SystemExit) as done:  # Not any other exception.
    make_mvtec_like.main()
  assert done.value.code == 2
  stderr = capsys.readouterr().err
  assert "is missing. Pass --source=" in _last_line(stderr)
  assert "Traceback" not in stderr


def test_debug_shows_the_traceback_of_an_error(tmp_path):
  """Bad input is one line; with --debug the same error comes with its
  traceback (checked before JAX loads: each run takes a fraction of a
  second)."""
  message = (
    "config.data.normal_class=42 is out of range for 'digits': valid range "
    "0..9 (10 classes)."
  )
  command = _command(
    "--config=configs/disaug.py:digits",
    "--config.data.normal_class=42",
    f"--workdir={tmp_path / 'run'}",
  )
  done = _run(command)
  assert done.returncode == 2
  assert done.stderr.splitlines() == [f"error: {message}"]
  done = _run([*command, "--debug"])
  assert done.returncode == 1  # Python's, for an uncaught exception.
  assert done.stderr.startswith("Traceback (most recent call last):")
  assert "in check_data" in done.stderr  # Where it was raised.
  assert _last_line(done.stderr) == (
    f"jax_oneclass.errors.ConfigError: {message}"
  )
  assert not (tmp_path / "run").exists()
