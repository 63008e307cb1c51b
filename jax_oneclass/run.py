"""What training, evaluation and prediction share: one run's setup.

`setup(config, workdir)` resolves the config against the data set, builds
the method (reading any pretrained weights once), the device mesh and the
checkpointer; `restore_or_init` gives the state to continue from. Training
hands the same `Run` and state on to evaluation.
"""

import dataclasses
from pathlib import Path

import jax
import ml_collections

from jax_oneclass import checkpointing, data, logging_utils, methods, optim
from jax_oneclass import parallel
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


def resolve_duration(config, info) -> ml_collections.ConfigDict:
  """Returns a copy of `config` whose num_train_steps is set (> 0)."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.num_train_steps <= 0:
    if config.num_epochs <= 0:
      raise ConfigError("Set config.num_train_steps or config.num_epochs > 0.")
    config.num_train_steps = int(
        config.num_epochs * optim.steps_per_epoch(config, info))
  return config


def setup(config, workdir) -> Run:
  """The run of `config` in `workdir`."""
  parallel.check_batch_size(config.batch_size)
  parallel.check_batch_size(config.eval.batch_size, "eval.batch_size")
  info = data.dataset_info(config)
  config = resolve_duration(config, info)
  workdir = Path(workdir)
  return Run(config=config, workdir=workdir, info=info,
             method=methods.get_method(config, info),
             mesh=parallel.make_mesh(),
             checkpointer=checkpointing.Checkpointer(
                 workdir / "checkpoints", config.keep_checkpoints))


def initial_state(method, image_shape, mesh, seed: int):
  """`method`'s initial state, created directly replicated over `mesh`."""
  init = jax.jit(method.init_state, static_argnums=1,
                 out_shardings=parallel.replicated(mesh))
  return init(jax.random.key(seed), tuple(image_shape))


def run_initial_state(run: Run):
  """The run's initial state (its seed, data shape and mesh)."""
  return initial_state(run.method, run.info.image_shape, run.mesh,
                       run.config.seed)


def restore(run: Run, step: int):
  """(state, meta) of the checkpoint at `step`, checked against the config."""
  state, meta = run.checkpointer.restore(step, run_initial_state(run))
  if meta.get("method") != run.config.method:
    raise ConfigError(
        f"The workdir holds a {meta.get('method')!r} run but the config asks "
        f"for {run.config.method!r}; use another --workdir.")
  return state, meta


def restore_or_init(run: Run):
  """The newest checkpoint's state and step, or a fresh state at step 0."""
  step = run.checkpointer.latest_step()
  if step is None:
    return run_initial_state(run), 0
  state, meta = restore(run, step)
  logging_utils.info(f"Resumed from the checkpoint at step {step}.")
  return state, int(meta["step"])


def restore_latest(run: Run):
  """(state, step) of the newest checkpoint; CheckpointError if none."""
  step = run.checkpointer.latest_step()
  if step is None:
    raise CheckpointError(
        f"No checkpoint in {run.workdir / 'checkpoints'}: train first "
        "(--mode=train) or point --workdir at a trained run.")
  state, _ = restore(run, step)
  return state, step


def checkpoint_meta(config, step: int) -> dict:
  """What each checkpoint records beside the state."""
  return {"step": step, "examples_seen": step * config.batch_size,
          "seed": config.seed, "method": config.method,
          "data": config.data.name, "normal_class": config.data.normal_class}
