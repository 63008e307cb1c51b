"""SIGTERM and Ctrl-C within seconds in every phase; impossible batch sizes
refused before any data is read; the training loop runs few steps ahead."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from jax_oneclass import data, interrupts, train
from jax_oneclass import main as main_lib
from jax_oneclass import run as run_lib
from jax_oneclass.errors import ConfigError
from tests.conftest import REPO, command_in_process, tiny_config


def _config_file(tmp_path, steps: int) -> str:
  path = tmp_path / "tiny_clr.py"
  path.write_text(
    textwrap.dedent(f"""\
      from tests.conftest import tiny_config
      def get_config(arg=None):
        return tiny_config("clr", steps={steps})
      """)
  )
  return f"--config={path}"


def _last_line(text: str) -> str:
  return [line for line in text.splitlines() if line.strip()][-1]


def test_an_impossible_batch_is_refused_before_reading_data(
  tmp_path, monkeypatch, capfd
):
  # main's entry point in this process (test_bad_input runs the real
  # command once for bad input's exit code and line).
  start = time.monotonic()
  code, _, stderr = command_in_process(
    main_lib.run,
    [
      _config_file(tmp_path, 4),
      f"--workdir={tmp_path / 'run'}",
      "--config.batch_size=1000000000",
    ],
    monkeypatch,
    capfd,
  )
  assert time.monotonic() - start < 60  # It sat for minutes before.
  assert code == 2, stderr[-3000:]
  line = _last_line(stderr)
  num_train = data.dataset_info(tiny_config("clr")).num_train
  assert line.startswith(
    "error: batch_size=1000000000 is more than 100 "
    f"times the {num_train} normal training images"
  )
  assert f"--config.batch_size={num_train} or lower" in line
  assert "Traceback" not in stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_batch_whose_images_exceed_the_memory_is_refused(monkeypatch):
  config = tiny_config("clr")
  info = data.dataset_info(config)
  image = 4 * info.image_shape[0] * info.image_shape[1] * info.image_shape[2]
  run_lib.check_batch_sizes(config, info)  # Fits.
  # Room for two batches of 40 images (the batch and a prefetched one).
  monkeypatch.setattr(run_lib, "physical_memory", lambda: 80 * image)
  config.batch_size = 64
  with pytest.raises(
    ConfigError,
    match=r"batch_size=64 needs .* float32 "
    r"images alone, more than this machine's .* of memory; "
    r"set --config.batch_size=40 or lower",
  ):
    run_lib.check_batch_sizes(config, info)
  config.batch_size = 16
  with pytest.raises(ConfigError, match="--config.eval.batch_size=40 or"):
    run_lib.check_batch_sizes(config, info)  # eval.batch_size is 128.


def test_the_loop_runs_at_most_max_in_flight_steps_ahead(tmp_path, monkeypatch):
  dispatched, finished, index = [], [0], {}
  real_jit = train.jit_train_step

  def counting_jit(method, mesh):
    step_fn = real_jit(method, mesh)

    def step(state, batch, rng):
      # Every step up to MAX_IN_FLIGHT before this one has finished.
      dispatched.append(len(dispatched) + 1 - finished[0])
      state, metrics = step_fn(state, batch, rng)
      index[id(metrics)] = len(dispatched)
      return state, metrics

    return step

  def wait_for(metrics):
    finished[0] = max(finished[0], index[id(metrics)])
    return train.jax.block_until_ready(metrics)

  monkeypatch.setattr(train, "jit_train_step", counting_jit)
  monkeypatch.setattr(train, "_wait_for", wait_for)
  config = tiny_config("clr", steps=10)
  config.log_every_steps = config.checkpoint_every_steps = 10
  train.train(config, tmp_path / "run")
  assert len(dispatched) == 10
  # Unfinished steps when each is dispatched (the summary finishes all).
  assert max(dispatched) == train.MAX_IN_FLIGHT + 1


_STUCK = """\
import ctypes, sys
from jax_oneclass import interrupts, workdir_lock
with interrupts.guarded(), workdir_lock.held(sys.argv[1], "test"):
  libc = ctypes.CDLL(None)
  mutex = ctypes.create_string_buffer(64)  # PTHREAD_MUTEX_INITIALIZER.
  libc.pthread_mutex_lock(mutex)
  print("locked", flush=True)
  libc.pthread_mutex_lock(mutex)  # Never returns, takes no signal.
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_inside_a_blocking_call_ends_the_process(tmp_path, sig):
  process = subprocess.Popen(
    [sys.executable, "-c", _STUCK, str(tmp_path)],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  assert process.stdout.readline() == "locked\n"
  assert (tmp_path / ".lock").exists()
  time.sleep(1)  # Into the second lock call.
  start = time.monotonic()
  process.send_signal(sig)
  _, stderr = process.communicate(timeout=60)
  assert time.monotonic() - start < interrupts.GRACE_SECS + 30
  assert process.returncode == 2
  name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
  assert _last_line(stderr) == interrupts.hard_exit_message(
    name, False, interrupts.GRACE_SECS
  )
  assert not (tmp_path / ".lock").exists()  # Released on the way out.


_WAITING = """\
import ctypes, sys
from jax_oneclass import interrupts
with interrupts.guarded():
  waiting = interrupts.waiting_for_steps() if sys.argv[1] == "1" else (
      interrupts.contextlib.nullcontext())
  try:
    with waiting:
      print("waiting", flush=True)
      ctypes.CDLL(None).system(b"sleep 6")  # Takes no signal till it ends.
  except interrupts.Terminated:
    print("taken", flush=True)
"""


@pytest.mark.parametrize("steps", [False, True])
def test_a_wait_for_running_steps_has_a_longer_grace(steps):
  # E.g. a slow step: the loop would save once it ends.
  process = subprocess.Popen(
    [sys.executable, "-c", _WAITING, str(int(steps))],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  assert process.stdout.readline() == "waiting\n"
  time.sleep(1)  # Into the call.
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=60)
  if steps:
    assert (process.returncode, stdout) == (0, "taken\n"), stderr[-2000:]
  else:
    assert process.returncode == 2
    assert _last_line(stderr) == interrupts.hard_exit_message(
      "SIGTERM", False, interrupts.GRACE_SECS
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_setup_and_compilation_exits_within_seconds(
  tmp_path, sig
):
  # The start line comes before the pipeline is built and the step compiled.
  command = [
    sys.executable,
    "-m",
    "jax_oneclass.main",
    _config_file(tmp_path, 400),
    f"--workdir={tmp_path / 'run'}",
  ]
  process = subprocess.Popen(
    command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  line = process.stdout.readline()
  assert "steps 0..400" in line, line
  start = time.monotonic()
  process.send_signal(sig)
  _, stderr = process.communicate(timeout=120)
  assert time.monotonic() - start < 60  # Minutes before.
  assert process.returncode == 2, stderr[-3000:]
  line = _last_line(stderr)
  assert line.startswith("error: ")
  if sig == signal.SIGTERM:
    assert "Stopped by SIGTERM" in line, line
  else:
    assert "Interrupted" in line or "Stopped by Ctrl-C" in line, line
  assert "Traceback" not in stderr
  assert not (tmp_path / "run" / ".lock").exists()
  # Nothing half written: only complete checkpoints (if a step finished).
  folder = tmp_path / "run" / "checkpoints"
  names = os.listdir(folder) if folder.is_dir() else []
  assert all(name.isdigit() for name in names), names


def _sigterm_self():
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(1)  # The handler runs here.


def test_sigterm_outside_the_steps_raises_inside_sets_the_request():
  # One guard per signal: a second signal ends the process.
  with interrupts.guarded():
    with pytest.raises(interrupts.Terminated, match="outside the training"):
      _sigterm_self()
  with interrupts.guarded():
    with pytest.raises(interrupts.Terminated, match="after the last training"):
      with train.sigterm_requests() as requested:
        _sigterm_self()  # The loop would save and stop at its next step.
        assert requested.is_set()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_sigterm_whose_exception_is_swallowed_still_stops():
  """A handler that runs inside a garbage-collector callback raises into
  nothing; the request stays, so the loop or the command still stops."""
  with interrupts.guarded():
    try:
      _sigterm_self()
    except interrupts.Terminated:
      pass  # As if swallowed.
    with pytest.raises(interrupts.Terminated, match="after the last"):
      with train.sigterm_requests() as requested:
        assert requested.is_set()  # The loop stops at its first step.
  with interrupts.guarded():
    try:
      _sigterm_self()
    except interrupts.Terminated:
      pass
    with pytest.raises(interrupts.Terminated, match="finished the work"):
      interrupts.raise_if_requested()
