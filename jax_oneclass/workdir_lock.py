"""One writer per workdir: a lock file taken by training and evaluation.

`<workdir>/.lock` holds JSON {host, pid, since, purpose}. It is created
atomically (O_CREAT | O_EXCL), so of two writers starting together one gets
it and the other is refused at once, naming the holder. A lock left by a
process that no longer runs on this host is taken over with a warning.
Readers (predict, export, Detector.load) take no lock. With several JAX
processes only process 0 takes it.
"""

import atexit
import contextlib
import json
import os
import socket
import time
from pathlib import Path

from jax_oneclass import interrupts, logging_utils
from jax_oneclass.errors import WorkdirBusy

LOCK_NAME = ".lock"


def lock_path(workdir) -> Path:
  return Path(workdir) / LOCK_NAME


def read_holder(path) -> dict | None:
  """The lock's JSON, {} when unreadable (being written, or damaged), or
  None when there is no lock."""
  try:
    return json.loads(Path(path).read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}


def is_stale(holder: dict) -> bool:
  """Whether the holder is a process of this host that no longer runs."""
  if holder.get("host") != socket.gethostname():
    return False  # Another host's process cannot be checked from here.
  try:
    os.kill(int(holder["pid"]), 0)
  except ProcessLookupError:
    return True
  except (PermissionError, KeyError, TypeError, ValueError):
    return False  # Runs under another user, or the file is unreadable.
  return False


def describe(holder: dict) -> str:
  """'pid 12 on host h since 2026-12-05 12:00:00 UTC (training)'."""
  if not holder:
    return "a process whose lock file cannot be read"
  try:
    since = time.strftime(
      "%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(holder.get("since")))
    )
  except (TypeError, ValueError, OverflowError):
    since = "an unknown time"
  return (
    f"pid {holder.get('pid')} on host {holder.get('host')} since "
    f"{since} ({holder.get('purpose', 'writing')})"
  )


def _create(path: Path, payload: dict) -> bool:
  """Writes the lock if none exists; False if one does."""
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    json.dump(payload, f)
  return True


def acquire(workdir, purpose: str) -> dict | None:
  """Takes the workdir's lock; returns what it holds (None: not process
  0, which alone takes it). Raises WorkdirBusy when a live process holds
  it."""
  if not logging_utils.is_main_process():
    return None
  path = lock_path(workdir)
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "since": time.time(),
    "purpose": purpose,
  }
  if _create(path, payload):
    return payload
  holder = read_holder(path)
  if holder and is_stale(holder):
    logging_utils.warn(
      f"Taking over the lock {path} left by {describe(holder)}"
      ", which no longer runs."
    )
    path.unlink(missing_ok=True)
    if _create(path, payload):
      return payload
    holder = read_holder(path) or {}
  raise WorkdirBusy(
    f"{Path(workdir)} is in use by {describe(holder or {})}. Wait for it "
    "to finish or stop it, or use another --workdir; if that process is "
    f"certainly not running, delete {path}."
  )


def release(workdir, payload: dict | None) -> None:
  """Removes the lock if it is still the one `payload` took."""
  if payload is None:
    return
  path = lock_path(workdir)
  if read_holder(path) == payload:
    path.unlink(missing_ok=True)


def acquire_everywhere(workdir, purpose: str) -> dict | None:
  """`acquire` on process 0; with several processes every one learns
  whether it got the lock, so that none goes on (and waits for the others
  in a collective) alone."""
  from jax_oneclass import parallel  # pylint: disable=g-import-not-at-top

  failed = None
  try:
    payload = acquire(workdir, purpose)
  except Exception as e:  # pylint: disable=broad-except
    failed, payload = e, None
  if parallel.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    refused = multihost_utils.broadcast_one_to_all(np.int32(failed is not None))
    if failed is None and int(refused):
      failed = WorkdirBusy(
        f"{Path(workdir)} is in use by another run, or "
        "its lock could not be taken (process 0 says "
        "which)."
      )
  if failed is not None:
    raise failed
  return payload


@contextlib.contextmanager
def held(workdir, purpose: str):
  """The workdir's lock for the block; also released at interpreter exit."""
  payload = acquire_everywhere(workdir, purpose)
  on_exit = lambda: release(workdir, payload)
  atexit.register(on_exit)
  forget = interrupts.on_hard_exit(on_exit)
  try:
    yield payload
  finally:
    release(workdir, payload)
    atexit.unregister(on_exit)
    forget()
