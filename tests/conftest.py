"""Shared test fixtures: tiny configs that train in seconds on a CPU."""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Many tests (and the CLI subprocesses they start) compile the same tiny
# steps: one persistent compilation cache for the session saves minutes.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  tempfile.mkdtemp(prefix="jax_oneclass_test_compile_cache_"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The suite's programs are tiny, so XLA:CPU's LLVM optimisation costs far
# more than it saves: at level 0 the suite needs 2.5-4x less CPU time (it
# tests what is computed, not how fast). JAX_ONECLASS_TEST_XLA_OPT=default
# runs it with XLA's usual optimisation; subprocesses inherit the choice.
_OPT_FLAG = "--xla_backend_optimization_level=0"
if os.environ.get("JAX_ONECLASS_TEST_XLA_OPT", "0") != "default":
  if _OPT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " " + _OPT_FLAG
    ).strip()
# What the session caches (convolution paths 'auto' measured) stays out of
# the user's ~/.cache/jax_oneclass.
os.environ.setdefault(
  "JAX_ONECLASS_CACHE", tempfile.mkdtemp(prefix="jax_oneclass_test_cache_")
)

from pathlib import Path  # pylint: disable=g-import-not-at-top

import pytest  # pylint: disable=g-import-not-at-top

from jax_oneclass import config as config_lib  # pylint: disable=g-import-not-at-top
from jax_oneclass import methods  # pylint: disable=g-import-not-at-top

REPO = Path(__file__).resolve().parents[1]
METHODS = methods.available_methods()


def load_config(method: str, arg: str | None = "digits"):
  """`configs/<method>.py:<arg>` as the CLI would load it."""
  return config_lib.load(method, arg)


def localises(method: str) -> bool:
  """Whether a method's default data set has pixel masks (MVTec)."""
  return load_config(method, None).data.name == "mvtec"


def tiny_config(method: str, steps: int = 4, arg: str = "digits"):
  """The config file's `test` preset (its smallest networks) on `arg`'s
  data, in a very short run."""
  config = load_config(method, f"{arg},{config_lib.TEST_PRESET}")
  config.num_train_steps = steps
  config.batch_size = 16
  config.data.shuffle_buffer = 64
  config.eval.batch_size = 128
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.progress_bar = False
  config.optimizer.warmup_steps = 0
  # Pictures cost more than the tiny run itself; the tests of plots and
  # overlays use the CLI runs of tests/trained.py, which draw them.
  config.eval.plots = False
  config.eval.num_overlays = 0
  return config


def command_in_process(entry, args, monkeypatch, capture, prog="jax_oneclass"):
  """(exit code, stdout, stderr) of a command line run in this process:
  `entry()` (e.g. `main.run` for `python -m jax_oneclass.main`) with
  `args`, from the repository root; `capture` is pytest's capsys or capfd.

  A command defines its config's override flags in absl's process-wide
  registry and leaves them there; they are removed afterwards so that the
  next command in this process can define them again.
  """
  import sys  # pylint: disable=g-import-not-at-top

  from absl import flags  # pylint: disable=g-import-not-at-top

  monkeypatch.chdir(REPO)
  monkeypatch.setattr(sys, "argv", [prog, *args])
  capture.readouterr()
  try:
    with pytest.raises(SystemExit) as done:
      entry()
  finally:
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)
  out, err = capture.readouterr()
  return done.value.code or 0, out, err


def sigterm_once_saved(command, checkpoint, timeout_s: float = 300):
  """Starts `command` in the repository root, sends it SIGTERM as soon as
  the folder `checkpoint` appears (or the process ends) and returns its
  (exit code, stderr)."""
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  process = subprocess.Popen(
    command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.monotonic() + timeout_s
  while not Path(checkpoint).is_dir() and process.poll() is None:
    assert time.monotonic() < deadline
    time.sleep(0.02)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=timeout_s)
  return process.returncode, stderr


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """`trained_run(method)`: that method's run, trained once per session
  through the CLI (see tests/trained.py) and shared by every xdist worker."""
  from tests import trained  # pylint: disable=g-import-not-at-top

  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # Shared by the workers of this session only.
  return lambda method: trained.train_once(method, base / "trained_runs")


_CPU_LOG = os.environ.get("JAX_ONECLASS_TEST_CPU_LOG")
if _CPU_LOG:
  import resource  # pylint: disable=g-import-not-at-top

  def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return sum((u.ru_utime + u.ru_stime) for u in (own, children))

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):
    """With JAX_ONECLASS_TEST_CPU_LOG=FILE, appends each test's CPU seconds
    (this process and the subprocesses it waited for), wall seconds, id,
    xdist worker and start time to FILE: on a busy machine CPU time still
    says where the suite's time goes."""
    del nextitem
    import time  # pylint: disable=g-import-not-at-top

    cpu, wall, start = _cpu_seconds(), time.perf_counter(), time.time()
    yield
    with open(_CPU_LOG, "a") as log:
      log.write(
        f"{_cpu_seconds() - cpu:.2f}\t{time.perf_counter() - wall:.2f}\t"
        f"{item.nodeid}\t{os.environ.get('PYTEST_XDIST_WORKER', '-')}\t"
        f"{start:.1f}\n"
      )


# Files whose tests take longest (CPU seconds per test; see
# JAX_ONECLASS_TEST_CPU_LOG), collected first: xdist then hands out the
# short tests last, and neither worker waits long for the other at the end.
_LONGEST_FIRST = (
  "test_sweep.py",
  "test_parallel.py",
  "test_faults.py",
  "test_extending.py",
  "test_fitted_faults.py",
  "test_workdir_faults.py",
  "test_interrupts.py",
  "test_two_stage_patch.py",
  "test_gan.py",
)


def pytest_collection_modifyitems(config, items):
  """Puts the files of `_LONGEST_FIRST` first, in that order (a stable
  sort: each file keeps its own order)."""
  del config
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
