"""Command line: train and evaluate a method, evaluate a run, or predict.

  python -m jax_oneclass.main --config=configs/disaug.py:digits --workdir=/tmp/run
  python -m jax_oneclass.main --workdir=/tmp/run --mode=eval [--refit]
  python -m jax_oneclass.main --workdir=/tmp/run --mode=predict \
      --input='images/*.png' --output=/tmp/predictions
  python -m jax_oneclass.main --workdir=/tmp/run --mode=export \
      --format=onnx --output=/tmp/export

Flags, the config and paths are checked (`cli_checks`) before JAX and
TensorFlow are imported: bad input fails at once, as one 'error:' line and
exit code 2. Libraries' logs are off unless --verbose.

Several processes (one per host) join through --coordinator_address,
--num_processes and --process_id, or JAX's own cluster auto-detection.
"""

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from jax_oneclass import cli_checks, interrupts, logging_utils
from jax_oneclass.errors import ConfigError, OneClassError

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, e.g. configs/disaug.py:digits. Needed to "
  "train; eval and predict use the workdir's own config without it.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory for checkpoints, logs and results.json."
)
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "eval", "predict", "export"],
  "'train': train (resuming from the workdir) then evaluate; 'eval': "
  "evaluate the workdir's newest checkpoint; 'predict': score --input; "
  "'export': write the detector in --format to --output.",
)
_REFIT = flags.DEFINE_bool(
  "refit",
  False,
  "Fit the non-gradient stage and thresholds anew instead "
  "of using the ones saved with the checkpoint.",
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
  "allow_config_change",
  False,
  "Resume training with a config that "
  "differs from the run's (recorded in config_history/).",
)
_RESULTS_PATH = flags.DEFINE_string(
  "results_path",
  None,
  "--mode=eval: folder for results.json, "
  "test_scores.csv and pictures (default: the workdir).",
)
_INPUT = flags.DEFINE_string(
  "input", None, "--mode=predict: an image file, a folder or a glob."
)
_OUTPUT = flags.DEFINE_string(
  "output",
  None,
  "--mode=predict: folder for scores, maps and pictures; "
  "--mode=export: folder for the exported detector.",
)
_FORMAT = flags.DEFINE_enum(
  "format",
  "jax",
  list(cli_checks.EXPORT_FORMATS),
  "--mode=export: the format (see jax_oneclass/exporting.py).",
)
_VISUALIZE = flags.DEFINE_bool(
  "visualize", True, "--mode=predict: write a picture per image."
)
_EXPLAIN = flags.DEFINE_string(
  "explain",
  "",
  "--mode=predict: explanations to write to <output>/explanations/, "
  "comma-separated: integrated_gradients, gradcam.",
)
_EXPLAIN_SCORER = flags.DEFINE_string(
  "explain_scorer",
  "",
  "--explain: the scorer explained (default: eval.scorer).",
)
_EXPLAIN_BASELINE = flags.DEFINE_enum(
  "explain_baseline",
  "mean",
  list(cli_checks.IG_BASELINES),
  "--explain=integrated_gradients: the baseline image, the mean normal "
  "training image or black.",
)
_EXPLAIN_STEPS = flags.DEFINE_integer(
  "explain_steps", 64, "--explain=integrated_gradients: points on the path."
)
_GRADCAM_LAYER = flags.DEFINE_string(
  "gradcam_layer",
  "",
  "--explain=gradcam: module path of the layer (default: the method's, "
  "see docs/explanations.md).",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0, multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Number of processes."
)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process' index.")
_DEBUG = flags.DEFINE_bool(
  "debug", False, "Show tracebacks for jax_oneclass errors."
)
_VERBOSE = flags.DEFINE_bool(
  "verbose",
  False,
  "Show the logs of JAX, Orbax, TensorFlow and "
  "onnxruntime (also with --debug).",
)
flags.mark_flags_as_required(["workdir"])


def format_results(results: dict) -> str:
  """A small table of AUROC and F1 at the held-out threshold per scorer."""
  if not results:
    return "Training halted early (config.halt_after_step); rerun to go on."
  width = max(len(k) for k in [*results["auroc"], "pixel_baseline"]) + 2
  calibration = results["calibration"]
  lines = [
    f"{results['method']} on {results['data']}, normal class "
    f"{results['normal_class']} ({results['class_name']}), step "
    f"{results['step']}: {results['num_test']} test images, "
    f"{results['num_anomalous']} anomalous. Thresholds at FPR "
    f"{calibration['fpr']:g} on {calibration['num_images']} "
    f"{calibration['split']} images (the smallest FPR they resolve: "
    f"1/{calibration['num_images']} = "
    f"{1 / max(calibration['num_images'], 1):.3g}); "
    "* = config.eval.scorer.",
    f"{'scorer'.ljust(width)}  AUROC   F1@thr",
  ]
  for name, auroc in results["auroc"].items():
    mark = "* " if name == results["scorer"] else "  "
    f1 = results["thresholds"][name]["at_threshold"]["f1"]
    lines.append(f"{(mark + name).ljust(width)}  {auroc:.4f}  {f1:.4f}")
  if "pixel_baseline" in results:  # Nothing learned: raw pixels.
    lines.append(
      f"{'  pixel_baseline'.ljust(width)}  "
      f"{results['pixel_baseline']['auroc']:.4f}       -  "
      "(distance to the mean normal image)"
    )
  note = below_chance_note(results)
  return "\n".join(lines + ([note] if note else []))


def below_chance_note(results: dict) -> str | None:
  """What a headline AUROC below 0.5 means, or None."""
  auroc = results["auroc"][results["scorer"]]
  if not auroc < 0.5:
    return None
  return (
    f"note: AUROC {auroc:.4f} < 0.5: the {results['scorer']} scores "
    "rank normal images above anomalous ones. The model has probably "
    f"not trained enough ({results['step']} steps): train longer, e.g. "
    "a larger --config.num_train_steps, or --config.num_train_steps=-1 "
    "for the paper's num_epochs schedule."
  )


def _flag_error_message(error: Exception, argv) -> str:
  """One clear line for a config that cannot be loaded or overridden."""
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
    return (
      f"unknown config key {key!r} (in {', '.join(overrides)}). "
      "The keys are those of the config file's get_config(); "
      "config.json in a run's workdir lists them all."
    )
  if top.startswith("flag --config."):  # A value of the wrong type.
    flag, _, why = top.partition(": ")
    key, _, value = flag[len("flag --config.") :].partition("=")
    return (
      f"config key {key!r} cannot take the value {value!r} ({why}); "
      f"pass a value of the type config.json shows for {key}."
    )
  text = str(cause)
  if "No such file" in text or isinstance(cause, FileNotFoundError):
    return (
      f"{text.strip()}. Pass an existing config file, e.g. "
      "--config=configs/disaug.py:digits."
    )
  return text.strip()


def _config_file_arg(argv):
  """The file part of --config=<file>[:arg], or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config=") :].split(":")[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
  return None


def _causes(error: Exception) -> list[Exception]:
  """`error` and those it was raised from or while handling, innermost
  last."""
  chain = [error]
  while (chain[-1].__cause__ or chain[-1].__context__) not in (None, *chain):
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  return chain


def _config_file_error(error: Exception, path) -> str | None:
  """'file:line: what' for an error raised by the config file's own code
  (a syntax error, an exception in get_config), or None (also for ours,
  whose message says more)."""
  path_key = os.path.abspath(path)
  for cause in reversed(_causes(error)):
    if isinstance(cause, OneClassError):
      return None
    if (
      isinstance(cause, SyntaxError)
      and cause.filename
      and (os.path.abspath(cause.filename) == path_key)
    ):
      return (
        f"{path}:{cause.lineno}: {type(cause).__name__}: "
        f"{cause.msg} (in the config file)."
      )
    frames = [
      f
      for f in traceback.extract_tb(cause.__traceback__)
      if os.path.abspath(f.filename) == path_key
    ]
    if frames:
      what = str(cause).strip() or "(no message)"
      return (
        f"{path}:{frames[-1].lineno}: {type(cause).__name__}: {what} "
        f"(in {frames[-1].name} of the config file)."
      )
  return None


_FLAG_ERRORS = (
  flags.Error,
  OneClassError,
  AttributeError,
  KeyError,
  OSError,
  ValueError,
  TypeError,
)


def parse_flags(argv):
  """absl flag parsing that reports bad configs without a traceback."""
  path = _config_file_arg(argv)
  if path is not None and not os.path.isfile(path) and "--debug" not in argv:
    print(
      f"error: no config file {path!r} (from --config); pass an "
      "existing one, e.g. --config=configs/disaug.py:digits.",
      file=sys.stderr,
    )
    sys.exit(2)
  flags.FLAGS.unparse_flags()  # A second run in one process starts afresh.
  try:
    parsed = flags.FLAGS(argv)
    _ = flags.FLAGS["config"].value  # ml_collections loads it lazily.
    return parsed
  except Exception as e:  # pylint: disable=broad-except
    if "--debug" in argv:
      raise
    message = _config_file_error(e, path) if path else None
    if message is None:
      if not isinstance(e, _FLAG_ERRORS):
        raise
      message = _flag_error_message(e, argv)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _fail(error: Exception, after_output: bool = True):
  """Ends the command with the error as one line, exit code 2 (after an
  empty line that ends any progress bar when `after_output`)."""
  if _DEBUG.value:
    raise error
  logging.flush()
  print(f"{chr(10) if after_output else ''}error: {error}", file=sys.stderr)
  sys.exit(2)


def checked_config():
  """The config the mode runs with (None: the run's own), once the flags,
  the config and the paths passed the checks that need neither JAX nor
  TensorFlow; a OneClassError otherwise."""
  mode, workdir, config = _MODE.value, _WORKDIR.value, _CONFIG.value
  if mode == "train":
    if config is None:
      raise ConfigError(
        "Training needs --config, e.g. --config=configs/disaug.py:digits."
      )
    cli_checks.check_train_args(config, f"the run in {workdir}")
    cli_checks.check_output_dir(workdir, "--workdir")
    return config
  cli_checks.check_workdir_is_run(workdir, needs_config=config is None)
  if mode == "eval":
    used = config or cli_checks.saved_config(workdir)
    if used is not None:  # Else evaluation says why config.json is bad.
      cli_checks.check_train_args(used, f"the run in {workdir}")
    if _RESULTS_PATH.value:
      cli_checks.check_output_dir(_RESULTS_PATH.value, "--results_path")
    return config
  used = config or cli_checks.saved_config(workdir)
  if used is not None:
    cli_checks.check_method_of(used, f"the run in {workdir}")
  if mode == "predict":
    cli_checks.check_input_path(_INPUT.value)
    cli_checks.explanations(_EXPLAIN.value, _EXPLAIN_STEPS.value)
  cli_checks.check_output_dir(_OUTPUT.value)
  return config


def main(argv):
  del argv
  try:
    config = checked_config()
  except OneClassError as e:
    _fail(e, after_output=False)
  # SIGTERM and Ctrl-C take effect within seconds from here on, even inside
  # a long C++ call (data loading, compilation).
  with interrupts.guarded():
    try:
      _run_mode(config)
      interrupts.raise_if_requested()
    except interrupts.Terminated as e:  # Outside the training loop.
      if _DEBUG.value:
        raise
      print(f"\nerror: {e}", file=sys.stderr)
      sys.exit(2)


def _run_mode(config):
  """Runs the mode on the checked config."""
  verbose = _VERBOSE.value or _DEBUG.value
  if not verbose:
    logging_utils.quiet_libraries()
  logging_utils.import_tensorflow(quiet=not verbose)

  # pylint: disable=g-import-not-at-top
  from jax_oneclass import checkpointing, detector, evaluate, parallel, train
  from jax_oneclass import run as run_lib

  # pylint: enable=g-import-not-at-top
  output = None
  try:
    parallel.initialize_distributed(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
    if config is None and _MODE.value == "eval":
      config = run_lib.saved_config(_WORKDIR.value)
      if config is None:
        raise ConfigError(
          f"No config.json in {_WORKDIR.value}: point --workdir at a "
          "trained run, or pass --config."
        )
    if _MODE.value == "train":
      results = train.train_and_evaluate(
        config, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value
      )
    elif _MODE.value == "eval":
      output = _RESULTS_PATH.value
      if output is None and not logging_utils.writable(_WORKDIR.value):
        output = False  # Print the results; say where they could go.
      results = evaluate.evaluate(
        config, _WORKDIR.value, refit=_REFIT.value, output_dir=output
      )
    elif _MODE.value == "predict":
      detector.predict_folder(
        _WORKDIR.value,
        _INPUT.value,
        _OUTPUT.value,
        config=config,
        refit=_REFIT.value,
        visualize_images=_VISUALIZE.value,
        explain=cli_checks.explanations(_EXPLAIN.value),
        explain_options=_explain_options(),
      )
      return
    else:
      from jax_oneclass import exporting  # pylint: disable=g-import-not-at-top

      path = exporting.export(
        detector.Detector.load(
          _WORKDIR.value, config=config, refit=_REFIT.value
        ),
        _FORMAT.value,
        _OUTPUT.value,
      )
      print(f"Exported {_FORMAT.value} to {path}.")
      return
  except OneClassError as e:
    _fail(e)
  except KeyboardInterrupt:  # Outside the training loop (it saves itself).
    if _DEBUG.value:
      raise
    print(
      "\nerror: Interrupted (Ctrl-C) outside training, e.g. while "
      "reading data or evaluating; every finished checkpoint is kept. "
      "Run the same command again to continue.",
      file=sys.stderr,
    )
    sys.exit(2)
  except OSError as e:
    if _DEBUG.value or not checkpointing.is_disk_full(e):
      raise
    print(
      f"\nerror: Disk full writing {e.filename or 'run output'} "
      f"({e.strerror}). Free some space, then run the same command "
      "again: training resumes from its newest checkpoint.",
      file=sys.stderr,
    )
    sys.exit(2)
  from jax_oneclass import parallel  # pylint: disable=g-import-not-at-top

  if parallel.process_index() == 0:
    print(format_results(results))
    if results and _MODE.value == "eval" and output is False:
      print(
        f"\nerror: {_WORKDIR.value} is read-only, so the results were "
        "not written; pass --results_path=<a writable folder> to keep "
        "them.",
        file=sys.stderr,
      )
      sys.exit(2)
    if results:
      folder = _RESULTS_PATH.value or _WORKDIR.value
      print(f"Results: {os.path.join(folder, 'results.json')}")


def _explain_options() -> dict:
  """`Detector.explain`'s options from the --explain_* flags."""
  options = {
    "baseline": _EXPLAIN_BASELINE.value,
    "steps": _EXPLAIN_STEPS.value,
  }
  if _EXPLAIN_SCORER.value:
    options["scorer"] = _EXPLAIN_SCORER.value
  if _GRADCAM_LAYER.value:
    options["layer"] = _GRADCAM_LAYER.value
  return options


def run(extra_args=()):
  """Runs the CLI on sys.argv with `extra_args` put before the user's."""
  sys.argv[1:1] = list(extra_args)
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
