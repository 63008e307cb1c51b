"""What training, evaluation and prediction share: one run's setup.

`setup(config, workdir)` resolves the config against the data set, builds
the method (reading any pretrained weights once), the device mesh and the
checkpointer; `restore_or_init` gives the state to continue from. Training
hands the same `Run` and state on to evaluation.
"""

import dataclasses
import json
import math
import os
from pathlib import Path

import jax
import ml_collections

from jax_oneclass import checkpointing, cli_checks, data, logging_utils
from jax_oneclass import methods, optim
from jax_oneclass import parallel, plugins
from jax_oneclass.components import pretrained
from jax_oneclass.errors import CheckpointError, ConfigError
from jax_oneclass.methods import interface


@dataclasses.dataclass
class Run:
  """One run: its resolved config, data set, method, mesh and checkpoints."""

  config: ml_collections.ConfigDict
  workdir: Path
  info: data.DatasetInfo
  method: interface.Method
  mesh: jax.sharding.Mesh
  checkpointer: checkpointing.Checkpointer
  # Jitted functions of this run's method and mesh, built once (each new
  # jax.jit wrapper would trace the networks again).
  jitted: dict = dataclasses.field(default_factory=dict, repr=False)


def resolve_duration(config, info) -> ml_collections.ConfigDict:
  """Returns a copy of `config` whose num_train_steps is set (> 0): -1
  means config.num_epochs epochs; 0 is refused (`check_duration`)."""
  cli_checks.check_duration(config)
  config = ml_collections.ConfigDict(config.to_dict())
  if config.num_train_steps < 0:
    config.num_train_steps = int(
      config.num_epochs * optim.steps_per_epoch(config, info)
    )
  return config


# Keys that say which run a workdir holds: evaluating or resuming with
# other values would mix two runs.
_IDENTITY_KEYS = (
  "method",
  "data.name",
  "data.normal_class",
  "data.protocol",
  "data.category",
  "data.image_size",
  "data.channels",
  "data.holdout_fraction",
)
# Keys a resumed run may change freely (output, pacing, evaluation).
_FREE_KEYS = (
  "progress_bar",
  "log_every_steps",
  "checkpoint_every_steps",
  "checkpoint_every_secs",
  "keep_checkpoints",
  "halt_after_step",
  "data.data_dir",
  "data.folder",
  "conv_weight_grad",
  "transposed_conv",
)
# Keys added after runs were saved, with the value those runs implicitly
# had: a saved config without them is not a change.
_ADDED_KEYS = {
  "dtype": "float32",
  "conv_weight_grad": "xla",
  "transposed_conv": "subpixel",
  "plugins": [],
  "model.map_fusion": "sum",
}


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _tuples(value):
  """JSON lists back to the tuples configs use."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def saved_config(workdir):
  """The config a workdir's run last ran with (its config.json), or None."""
  path = Path(workdir) / "config.json"
  if not path.is_file():
    return None
  try:
    return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))
  except ValueError as e:
    raise ConfigError(
      f"{path} is not a readable config ({e}); pass --config explicitly."
    ) from e


def config_changes(old, new) -> dict:
  """{dotted key: (old value, new value)} where two configs differ."""
  old = _flat(json.loads(json.dumps(old.to_dict())))
  new = _flat(json.loads(json.dumps(new.to_dict())))
  old = {**{k: v for k, v in _ADDED_KEYS.items() if k in new}, **old}
  return {
    k: (old.get(k), new.get(k))
    for k in sorted(set(old) | set(new))
    if old.get(k) != new.get(k)
  }


def check_against_run(
  config, workdir, resuming: bool, allow_config_change: bool = False
) -> dict:
  """Refuses a config that does not belong to the run in `workdir`.

  Identity keys (method, data set, normal class, model, ...) must match the
  saved config. When `resuming` training, every other key but output and
  pacing ones must match too, unless `allow_config_change`. Returns the
  allowed changes.
  """
  saved = saved_config(workdir)
  if saved is None:
    return {}
  changes = config_changes(saved, config)
  show = lambda keys: "; ".join(
    f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in keys[:6]
  )
  identity = [
    k for k in changes if k in _IDENTITY_KEYS or k.startswith("model.")
  ]
  if identity:
    raise ConfigError(
      f"The config differs from the run in {workdir} ({show(identity)}). "
      "Use another --workdir for a new run, or leave --config out to "
      "evaluate the run with its own config."
    )
  training = [
    k for k in changes if k not in _FREE_KEYS and not k.startswith("eval.")
  ]
  if resuming and training and not allow_config_change:
    raise ConfigError(
      f"The config differs from the one the run in {workdir} was trained "
      f"with ({show(training)}). Resume with --allow_config_change to "
      "continue with it (the change is recorded in config_history/), or "
      "use another --workdir."
    )
  return {k: changes[k] for k in training}


def _info_path(workdir) -> Path:
  return Path(workdir) / "dataset_info.json"


def saved_info(workdir, config):
  """The DatasetInfo a run of `config` recorded, or None (runs before it was
  saved); runs saved before `epoch_size` was recorded get it from
  `config`."""
  path = _info_path(workdir)
  if not path.is_file():
    return None
  fields = json.loads(path.read_text())
  fields["image_shape"] = tuple(fields["image_shape"])
  fields["class_names"] = tuple(fields["class_names"])
  fields.setdefault(
    "epoch_size", data.examples_per_epoch(config, fields["num_train"])
  )
  return data.DatasetInfo(**fields)


def setup(
  config,
  workdir,
  info=None,
  mode: str = "train",
  allow_config_change: bool = False,
) -> Run:
  """The run of `config` in `workdir`, checked against the run already there.

  `info` skips reading the data set (a deployed detector); `mode` 'train'
  resumes a run (stricter checks, see `check_against_run`), anything else
  only reads it.
  """
  if mode == "train" and not logging_utils.writable(workdir):
    raise ConfigError(
      f"Cannot write to --workdir={workdir} (read-only or no permission), "
      "where checkpoints and logs go: pass a writable folder."
    )
  parallel.check_batch_size(config.batch_size)
  parallel.check_batch_size(config.eval.batch_size, "eval.batch_size")
  plugins.import_plugins(config, f"the run in {workdir}")
  methods.method_module(config.method, f"the run in {workdir}")
  info = info or data.dataset_info(config)
  if mode == "train":
    check_batch_sizes(config, info)
  config = resolve_duration(config, info)
  workdir = Path(workdir)
  checkpointer = checkpointing.Checkpointer(
    workdir / "checkpoints", config.keep_checkpoints
  )
  resuming = mode == "train" and checkpointer.latest_step() is not None
  changes = check_against_run(config, workdir, resuming, allow_config_change)
  if mode == "train":
    warn_small_training_set(config, info)
  if resuming and changes:
    logging_utils.info(
      "Resuming with a changed config: "
      + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
      + "."
    )
  return Run(
    config=config,
    workdir=workdir,
    info=info,
    method=methods.get_method(_method_config(config, checkpointer), info),
    mesh=parallel.make_mesh(),
    checkpointer=checkpointer,
  )


# A batch more than this many times the normal training set is refused.
MAX_BATCH_OVER_DATA = 100


def physical_memory() -> int:
  """This machine's memory in bytes."""
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _device_memory() -> int | None:
  """One device's memory in bytes, where the backend says (GPU, TPU)."""
  try:
    return int((jax.local_devices()[0].memory_stats() or {})["bytes_limit"])
  except (KeyError, TypeError, ValueError, RuntimeError):
    return None


def _memory_problem(batch_size: int, name: str, info) -> str | None:
  """Why one batch of float32 images cannot fit in memory, or None: the
  input pipeline holds it and a prefetched one per process, and each
  device its share (activations need several times more)."""
  image = 4 * math.prod(info.image_shape)
  shape = "x".join(map(str, info.image_shape))
  # (copies held, among how many, the memory, whose)
  limits = [(2, parallel.process_count(), physical_memory(), "this machine's")]
  device = _device_memory()
  if device is not None:
    limits.append((1, parallel.device_count(), device, "one device's"))
  for copies, among, have, whose in limits:
    need = copies * (batch_size // among) * image
    if need > have:
      devices = parallel.device_count()
      fits = have // (copies * image) * among // devices * devices
      return (
        f"{name}={batch_size} needs {logging_utils.human_bytes(need)} "
        f"for its {shape} float32 images alone, more than {whose} "
        f"{logging_utils.human_bytes(have)} of memory; set "
        f"--config.{name}={fits} or lower."
      )
  return None


def check_batch_sizes(config, info) -> None:
  """Refuses, before any data is read or compiled, a batch that cannot
  work: over MAX_BATCH_OVER_DATA times the normal training images, or one
  whose images alone exceed the memory."""
  if config.batch_size > MAX_BATCH_OVER_DATA * info.num_train:
    times = config.batch_size // max(info.num_train, 1)
    raise ConfigError(
      f"batch_size={config.batch_size} is more than {MAX_BATCH_OVER_DATA} "
      f"times the {info.num_train} normal training images (each batch "
      f"would hold every image about {times} times); set "
      f"--config.batch_size={info.num_train} or lower."
    )
  for batch_size, name in (
    (config.batch_size, "batch_size"),
    (config.eval.batch_size, "eval.batch_size"),
  ):
    problem = _memory_problem(batch_size, name, info)
    if problem:
      raise ConfigError(problem)


# Methods whose loss treats the other images of a batch as negatives.
_CONTRASTIVE = ("clr", "disaug")


def warn_small_training_set(config, info) -> None:
  """Warns when a batch is larger than the normal training set, so that
  each batch repeats images (contrastive methods then contrast duplicates
  as negatives)."""
  if config.batch_size <= info.num_train:
    return
  logging_utils.warn(
    f"batch_size {config.batch_size} is larger than the "
    f"{info.num_train} normal training images, so every batch repeats "
    f"about {config.batch_size - info.num_train} of them"
    + (
      " (and contrasts the copies as negatives)"
      if config.method in _CONTRASTIVE
      else ""
    )
    + f"; set --config.batch_size={info.num_train} or lower."
  )


def _method_config(config, checkpointer):
  """The config the method is built from: when a checkpoint will be
  restored, its frozen backbone comes from there, so no weights file is
  read (it may have moved since training)."""
  if checkpointer.latest_step() is None or not config.model.get("pretrained"):
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.pretrained = pretrained.FROM_CHECKPOINT
  return config


def save_run_files(run: "Run", start_step: int) -> None:
  """config.json, its copy under config_history/ and dataset_info.json."""
  payload = run.config.to_dict()
  logging_utils.write_json(run.workdir / "config.json", payload)
  logging_utils.write_json(
    run.workdir / "config_history" / f"step_{start_step:09d}.json", payload
  )
  logging_utils.write_json(
    _info_path(run.workdir), dataclasses.asdict(run.info)
  )


def initial_state(method, image_shape, mesh, seed: int):
  """`method`'s initial state, created directly replicated over `mesh`."""
  init = jax.jit(
    method.init_state, static_argnums=1, out_shardings=parallel.replicated(mesh)
  )
  return init(jax.random.key(seed), tuple(image_shape))


def run_initial_state(run: Run):
  """The run's initial state (its seed, data shape and mesh)."""
  return initial_state(
    run.method, run.info.image_shape, run.mesh, run.config.seed
  )


def abstract_state(run: Run):
  """Shapes, dtypes and shardings of the run's state, computing nothing:
  the target checkpoints are restored into."""
  sharding = parallel.replicated(run.mesh)
  image_shape = tuple(run.info.image_shape)
  shapes = jax.eval_shape(
    lambda key: run.method.init_state(key, image_shape),
    jax.random.key(run.config.seed),
  )
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes
  )


def restore(run: Run, step: int):
  """(state, meta) of the checkpoint at `step`, checked against the config."""
  state, meta = run.checkpointer.restore(step, abstract_state(run))
  if meta.get("method") != run.config.method:
    raise ConfigError(
      f"The workdir holds a {meta.get('method')!r} run but the config asks "
      f"for {run.config.method!r}; use another --workdir."
    )
  return state, meta


def _key_name(key) -> str:
  for field in ("name", "key", "idx"):
    if hasattr(key, field):
      return str(getattr(key, field))
  return str(key)


def _shape_mismatch(run: Run, step: int):
  """What differs between checkpoint `step`'s arrays and the state the
  config builds (e.g. another model width), or None if the shapes agree."""
  try:
    saved = run.checkpointer.saved_shapes(step)
  except Exception:  # pylint: disable=broad-except
    return None  # Unreadable metadata: corruption, not a config change.
  built = {
    "/".join(_key_name(k) for k in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state(run))[
      0
    ]
  }
  if sorted(saved.values()) == sorted(built.values()):
    return None
  common = [k for k in built if k in saved and saved[k] != built[k]]
  if common:
    return (
      f"{common[0]}: saved {saved[common[0]]}, the config builds "
      f"{built[common[0]]}"
    )
  return (
    f"the checkpoint holds {len(saved)} arrays, the config builds {len(built)}"
  )


def restore_newest_good(run: Run, move_bad: bool):
  """(state, meta, step) of the newest checkpoint that verifies and reads.

  Newer ones that fail their checksums or cannot be read are skipped with a
  warning naming them and, when `move_bad` (training, which would write
  those steps again), moved to corrupt_checkpoints/ beside checkpoints/;
  nothing is deleted. Returns None when there is no checkpoint; raises
  ConfigError when the newest one was written by another model config.
  """
  checkpointer = run.checkpointer
  steps = sorted(checkpointer.all_steps(), reverse=True)
  skipped = []
  for step in steps:
    path = checkpointer.directory / str(step)
    problem = checkpointer.verify(step)
    if problem is None:
      try:
        state, meta = restore(run, step)
        return state, meta, step
      except CheckpointError as e:
        mismatch = _shape_mismatch(run, step)
        if mismatch is not None:
          raise ConfigError(
            f"The config differs from the one the run in {run.workdir} "
            f"was trained with: its model does not fit the checkpoint "
            f"({mismatch}). Use the run's own config (leave --config out "
            "to evaluate it) or another --workdir for a new run."
          ) from e
        problem = f"cannot be read ({str(e.__cause__ or e)[:200]})"
    where = ""
    if move_bad:
      where = f"; moved to {checkpointer.move_aside(step)}"
    logging_utils.warn(f"Skipping the checkpoint {path}: it {problem}{where}.")
    skipped.append(step)
  if skipped:
    corrupt = checkpointer.directory.parent / checkpointing.CORRUPT_DIR
    raise CheckpointError(
      f"No checkpoint in {checkpointer.directory} passed verification "
      f"(steps {', '.join(map(str, skipped))}"
      + (
        f", moved to {corrupt}). Run the same command again to start "
        "training from step 0"
        if move_bad
        else "). Train again (--mode=train)"
      )
      + ", or restore the files from a backup."
    )
  return None


def restore_or_init(run: Run):
  """The newest good checkpoint's state and step, or a fresh state at 0."""
  found = restore_newest_good(run, move_bad=True)
  if found is None:
    return run_initial_state(run), 0
  state, meta, step = found
  logging_utils.info(f"Resumed from the checkpoint at step {step}.")
  return state, int(meta["step"])


def restore_latest(run: Run):
  """(state, step) of the newest good checkpoint; CheckpointError if none."""
  found = restore_newest_good(run, move_bad=False)
  if found is None:
    raise CheckpointError(
      f"No checkpoint in {run.workdir / 'checkpoints'}: train first "
      "(--mode=train) or point --workdir at a trained run."
    )
  state, _, step = found
  return state, step


def checkpoint_meta(config, step: int) -> dict:
  """What each checkpoint records beside the state."""
  return {
    "step": step,
    "examples_seen": step * config.batch_size,
    "seed": config.seed,
    "method": config.method,
    "data": config.data.name,
    "normal_class": config.data.normal_class,
  }
