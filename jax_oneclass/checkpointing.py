"""Orbax checkpoints of the train state, with clear errors on bad ones.

Each checkpoint holds two items: 'state' (the method's state pytree) and
'meta' (JSON: step, examples seen, seed, method and data set), enough to
continue a run exactly, because the input pipeline and the step's random
keys are functions of (seed, step).
"""

from collections.abc import Sequence
from pathlib import Path

from flax import traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp

from jax_oneclass.errors import CheckpointError


class Checkpointer:
  """Periodic saves, keep-last-N, restore of the latest good step."""

  def __init__(self, directory, max_to_keep: int = 3):
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True),
        item_names=("state", "meta"))

  def latest_step(self):
    """The newest complete checkpoint's step, or None."""
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    """Saves asynchronously; `wait` blocks until written."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, step: int, target):
    """Restores (state, meta) at `step` into the structure of `target`.

    `target` is a state pytree (or its `jax.eval_shape`) whose shardings say
    where the restored arrays go; None restores all arrays as saved, in
    nested dicts (`restore_parts` reads only some subtrees).
    """
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for unreadable files.
      path = self.directory / str(step)
      others = [s for s in self.all_steps() if s != step]
      raise CheckpointError(
          f"The checkpoint at {path} cannot be restored ({type(e).__name__}: "
          f"{str(e)[:300]}). It is corrupt, incomplete, or was written by a "
          "different method or model config. Nothing was changed on disk. "
          "Move that folder aside to resume from an earlier step"
          + (f" (also present: {others})" if others else "")
          + ", or pass a fresh --workdir to start over.") from e
    return restored["state"], dict(restored["meta"])

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_parts(directory, step: int, parts: Sequence[tuple[str, ...]]):
  """Reads only some subtrees of a checkpoint's state, as NumPy arrays.

  `parts` are key paths into the saved state, e.g. ('params', 'backbone');
  the rest (optimiser state, heads) is not read. Returns (nested dict holding
  just those subtrees, meta). Raises CheckpointError when a path is not in
  the checkpoint or the files cannot be read.
  """
  path = Path(directory).absolute() / str(step)
  manager = ocp.CheckpointManager(
      Path(directory).absolute(),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})
  try:
    saved = manager.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)
    target = traverse_util.unflatten_dict({
        keys: jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype),
            _subtree(saved, keys, path))
        for keys in parts})
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=target, partial_restore=True,
            restore_args=jax.tree.map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)),
        meta=ocp.args.JsonRestore()))
  except CheckpointError:
    raise
  except Exception as e:  # Orbax raises many types for unreadable files.
    raise CheckpointError(
        f"The checkpoint at {path} cannot be read ({type(e).__name__}: "
        f"{str(e)[:300]}). It is corrupt or incomplete.") from e
  finally:
    manager.close()
  return restored["state"], dict(restored["meta"])


def _subtree(tree, keys: tuple[str, ...], path: Path):
  for i, key in enumerate(keys):
    if not isinstance(tree, dict) or key not in tree:
      raise CheckpointError(
          f"The checkpoint at {path} has no {'/'.join(keys[:i + 1])}; "
          "it was written by another method or model.")
    tree = tree[key]
  return tree


class FittedStore:
  """The fitted non-gradient stage of each checkpoint, under <workdir>/fitted.

  Step N holds what was fitted on checkpoint N's state: 'fitted' (the
  method's arrays: classifiers, memory banks), 'calibration' (JSON:
  per-scorer thresholds and normalisation statistics) and 'meta' (JSON).
  """

  def __init__(self, directory, max_to_keep: int = 3):
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=False),
        item_names=("fitted", "calibration", "meta"),
        item_handlers={"fitted": ocp.PyTreeCheckpointHandler(),
                       "calibration": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def has(self, step: int) -> bool:
    return step in self.manager.all_steps()

  def save(self, step: int, fitted, calibration: dict, meta: dict) -> None:
    """Writes the stage of checkpoint `step` (replacing an older one)."""
    if self.has(step):
      self.manager.delete(step)
    # A format number beside the arrays keeps the item non-empty for
    # methods without a fitted stage.
    item = {"stage": fitted, "format": np.asarray(1, np.int32)}
    self.manager.save(step, args=ocp.args.Composite(
        fitted=ocp.args.PyTreeSave(item),
        calibration=ocp.args.JsonSave(calibration),
        meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int):
    """(fitted as NumPy arrays, calibration, meta) of checkpoint `step`."""
    path = self.directory / str(step)
    try:
      saved = self.manager.item_metadata(step)["fitted"]
      saved = getattr(saved, "tree", saved)
      restored = self.manager.restore(step, args=ocp.args.Composite(
          fitted=ocp.args.PyTreeRestore(
              restore_args=jax.tree.map(
                  lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)),
          calibration=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for unreadable files.
      raise CheckpointError(
          f"The fitted stage at {path} cannot be read ({type(e).__name__}: "
          f"{str(e)[:300]}). Run again with --refit to fit it anew.") from e
    return (restored["fitted"].get("stage", {}),
            dict(restored["calibration"]), dict(restored["meta"]))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
