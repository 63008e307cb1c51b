"""Orbax checkpoints of the train state, with clear errors on bad ones.

Each checkpoint holds two items: 'state' (the method's state pytree) and
'meta' (JSON: step, examples seen, seed, method and data set), enough to
continue a run exactly, because the input pipeline and the step's random
keys are functions of (seed, step). Beside them, checksums.json holds the
SHA-256 of every file once the save has finished, so that a flipped or
truncated file is found on restore instead of loading garbage.
"""

from collections.abc import Sequence
import errno
import hashlib
import json
import shutil
import time
from pathlib import Path

from flax import traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp

from jax_oneclass import logging_utils, parallel
from jax_oneclass.errors import CheckpointError

CHECKSUMS = "checksums.json"
# Where checkpoints that fail verification are moved, beside checkpoints/.
CORRUPT_DIR = "corrupt_checkpoints"


def file_digests(step_dir) -> dict:
  """{path relative to `step_dir`: SHA-256} of every file but checksums.json."""
  step_dir = Path(step_dir)
  digests = {}
  for path in sorted(step_dir.rglob("*")):
    if path.is_file() and not path.name.startswith(
      (CHECKSUMS, f".{CHECKSUMS}")
    ):
      digest = hashlib.sha256()
      with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # pylint: disable=cell-var-from-loop
          digest.update(block)
      digests[str(path.relative_to(step_dir))] = digest.hexdigest()
  return digests


def verify(step_dir):
  """Why the checkpoint in `step_dir` fails its checksums ('fails its
  checksums (changed: state/...)'), or None if it
  passes (or predates them: no checksums.json)."""
  step_dir = Path(step_dir)
  listed = step_dir / CHECKSUMS
  if not listed.is_file():
    return None
  try:
    expected = json.loads(listed.read_text())["sha256"]
  except (ValueError, KeyError, OSError) as e:
    return f"has an unreadable {CHECKSUMS} ({e})"
  found = file_digests(step_dir)
  missing = sorted(set(expected) - set(found))
  changed = sorted(
    k for k in expected if k in found and found[k] != expected[k]
  )
  if missing or changed:
    return (
      "fails its checksums ("
      + "; ".join(
        part
        for part in (
          f"missing: {', '.join(missing[:3])}" if missing else "",
          f"changed: {', '.join(changed[:3])}" if changed else "",
        )
        if part
      )
      + ")"
    )
  return None


def write_checksums(step_dir, **extra) -> None:
  """Writes `step_dir`/checksums.json (every file's SHA-256, and `extra`)
  atomically: a half-written list would fail a good step."""
  step_dir = Path(step_dir)
  payload = json.dumps({"sha256": file_digests(step_dir), **extra}, indent=1)
  partial = step_dir / f".{CHECKSUMS}.tmp"
  partial.write_text(payload)
  partial.replace(step_dir / CHECKSUMS)


def checksums_digest(step_dir):
  """SHA-256 of `step_dir`'s checksums.json, which pins every file of the
  checkpoint; None when it has none."""
  try:
    return hashlib.sha256((Path(step_dir) / CHECKSUMS).read_bytes()).hexdigest()
  except FileNotFoundError:
    return None


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (or what caused it) is 'no space left on device'."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (
      errno.ENOSPC,
      errno.EDQUOT,
    ):
      return True
    if "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _listing(directory: Path, pattern: str) -> list:
  """(path, size) of every file under the folders matching `pattern`."""
  found = []
  for folder in directory.glob(pattern):
    found.append((str(folder), 0))
    for path in folder.rglob("*"):
      try:
        found.append((str(path), path.stat().st_size))
      except FileNotFoundError:
        found.append((str(path), -1))
  return sorted(found)


def remove_when_settled(
  directory: Path, pattern: str, quiet_s: float = 0.3, timeout_s: float = 10.0
) -> list:
  """Removes the folders matching `pattern` once no writer changes them.

  A failed save raises on the first failed write while other writer threads
  (TensorStore's among them) may still be creating files; removing at once
  lets them recreate the folder. Waits until the listing stays the same for
  `quiet_s`, removes, and repeats until nothing reappears (or `timeout_s`).
  Returns the names removed.
  """
  removed = set()
  deadline = time.monotonic() + timeout_s
  while True:
    before = _listing(directory, pattern)
    time.sleep(quiet_s)
    after = _listing(directory, pattern)
    if not after:
      if not before or time.monotonic() > deadline:
        return sorted(removed)
      continue
    if before != after and time.monotonic() < deadline:
      continue
    for folder in directory.glob(pattern):
      shutil.rmtree(folder, ignore_errors=True)
      removed.add(folder.name)
    if time.monotonic() > deadline:
      return sorted(removed)


def _size(path: Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _alone_among_processes() -> bool:
  """Inside `parallel.host_local()` of a several-process job: Orbax then
  refuses this host's arrays, which are not global, so they travel as NumPy."""
  return parallel.is_host_local() and jax.process_count() > 1


def _host_placed(restored, target):
  """NumPy leaves of `restored` put where `target`'s leaves say."""
  return jax.tree.map(
    lambda x, t: (
      jax.device_put(x, t.sharding)
      if getattr(t, "sharding", None) is not None
      else x
    ),
    restored,
    target,
  )


def _manager_options(directory: Path, create: bool = True, **options):
  """Orbax's options, with how processes save: all together, or (inside
  `parallel.host_local()`) this process alone, as a one-host job."""
  # Orbax names its cross-host barriers by step; a sweep saves the same
  # step of several members at once, so each folder needs its own names or
  # their barriers meet and time out.
  prefix = hashlib.sha1(str(directory).encode()).hexdigest()[:12]
  hosts = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)
  if _alone_among_processes():
    me = jax.process_index()
    hosts = ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}, barrier_sync_key_prefix=prefix
    )
    if create:  # Orbax leaves it to the caller with active_processes.
      Path(directory).mkdir(parents=True, exist_ok=True)
      create = False
    # Async saves signal through keys of the job's key-value store that
    # name no process, so two hosts saving alone meet in them and time out.
    options.setdefault("enable_async_checkpointing", False)
  return ocp.CheckpointManagerOptions(
    create=create, multiprocessing_options=hosts, **options
  )


class Checkpointer:
  """Periodic saves, keep-last-N, checksums, restore of the latest good step."""

  def __init__(self, directory, max_to_keep: int = 3):
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=_manager_options(self.directory, max_to_keep=max_to_keep),
      item_names=("state", "meta"),
    )
    self._unsummed = []  # Saved steps whose checksums are not written yet.
    self._failed = False  # A save failed; Orbax would raise it again.

  def latest_step(self):
    """The newest complete checkpoint's step, or None."""
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    """Saves asynchronously; `wait` blocks until written and checksummed."""
    self.wait()
    if _alone_among_processes():
      state = jax.device_get(state)
    try:
      self.manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
        ),
      )
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(step, e)
    self._unsummed.append(step)

  def wait(self) -> None:
    """Blocks until the pending save is written, then writes its checksums."""
    if self._failed:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(self._unsummed[-1] if self._unsummed else None, e)
    for step in self._unsummed:
      step_dir = self.directory / str(step)
      if step_dir.is_dir() and parallel.process_index() == 0:
        try:
          write_checksums(step_dir)
        except OSError as e:
          self._raise_save_error(step, e)
    self._unsummed = []

  def _raise_save_error(self, step, error: Exception):
    """One clear CheckpointError; a disk-full save leaves no partial files."""
    self._failed = True
    if not is_disk_full(error):
      raise CheckpointError(
        f"Saving the checkpoint of step {step} in {self.directory} failed "
        f"({type(error).__name__}: {str(error)[:300]})."
      ) from error
    removed = []
    if step is not None and parallel.process_index() == 0:
      removed = remove_when_settled(
        self.directory, f"{step}.orbax-checkpoint-tmp*"
      )
      (self.directory / str(step) / CHECKSUMS).unlink(missing_ok=True)
    done = [s for s in self.all_steps() if s != step]
    need = _size(self.directory / str(max(done))) if done else 0
    free = shutil.disk_usage(self.directory).free
    raise CheckpointError(
      f"Disk full while saving the checkpoint of step {step} in "
      f"{self.directory}: {logging_utils.human_bytes(free)} free, a "
      f"checkpoint needs about {logging_utils.human_bytes(need)}. "
      + (f"Removed the partial {', '.join(removed)}. " if removed else "")
      + "Free some space, then run the same command again to continue"
      + (f" from step {max(done)}." if done else ".")
    ) from error

  def reload(self) -> None:
    """Re-reads the steps on disk (after one was moved aside)."""
    self.manager.reload()

  def verify(self, step: int):
    """Why checkpoint `step` fails verification, or None."""
    return verify(self.directory / str(step))

  def move_aside(self, step: int) -> Path:
    """Moves checkpoint `step` to ../corrupt_checkpoints/ (never deletes)."""
    target = (
      self.directory.parent
      / CORRUPT_DIR
      / (f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(self.directory / str(step)), str(target))
    self.reload()
    return target

  def saved_shapes(self, step: int) -> dict:
    """{key path: shape} of the arrays saved in checkpoint `step`."""
    saved = self.manager.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)
    flat = traverse_util.flatten_dict(_plain(saved), sep="/")
    return {k: tuple(getattr(v, "shape", ())) for k, v in flat.items()}

  def restore(self, step: int, target):
    """Restores (state, meta) at `step` into the structure of `target`.

    `target` is a state pytree (or its `jax.eval_shape`) whose shardings say
    where the restored arrays go; None restores all arrays as saved, in
    nested dicts (`restore_parts` reads only some subtrees).
    """
    placed = target
    if target is not None and _alone_among_processes():
      target = jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), target)
    try:
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
      )
      if placed is not target:
        restored["state"] = _host_placed(restored["state"], placed)
    except Exception as e:  # Orbax raises many types for unreadable files.
      path = self.directory / str(step)
      others = [s for s in self.all_steps() if s != step]
      raise CheckpointError(
        f"The checkpoint at {path} cannot be restored ({type(e).__name__}: "
        f"{str(e)[:300]}). It is corrupt, incomplete, or was written by a "
        "different method or model config. Nothing was changed on disk. "
        "Move that folder aside to resume from an earlier step"
        + (f" (also present: {others})" if others else "")
        + ", or pass a fresh --workdir to start over."
      ) from e
    return restored["state"], dict(restored["meta"])

  def close(self) -> None:
    if not self._failed:
      self.wait()
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-except
      if not self._failed:
        raise


def _plain(tree):
  """Nested dicts (Orbax metadata may hold other mappings) of `tree`."""
  if hasattr(tree, "items"):
    return {str(k): _plain(v) for k, v in tree.items()}
  return tree


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
    options=_manager_options(Path(directory).absolute()),
    item_handlers={
      "state": ocp.PyTreeCheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler(),
    },
  )
  try:
    saved = manager.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)
    target = traverse_util.unflatten_dict(
      {
        keys: jax.tree.map(
          lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype),
          _subtree(saved, keys, path),
        )
        for keys in parts
      }
    )
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item=target,
          partial_restore=True,
          restore_args=jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target
          ),
        ),
        meta=ocp.args.JsonRestore(),
      ),
    )
  except CheckpointError:
    raise
  except Exception as e:  # Orbax raises many types for unreadable files.
    raise CheckpointError(
      f"The checkpoint at {path} cannot be read ({type(e).__name__}: "
      f"{str(e)[:300]}). It is corrupt or incomplete."
    ) from e
  finally:
    manager.close()
  return restored["state"], dict(restored["meta"])


def _subtree(tree, keys: tuple[str, ...], path: Path):
  for i, key in enumerate(keys):
    if not isinstance(tree, dict) or key not in tree:
      raise CheckpointError(
        f"The checkpoint at {path} has no {'/'.join(keys[: i + 1])}; "
        "it was written by another method or model."
      )
    tree = tree[key]
  return tree


# FittedStore.problem of a stage saved before stages had checksums.
UNVERIFIED = "has no checksums (saved by an older version)"


class FittedStore:
  """The fitted non-gradient stage of each checkpoint, under <workdir>/fitted.

  Step N holds what was fitted on checkpoint N's state: 'fitted' (the
  method's arrays: classifiers, memory banks), 'calibration' (JSON:
  per-scorer thresholds and normalisation statistics) and 'meta' (JSON).
  Beside them checksums.json holds every file's SHA-256 and, as
  'checkpoint_sha256', the digest of checkpoint N's checksums.json, so that
  a damaged stage, or one fitted on a checkpoint since replaced, is found.
  """

  def __init__(self, directory, max_to_keep: int = 3):
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=_manager_options(
        self.directory, create=False, max_to_keep=max_to_keep
      ),
      item_names=("fitted", "calibration", "meta"),
      item_handlers={
        "fitted": ocp.PyTreeCheckpointHandler(),
        "calibration": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
      },
    )

  def has(self, step: int) -> bool:
    return step in self.manager.all_steps()

  def save(
    self,
    step: int,
    fitted,
    calibration: dict,
    meta: dict,
    checkpoint_sha256=None,
  ) -> None:
    """Writes the stage of checkpoint `step` (replacing an older one);
    `checkpoint_sha256` is `checksums_digest` of that checkpoint."""
    if self.has(step):
      self.manager.delete(step)
    # A format number beside the arrays keeps the item non-empty for
    # methods without a fitted stage.
    item = {"stage": fitted, "format": np.asarray(1, np.int32)}
    self.manager.save(
      step,
      args=ocp.args.Composite(
        fitted=ocp.args.PyTreeSave(item),
        calibration=ocp.args.JsonSave(calibration),
        meta=ocp.args.JsonSave(meta),
      ),
      force=True,
    )
    self.manager.wait_until_finished()
    if parallel.process_index() == 0:
      write_checksums(
        self.directory / str(step), checkpoint_sha256=checkpoint_sha256
      )

  def problem(self, step: int, checkpoint_sha256):
    """Why the stage of `step` must not be used ('fails its checksums
    (...)', 'was fitted on another checkpoint ...'), UNVERIFIED for a stage
    saved before checksums were, or None when it verifies."""
    path = self.directory / str(step)
    if not (path / CHECKSUMS).is_file():
      return UNVERIFIED
    problem = verify(path)
    if problem is not None:
      return problem
    recorded = json.loads((path / CHECKSUMS).read_text()).get(
      "checkpoint_sha256"
    )
    if recorded != checkpoint_sha256:
      return (
        f"was fitted on another checkpoint of step {step} (the "
        "checkpoint has been replaced since)"
      )
    return None

  def restore(self, step: int):
    """(fitted as NumPy arrays, calibration, meta) of checkpoint `step`."""
    path = self.directory / str(step)
    try:
      saved = self.manager.item_metadata(step)["fitted"]
      saved = getattr(saved, "tree", saved)
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
          fitted=ocp.args.PyTreeRestore(
            restore_args=jax.tree.map(
              lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved
            )
          ),
          calibration=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore(),
        ),
      )
    except Exception as e:  # Orbax raises many types for unreadable files.
      raise CheckpointError(
        f"The fitted stage at {path} cannot be read ({type(e).__name__}: "
        f"{str(e)[:300]}). Run again with --refit to fit it anew."
      ) from e
    return (
      restored["fitted"].get("stage", {}),
      dict(restored["calibration"]),
      dict(restored["meta"]),
    )

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
