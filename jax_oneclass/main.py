"""Command line: train and evaluate a method, evaluate a run, or predict.

  python -m jax_oneclass.main --config=configs/disaug.py:digits --workdir=/tmp/run
  python -m jax_oneclass.main --workdir=/tmp/run --mode=eval [--refit]
  python -m jax_oneclass.main --workdir=/tmp/run --mode=predict \
      --input='images/*.png' --output=/tmp/predictions

Several processes (one per host) join through --coordinator_address,
--num_processes and --process_id, or JAX's own cluster auto-detection.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/disaug.py:digits. Needed to "
    "train; eval and predict use the workdir's own config without it.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and results.json.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "predict"],
    "'train': train (resuming from the workdir) then evaluate; 'eval': "
    "evaluate the workdir's newest checkpoint; 'predict': score --input.")
_REFIT = flags.DEFINE_bool(
    "refit", False, "Fit the non-gradient stage and thresholds anew instead "
    "of using the ones saved with the checkpoint.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume training with a config that "
    "differs from the run's (recorded in config_history/).")
_RESULTS_PATH = flags.DEFINE_string(
    "results_path", None, "--mode=eval: folder for results.json, "
    "test_scores.csv and pictures (default: the workdir).")
_INPUT = flags.DEFINE_string(
    "input", None, "--mode=predict: an image file, a folder or a glob.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "--mode=predict: folder for scores, maps and pictures.")
_VISUALIZE = flags.DEFINE_bool(
    "visualize", True, "--mode=predict: write a picture per image.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process' index.")
_DEBUG = flags.DEFINE_bool("debug", False,
                           "Show tracebacks for jax_oneclass errors.")
_VERBOSE = flags.DEFINE_bool("verbose", False,
                             "Show INFO logs of JAX, Orbax and TF.")
flags.mark_flags_as_required(["workdir"])


def format_results(results: dict) -> str:
  """A small table of AUROC and F1 at the held-out threshold per scorer."""
  if not results:
    return "Training halted early (config.halt_after_step); rerun to go on."
  width = max(len(k) for k in [*results["auroc"], "pixel_baseline"]) + 2
  calibration = results["calibration"]
  lines = [f"{results['method']} on {results['data']}, normal class "
           f"{results['normal_class']} ({results['class_name']}), step "
           f"{results['step']}: {results['num_test']} test images, "
           f"{results['num_anomalous']} anomalous. Thresholds at FPR "
           f"{calibration['fpr']:g} on {calibration['num_images']} "
           f"{calibration['split']} images; * = config.eval.scorer.",
           f"{'scorer'.ljust(width)}  AUROC   F1@thr"]
  for name, auroc in results["auroc"].items():
    mark = "* " if name == results["scorer"] else "  "
    f1 = results["thresholds"][name]["at_threshold"]["f1"]
    lines.append(f"{(mark + name).ljust(width)}  {auroc:.4f}  {f1:.4f}")
  if "pixel_baseline" in results:  # Nothing learned: raw pixels.
    lines.append(f"{'  pixel_baseline'.ljust(width)}  "
                 f"{results['pixel_baseline']['auroc']:.4f}       -  "
                 "(distance to the mean normal image)")
  return "\n".join(lines)


def _flag_error_message(error: Exception, argv) -> str:
  """One clear line for a config that cannot be loaded or overridden."""
  from jax_oneclass.errors import OneClassError  # pylint: disable=g-import-not-at-top
  top = str(error)
  cause, ours = error, None
  while cause.__cause__ is not None or cause.__context__ is not None:
    cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OneClassError):
      ours = cause  # The deepest is the original, not a re-raised copy.
  if ours is not None:
    return str(ours).strip()
  if isinstance(cause, (AttributeError, KeyError)):
    key = str(cause).strip("'\" ")
    overrides = [a for a in argv if a.startswith("--config.")]
    return (f"unknown config key {key!r} (in {', '.join(overrides)}). "
            "The keys are those of the config file's get_config(); "
            "config.json in a run's workdir lists them all.")
  if top.startswith("flag --config."):  # A value of the wrong type.
    flag, _, why = top.partition(": ")
    key, _, value = flag[len("flag --config."):].partition("=")
    return (f"config key {key!r} cannot take the value {value!r} ({why}); "
            f"pass a value of the type config.json shows for {key}.")
  text = str(cause)
  if "No such file" in text or isinstance(cause, FileNotFoundError):
    return (f"{text.strip()}. Pass an existing config file, e.g. "
            "--config=configs/disaug.py:digits.")
  return text.strip()


def _config_file_arg(argv):
  """The file part of --config=<file>[:arg], or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config="):].split(":")[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
  return None


def parse_flags(argv):
  """absl flag parsing that reports bad configs without a traceback."""
  from jax_oneclass.errors import OneClassError  # pylint: disable=g-import-not-at-top
  path = _config_file_arg(argv)
  if path is not None and not os.path.isfile(path) and "--debug" not in argv:
    print(f"error: no config file {path!r} (from --config); pass an "
          "existing one, e.g. --config=configs/disaug.py:digits.",
          file=sys.stderr)
    sys.exit(2)
  try:
    parsed = flags.FLAGS(argv)
    _ = flags.FLAGS["config"].value  # ml_collections loads it lazily.
    return parsed
  except (flags.Error, OneClassError, AttributeError, KeyError, OSError,
          ValueError, TypeError) as e:
    if "--debug" in argv:
      raise
    print(f"error: {_flag_error_message(e, argv)}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  from jax_oneclass import logging_utils  # pylint: disable=g-import-not-at-top
  if not _VERBOSE.value:
    logging.set_verbosity(logging.WARNING)
    logging_utils.quiet_libraries()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # tf.data only; JAX owns GPUs.

  from jax_oneclass import checkpointing, detector, evaluate, parallel, train  # pylint: disable=g-import-not-at-top
  from jax_oneclass import run as run_lib  # pylint: disable=g-import-not-at-top
  from jax_oneclass.errors import ConfigError, OneClassError  # pylint: disable=g-import-not-at-top
  output = None
  try:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                    _PROCESS_ID.value)
    config = _CONFIG.value
    if config is None and _MODE.value == "train":
      raise ConfigError("Training needs --config, e.g. "
                        "--config=configs/disaug.py:digits.")
    if config is None and _MODE.value == "eval":
      config = run_lib.saved_config(_WORKDIR.value)
      if config is None:
        raise ConfigError(
            f"No config.json in {_WORKDIR.value}: point --workdir at a "
            "trained run, or pass --config.")
    if _MODE.value == "train":
      results = train.train_and_evaluate(
          config, _WORKDIR.value,
          allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    elif _MODE.value == "eval":
      output = _RESULTS_PATH.value
      if output is None and not logging_utils.writable(_WORKDIR.value):
        output = False  # Print the results; say where they could go.
      results = evaluate.evaluate(config, _WORKDIR.value,
                                  refit=_REFIT.value, output_dir=output)
    else:
      detector.predict_folder(_WORKDIR.value, _INPUT.value, _OUTPUT.value,
                              config=config, refit=_REFIT.value,
                              visualize_images=_VISUALIZE.value)
      return
  except OneClassError as e:
    if _DEBUG.value:
      raise
    logging.flush()
    print(f"\nerror: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:  # Outside the training loop (it saves itself).
    if _DEBUG.value:
      raise
    print("\nerror: Interrupted (Ctrl-C) outside training, e.g. while "
          "reading data or evaluating; every finished checkpoint is kept. "
          "Run the same command again to continue.", file=sys.stderr)
    sys.exit(2)
  except OSError as e:
    if _DEBUG.value or not checkpointing.is_disk_full(e):
      raise
    print(f"\nerror: Disk full writing {e.filename or 'run output'} "
          f"({e.strerror}). Free some space, then run the same command "
          "again: training resumes from its newest checkpoint.",
          file=sys.stderr)
    sys.exit(2)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(format_results(results))
    if results and _MODE.value == "eval" and output is False:
      print(f"\nerror: {_WORKDIR.value} is read-only, so the results were "
            "not written; pass --results_path=<a writable folder> to keep "
            "them.", file=sys.stderr)
      sys.exit(2)
    if results:
      folder = _RESULTS_PATH.value or _WORKDIR.value
      print(f"Results: {os.path.join(folder, 'results.json')}")


def run(extra_args=()):
  """Runs the CLI on sys.argv with `extra_args` put before the user's."""
  sys.argv[1:1] = list(extra_args)
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
