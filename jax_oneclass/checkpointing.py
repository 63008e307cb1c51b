"""Orbax checkpoints of the train state, with clear errors on bad ones.

Each checkpoint holds two items: 'state' (the method's state pytree) and
'meta' (JSON: step, examples seen, seed, method and data set), enough to
continue a run exactly, because the input pipeline and the step's random
keys are functions of (seed, step).
"""

from pathlib import Path

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
    where the restored arrays go; None restores the arrays as saved, in
    nested dicts (to read parts of another run's state).
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
