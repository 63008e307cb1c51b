"""Command line: train and evaluate a method, or evaluate a finished run.

  python -m jax_oneclass.main --config=configs/disaug.py:digits --workdir=/tmp/run
  python -m jax_oneclass.main --config=configs/disaug.py --workdir=/tmp/run \
      --config.data.normal_class=3 --mode=eval

Several processes (one per host) join through --coordinator_address,
--num_processes and --process_id, or JAX's own cluster auto-detection.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/disaug.py:digits.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and results.json.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval"],
    "'train': train (resuming from the workdir) then evaluate; 'eval': "
    "evaluate the workdir's newest checkpoint.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process' index.")
_DEBUG = flags.DEFINE_bool("debug", False,
                           "Show tracebacks for jax_oneclass errors.")
_VERBOSE = flags.DEFINE_bool("verbose", False,
                             "Show INFO logs of JAX, Orbax and TF.")
flags.mark_flags_as_required(["config", "workdir"])


def format_results(results: dict) -> str:
  """A small table of AUROC per scorer."""
  if not results:
    return "Training halted early (config.halt_after_step); rerun to go on."
  width = max(len(k) for k in results["auroc"])
  lines = [f"{results['method']} on {results['data']}, normal class "
           f"{results['normal_class']} ({results['class_name']}), step "
           f"{results['step']}: {results['num_test']} test images, "
           f"{results['num_anomalous']} anomalous.",
           f"{'scorer'.ljust(width)}  AUROC"]
  lines += [f"{k.ljust(width)}  {v:.4f}" for k, v in results["auroc"].items()]
  return "\n".join(lines)


def _flag_error_message(error: Exception, argv) -> str:
  """One clear line for a config that cannot be loaded or overridden."""
  cause = error
  while cause.__cause__ is not None or cause.__context__ is not None:
    cause = cause.__cause__ or cause.__context__
  if isinstance(cause, (AttributeError, KeyError)):
    key = str(cause).strip("'\" ")
    overrides = [a for a in argv if a.startswith("--config.")]
    return (f"unknown config key {key!r} (in {', '.join(overrides)}). "
            "The keys are those of the config file's get_config(); "
            "config.json in a run's workdir lists them all.")
  text = str(cause)
  if "No such file" in text or isinstance(cause, FileNotFoundError):
    return (f"{text.strip()}. Pass an existing config file, e.g. "
            "--config=configs/disaug.py:digits.")
  return text.strip()


def parse_flags(argv):
  """absl flag parsing that reports bad configs without a traceback."""
  from jax_oneclass.errors import OneClassError  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except (flags.Error, OneClassError, AttributeError, KeyError, OSError) as e:
    if "--debug" in argv:
      raise
    print(f"error: {_flag_error_message(e, argv)}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  if not _VERBOSE.value:
    logging.set_verbosity(logging.WARNING)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # tf.data only; JAX owns GPUs.

  from jax_oneclass import evaluate, parallel, train  # pylint: disable=g-import-not-at-top
  from jax_oneclass.errors import OneClassError  # pylint: disable=g-import-not-at-top
  try:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                    _PROCESS_ID.value)
    if _MODE.value == "train":
      results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    else:
      results = evaluate.evaluate(_CONFIG.value, _WORKDIR.value)
  except OneClassError as e:
    if _DEBUG.value:
      raise
    logging.flush()
    print(f"\nerror: {e}", file=sys.stderr)
    sys.exit(2)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(format_results(results))
    if results:
      print(f"Results: {os.path.join(_WORKDIR.value, 'results.json')}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
