"""SIGTERM and Ctrl-C honoured within seconds in every phase of a command.

Python runs signal handlers only when the main thread runs Python code, so a
process inside a long C++ call (building a tf.data pipeline, compiling a
step, a blocking transfer) would not notice a signal for minutes. `guarded`
therefore also has the C-level handler write each signal to a pipe
(`signal.set_wakeup_fd`) that a watchdog thread reads: if the main thread
has not taken the signal within `GRACE_SECS` (`STEP_GRACE_SECS` while it
waits for running training steps), or on a second signal, the
watchdog prints one line and ends the process with exit code 2. Nothing
half written is left: Orbax writes a checkpoint to a temporary folder and
renames it when complete, and the workdir lock is released first.

Inside the training loop (`polling`) SIGTERM only sets an event that the
loop reads at each step boundary, to save and stop; elsewhere it raises
`Terminated`, as Ctrl-C raises KeyboardInterrupt.
"""

import contextlib
import os
import signal
import sys
import threading
import time


# Seconds the main thread has to take a signal before the watchdog ends
# the process; STEP_GRACE_SECS while it waits for running training steps
# (`waiting_for_steps`), after which the loop saves.
GRACE_SECS = 3.0
STEP_GRACE_SECS = 60.0
# Seconds the process has to stop once its handler raised: the exception
# can be swallowed (raised inside a garbage-collector callback or a
# __del__) or the clean-up (a final save) can hang.
UNWIND_SECS = 60.0

_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}


class _Guard:
  """The state the handlers, the watchdog and the training loop share."""

  def __init__(self):
    self.polling = False  # The training loop reads `requested`.
    self.waiting = False  # The main thread waits for running steps.
    self.requested = threading.Event()  # SIGTERM, for the loop.
    self.taken = 0  # Signals the main thread's handlers ran for.
    self.changed = threading.Condition(threading.RLock())
    self.on_exit = []  # Called before the watchdog ends the process.
    self.ended = threading.Event()  # The guarded block has ended.

  def unwind(self, name: str):
    """Called as a handler raises: ends the process after UNWIND_SECS
    unless the guarded block has ended by then."""

    def check():
      if not self.ended.wait(UNWIND_SECS):
        _exit(self, name, second=False, secs=UNWIND_SECS, unwinding=True)

    threading.Thread(
      target=check, daemon=True, name="interrupts-unwind"
    ).start()

  def take(self):
    with self.changed:
      self.taken += 1
      self.changed.notify_all()

  def wait_taken(self, count: int, timeout: float) -> bool:
    with self.changed:
      return self.changed.wait_for(lambda: self.taken >= count, timeout)


_guard = None


def active():
  """The guard `guarded` installed, or None."""
  return _guard


def on_hard_exit(callback):
  """Registers `callback` to run if the watchdog ends the process; returns
  a function that unregisters it."""
  guard = _guard
  if guard is None:
    return lambda: None
  guard.on_exit.append(callback)
  return lambda: callback in guard.on_exit and guard.on_exit.remove(callback)


class Terminated(BaseException):
  """SIGTERM outside the training steps. Like KeyboardInterrupt it is no
  Exception, so that no `except Exception` swallows it."""


@contextlib.contextmanager
def waiting_for_steps(waiting: bool = True):
  """Marks (if `waiting`) a wait for running training steps or the next
  batch, which may take longer than GRACE_SECS: the loop saves after it."""
  guard = _guard
  if guard is None or not waiting:
    yield
    return
  guard.waiting = True
  try:
    yield
  finally:
    guard.waiting = False


def _sigterm(guard, *_):
  guard.take()
  if guard.polling:
    guard.requested.set()
    return
  # If the exception is swallowed (raised inside a garbage-collector
  # callback), the training loop still sees the request at its next step.
  guard.requested.set()
  guard.unwind("SIGTERM")
  raise Terminated(
    "Stopped by SIGTERM outside the training steps (e.g. while reading "
    "data or evaluating); every finished checkpoint is kept. Run the same "
    "command again to continue."
  )


def raise_if_requested():
  """Raises Terminated if a SIGTERM was taken but its exception swallowed
  (a handler that ran inside a garbage-collector callback): the command
  then still ends with exit code 2."""
  guard = _guard
  if guard is not None and not guard.polling and guard.requested.is_set():
    raise Terminated(
      "Stopped by SIGTERM: the command finished the work it was doing "
      "when the signal came; every finished checkpoint is kept. Run the "
      "same command again to continue."
    )


def _sigint(guard, *_):
  guard.take()
  guard.unwind("Ctrl-C")
  raise KeyboardInterrupt


def hard_exit_message(
  name: str, second: bool, secs: float = 0, unwinding: bool = False
) -> str:
  """The line the watchdog prints before it ends the process."""
  if second:
    why = "asked twice"
  elif unwinding:
    why = f"the process had not stopped {secs:g} s after it took the signal"
  else:
    why = (
      f"the process was inside a call that cannot be interrupted "
      f"(reading data, compiling or a long step) for {secs:g} s"
    )
  return (
    f"error: Stopped by {name} without saving: {why}. Every finished "
    "checkpoint is kept; run the same command again to continue from "
    "the newest one."
  )


def _watch(guard, read_fd):
  """Ends the process when a signal is not taken within its grace."""
  seen = 0
  while True:
    try:
      data = os.read(read_fd, 64)
    except OSError:
      return
    if not data:
      os.close(read_fd)
      return
    for number in data:
      if number not in _NAMES:
        continue
      seen += 1
      if seen > 1:
        _exit(guard, _NAMES[number], second=True)
      start = time.monotonic()
      while not guard.wait_taken(seen, 0.1):
        grace = STEP_GRACE_SECS if guard.waiting else GRACE_SECS
        if time.monotonic() - start > grace:
          _exit(guard, _NAMES[number], second=False, secs=grace)


def _exit(
  guard, name: str, second: bool, secs: float = 0, unwinding: bool = False
):
  for callback in list(guard.on_exit):
    try:
      callback()
    except Exception:  # pylint: disable=broad-except
      pass
  sys.stderr.write(
    "\n" + hard_exit_message(name, second, secs, unwinding) + "\n"
  )
  sys.stderr.flush()
  os._exit(2)  # pylint: disable=protected-access


@contextlib.contextmanager
def guarded():
  """Installs the handlers and the watchdog for the block (main thread
  only; elsewhere, or nested, it does nothing)."""
  global _guard
  if (
    threading.current_thread() is not threading.main_thread()
    or _guard is not None
  ):
    yield _guard
    return
  guard = _Guard()
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  previous = {number: signal.getsignal(number) for number in _NAMES}
  signal.signal(signal.SIGTERM, lambda *a: _sigterm(guard, *a))
  signal.signal(signal.SIGINT, lambda *a: _sigint(guard, *a))
  previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  threading.Thread(
    target=_watch,
    args=(guard, read_fd),
    daemon=True,
    name="interrupts-watchdog",
  ).start()
  _guard = guard
  try:
    yield guard
  finally:
    guard.ended.set()
    _guard = None
    signal.set_wakeup_fd(previous_fd)
    for number, handler in previous.items():
      signal.signal(number, handler)
    os.close(write_fd)  # The watchdog's read then ends.
