"""Run output: TensorBoard scalars, JSON files and a progress bar.

Only process 0 writes; the other processes get no-op writers. Importing
this module imports neither JAX nor TensorFlow (the CLI quiets them first).
"""

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import tqdm


def is_main_process() -> bool:
  from jax_oneclass import parallel  # pylint: disable=g-import-not-at-top

  return parallel.process_index() == 0


def write_json(path, payload: dict) -> None:
  """Writes `payload` as indented JSON (process 0 only), atomically."""
  if not is_main_process():
    return
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
  tmp.replace(path)


def writable(directory) -> bool:
  """Whether files can be created in `directory` (made if missing)."""
  try:
    Path(directory).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
      return True
  except OSError:
    return False


class _DropLibraryNoise(logging.Filter):
  """Drops the errors Orbax logs (with tracebacks) for failures that reach
  the user anyway, as one jax_oneclass error line."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "/orbax/" not in record.pathname.replace("\\", "/")


def quiet_libraries() -> None:
  """Silences the INFO logs of absl, JAX, Orbax and TensorFlow, Orbax's
  error logs and asyncio's shutdown tracebacks (e.g. 'Event loop is
  closed'); call it before importing them. `--verbose` skips it."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  absl_logging.set_verbosity(absl_logging.WARNING)
  absl_logger = absl_logging.get_absl_logger()
  if not any(isinstance(f, _DropLibraryNoise) for f in absl_logger.filters):
    absl_logger.addFilter(_DropLibraryNoise())
  for name in ("jax", "orbax", "tensorflow"):
    logging.getLogger(name).setLevel(logging.WARNING)
  # ONNX serialisation warns about every untyped intermediate it skips.
  logging.getLogger("onnx_ir").setLevel(logging.ERROR)
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def no_stderr_fd():
  """Points file descriptor 2 at /dev/null for the block: TensorFlow's C++
  code logs there while it loads, before any log level applies."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


# TensorFlow's start-up imports all of Keras (and scikit-learn through it)
# only to register Keras optimizers for Keras SavedModels, which tf.data and
# our exports never load: about a third of TensorFlow's import time.
_KERAS_PRELOAD = "keras.src.optimizers"


def import_tensorflow(quiet: bool = True):
  """TensorFlow for tf.data on the host (its GPUs hidden: JAX owns them),
  imported without its start-up logs when `quiet` and without preloading
  Keras (a later `import keras` works as usual)."""
  skip_keras = "tensorflow" not in sys.modules and (
    _KERAS_PRELOAD not in sys.modules
  )
  if skip_keras:
    sys.modules[_KERAS_PRELOAD] = None  # TF ignores a failed preload.
  try:
    with no_stderr_fd() if quiet else contextlib.nullcontext():
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
  finally:
    if skip_keras and sys.modules.get(_KERAS_PRELOAD, False) is None:
      del sys.modules[_KERAS_PRELOAD]
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already set its devices up (an earlier run).
    pass
  return tf


def human_bytes(size: float) -> str:
  """1536 -> '1.5 KiB'."""
  for unit in ("B", "KiB", "MiB", "GiB"):
    if size < 1024 or unit == "GiB":
      return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
    size /= 1024
  return f"{size:.1f} TiB"


def info(message: str) -> None:
  """Prints a run message on process 0 (absl INFO is left to libraries)."""
  if is_main_process():
    tqdm.tqdm.write(message)


def warn(message: str) -> None:
  """Prints 'warning: <message>' to stderr on process 0."""
  if is_main_process():
    tqdm.tqdm.write(f"warning: {message}", file=sys.stderr)


class MetricWriter:
  """TensorBoard event files under `logdir` (process 0 only).

  tensorboardX writes the event files without the full TensorBoard package.
  """

  def __init__(self, logdir):
    self._writer = None
    if is_main_process():
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._writer = SummaryWriter(str(logdir))

  def write_scalars(self, step: int, scalars: dict) -> None:
    if self._writer is None:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), global_step=step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def progress_bar(total: int, unit: str, enabled: bool = True):
  """A tqdm bar on process 0 (a silent one elsewhere or when disabled)."""
  return tqdm.tqdm(
    total=total,
    unit=unit,
    dynamic_ncols=True,
    disable=not (enabled and is_main_process()),
    mininterval=1.0,
  )


class Progress:
  """A tqdm bar over training steps showing loss, images/s and ETA."""

  def __init__(
    self,
    total_steps: int,
    start_step: int,
    batch_size: int,
    enabled: bool = True,
  ):
    self.batch_size = batch_size
    self._bar = tqdm.tqdm(
      total=total_steps,
      initial=start_step,
      unit="step",
      dynamic_ncols=True,
      disable=not (enabled and is_main_process()),
      mininterval=1.0,
    )
    self._last_time = time.perf_counter()
    self._last_step = start_step

  def update(self, step: int, scalars: dict) -> float:
    """Moves the bar to `step`; returns the images/s since the last call."""
    now = time.perf_counter()
    steps = step - self._last_step
    images_per_sec = steps * self.batch_size / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    self._bar.update(steps)
    self._bar.set_postfix(
      loss=f"{scalars['loss']:.4f}",
      img_per_s=f"{images_per_sec:.0f}",
      refresh=False,
    )
    return images_per_sec

  def close(self) -> None:
    self._bar.close()
