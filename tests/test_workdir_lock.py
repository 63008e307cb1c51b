"""One writer per workdir: the lock file training and evaluation take."""

import json
import socket
import subprocess
import sys
import time

import pytest

from jax_oneclass import train, workdir_lock
from jax_oneclass.errors import WorkdirBusy
from tests.conftest import tiny_config


def _write_lock(workdir, pid: int) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  workdir_lock.lock_path(workdir).write_text(
    json.dumps(
      {
        "host": socket.gethostname(),
        "pid": pid,
        "since": time.time(),
        "purpose": "training",
      }
    )
  )


def test_a_lock_held_by_a_live_process_refuses_a_second_writer(tmp_path):
  sleeper = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(60)"]
  )
  try:
    _write_lock(tmp_path, sleeper.pid)
    with pytest.raises(
      WorkdirBusy,
      match=(
        rf"in use by pid {sleeper.pid} on host {socket.gethostname()} since "
        r"\d{4}-\d\d-\d\d .* \(training\)\. Wait for it.*delete .*\.lock"
      ),
    ):
      train.train(tiny_config("clr", steps=2), tmp_path)
    assert not (tmp_path / "checkpoints" / "2").exists()
    assert (
      json.loads(workdir_lock.lock_path(tmp_path).read_text())["pid"]
      == sleeper.pid
    )  # Left alone.
  finally:
    sleeper.kill()
    sleeper.wait()


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
  tmp_path.mkdir(exist_ok=True)
  workdir_lock.lock_path(tmp_path).write_text(
    json.dumps(
      {"host": "elsewhere", "pid": 1, "since": 0, "purpose": "training"}
    )
  )
  with pytest.raises(WorkdirBusy, match="on host elsewhere"):
    workdir_lock.acquire(tmp_path, "evaluation")


def test_a_stale_lock_is_taken_over_and_released_after_the_run(
  tmp_path, capsys
):
  finished = subprocess.Popen([sys.executable, "-c", "pass"])
  finished.wait()
  _write_lock(tmp_path, finished.pid)
  train.train(tiny_config("clr", steps=2), tmp_path)
  err = capsys.readouterr().err
  assert (
    f"warning: Taking over the lock {tmp_path / '.lock'} left by pid "
    f"{finished.pid}" in err
  )
  assert (tmp_path / "checkpoints" / "2").is_dir()
  assert not workdir_lock.lock_path(tmp_path).exists()


def test_the_lock_is_held_during_the_block_only(tmp_path):
  with workdir_lock.held(tmp_path, "evaluation") as payload:
    assert workdir_lock.read_holder(tmp_path / ".lock") == payload
    with pytest.raises(WorkdirBusy, match="(evaluation)"):
      workdir_lock.acquire(tmp_path, "training")
  assert not (tmp_path / ".lock").exists()


@pytest.mark.xdist_group("run_clr")
def test_a_command_line_run_leaves_no_lock(trained_run):
  assert not workdir_lock.lock_path(trained_run("clr").workdir).exists()


def test_an_unreadable_lock_is_not_taken_over(tmp_path):
  workdir_lock.lock_path(tmp_path).write_text("{half written")
  with pytest.raises(WorkdirBusy, match="whose lock file cannot be read"):
    workdir_lock.acquire(tmp_path, "training")
