"""The training loop, shared by every method.

Data flows one way: input pipeline -> global batch -> jitted, data-parallel
`method.train_step` -> state -> Orbax checkpoint. A run in a workdir with
checkpoints continues from the newest one; because the input pipeline and
the step keys are functions of (seed, step), the continued run is identical
to an uninterrupted one.
"""

import contextlib
import itertools
import math
import signal
import threading
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

from jax_oneclass import data, evaluate, logging_utils, parallel
from jax_oneclass import interrupts, workdir_lock
from jax_oneclass import run as run_lib
from jax_oneclass.errors import Interrupted, NonFiniteLossError


# Steps dispatched beyond the newest finished one: enough to keep the
# device busy, few enough that a SIGTERM is read within a couple of steps.
MAX_IN_FLIGHT = 2
_wait_for = jax.block_until_ready


def jit_train_step(method, mesh):
  """`method.train_step` jitted over the mesh: state replicated, batch split.

  The old state is donated, so its buffers are reused for the new one.
  """
  replicated = parallel.replicated(mesh)
  return jax.jit(
    method.train_step,
    in_shardings=(replicated, parallel.batch_sharded(mesh), replicated),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )


def mean_metrics(fetched: list) -> dict:
  """Means over steps of host metric dicts ({name: scalar} per step)."""
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def check_finite(summary: dict, first: int, step: int, checkpointer) -> None:
  """Raises NonFiniteLossError naming the last good checkpoint when a
  metric averaged over steps `first`..`step` is not finite."""
  if all(math.isfinite(v) for v in summary.values()):
    return
  bad = sorted(k for k, v in summary.items() if not math.isfinite(v))
  checkpointer.wait()
  last = checkpointer.latest_step()
  raise NonFiniteLossError(
    f"Non-finite {', '.join(bad)} between steps {first} "
    f"and {step}. Training stopped; the last good checkpoint is "
    + (
      f"step {last} in {checkpointer.directory}"
      if last is not None
      else "none (no checkpoint was written yet)"
    )
    + ". Lower optimizer.learning_rate or set optimizer.grad_clip_norm, "
    "then run again with the same --workdir to resume from it."
  )


def _summarise(pending: list, step: int, checkpointer) -> dict:
  """Means of the metrics since the last call; stops on a non-finite loss."""
  summary = mean_metrics([parallel.to_host(m) for m in pending])
  check_finite(summary, step - len(pending) + 1, step, checkpointer)
  return summary


@contextlib.contextmanager
def sigterm_requests():
  """Yields an Event that SIGTERM sets (instead of killing the process).

  SLURM, Kubernetes and TPU pre-emption send SIGTERM; the loop reads the
  event at step boundaries, saves and stops. Only the main thread can take
  signals; elsewhere the event is never set. Within `interrupts.guarded`
  its handlers are used.
  """
  guard = interrupts.active()
  if guard is not None:  # The command's handlers: switch them to polling.
    guard.polling = True
    try:
      yield guard.requested
    finally:
      guard.polling = False
    if guard.requested.is_set():  # After the loop's last look.
      raise interrupts.Terminated(
        "Stopped by SIGTERM after the last training step, before "
        "evaluation; the final checkpoint is saved. Run the same command "
        "again to evaluate it."
      )
    return
  requested = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield requested
    return
  previous = signal.signal(signal.SIGTERM, lambda *_: requested.set())
  try:
    yield requested
  finally:
    signal.signal(signal.SIGTERM, previous)


def _agreed(flags: tuple[bool, ...], step: int, every: int) -> tuple:
  """`flags` or-ed over processes. Saving is collective, so every process
  must decide alike: with several processes they agree at log steps only."""
  if parallel.process_count() == 1:
    return flags
  if step % every:
    return (False,) * len(flags)
  gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
  return tuple(
    bool(v) for v in np.asarray(gathered).reshape(-1, len(flags)).max(axis=0)
  )


def prepare(run: run_lib.Run, state, batches):
  """(state, batches) after `run.method.prepare` (if the method has it) saw
  its first training batches, which `batches` still yields (they are no
  steps)."""
  if not hasattr(run.method, "prepare"):
    return state, batches
  first = list(
    itertools.islice(batches, getattr(run.method, "prepare_batches", 1))
  )
  state = run.method.prepare(
    state, [parallel.shard_batch(run.mesh, b) for b in first]
  )
  state = jax.jit(lambda s: s, out_shardings=parallel.replicated(run.mesh))(
    state
  )
  return state, itertools.chain(first, batches)


def train(config, workdir, allow_config_change: bool = False):
  """Trains `config.method` in `workdir`; returns (run, final state)."""
  run = run_lib.setup(config, workdir, allow_config_change=allow_config_change)
  try:
    with workdir_lock.held(run.workdir, "training"):
      return run, train_run(run)
  finally:
    run.checkpointer.close()


def train_run(run: run_lib.Run):
  """Trains a set-up run from its newest checkpoint; returns the state."""
  config, workdir, info = run.config, run.workdir, run.info
  mesh, checkpointer = run.mesh, run.checkpointer
  state, start_step = run_lib.restore_or_init(run)
  total = config.num_train_steps
  run_lib.save_run_files(run, start_step)
  logging_utils.info(
    f"{config.method} on {config.data.name}, normal class "
    f"{config.data.normal_class} "
    f"({info.class_names[config.data.normal_class]}): {info.num_train} "
    f"normal training images, {parallel.device_count()} devices in "
    f"{parallel.process_count()} processes, steps {start_step}..{total}, "
    f"workdir {workdir}."
  )

  step_fn = jit_train_step(run.method, mesh)
  rng = jax.random.key(config.seed + 1)
  writer = logging_utils.MetricWriter(workdir / "tensorboard" / "train")
  progress = logging_utils.Progress(
    total, start_step, config.batch_size, config.progress_bar
  )
  stop = (
    total if config.halt_after_step <= 0 else min(total, config.halt_after_step)
  )
  batches = data.train_batches(config, start_step)
  if start_step == 0:
    state, batches = prepare(run, state, batches)
  pending, step = [], start_step
  last_save = time.monotonic()
  every_secs = config.get("checkpoint_every_secs", 0.0)
  try:
    with sigterm_requests() as sigterm:
      while step < stop:
        # Once a step ran there is work to save: a slow batch may take long.
        with interrupts.waiting_for_steps(step > start_step):
          batch = parallel.shard_batch(mesh, next(batches))
        state, metrics = step_fn(state, batch, rng)
        pending.append(metrics)
        if len(pending) > MAX_IN_FLIGHT:  # Stay a few steps ahead at most.
          with interrupts.waiting_for_steps():
            _wait_for(pending[-MAX_IN_FLIGHT - 1])
        step += 1
        timed = every_secs > 0 and time.monotonic() - last_save >= every_secs
        timed, terminated = _agreed(
          (timed, sigterm.is_set()), step, config.log_every_steps
        )
        save = (
          step % config.checkpoint_every_steps == 0
          or step == stop
          or timed
          or terminated
        )
        stopped_early = False
        if save or step % config.log_every_steps == 0:
          with interrupts.waiting_for_steps():
            summary = _summarise(pending, step, checkpointer)
          pending = []
          summary["images_per_sec"] = progress.update(step, summary)
          writer.write_scalars(step, summary)
          # A method that stops early freezes itself and reports it.
          stopped_early = summary.get("stop_training", 0) > 0
        if save or stopped_early:
          checkpointer.save(step, state, run_lib.checkpoint_meta(config, step))
          last_save = time.monotonic()
        if terminated:
          checkpointer.wait()
          raise Interrupted(
            f"Stopped by SIGTERM at step {step} of {total}; saved the "
            f"checkpoint {checkpointer.directory / str(step)}. Run the same "
            "command again to continue from it."
          )
        if stopped_early:
          logging_utils.info(f"Early stopping at step {step} of {total}.")
          break
  except KeyboardInterrupt:
    # Keep the work done so far unless it is already broken.
    if pending:
      _summarise(pending, step, checkpointer)
    checkpointer.wait()
    last = checkpointer.latest_step()
    if step > (last or 0):
      checkpointer.save(step, state, run_lib.checkpoint_meta(config, step))
      checkpointer.wait()
      message = (
        f"Interrupted at step {step} of {total}; saved the "
        f"checkpoint {checkpointer.directory / str(step)}. Run the "
        "same command again to continue from it."
      )
    else:  # E.g. during compilation: no step finished since the last save.
      message = (
        f"Interrupted at step {step} of {total} before a new step "
        "finished; nothing new to save. "
        + (
          f"Run the same command again to continue from the "
          f"checkpoint at step {last}."
          if last is not None
          else "No checkpoint was written yet."
        )
      )
    raise Interrupted(message) from None
  finally:
    progress.close()
    writer.close()
    checkpointer.wait()
  return state


def train_and_evaluate(
  config, workdir, allow_config_change: bool = False
) -> dict:
  """Trains, then (unless halted early) evaluates; returns the results."""
  run = run_lib.setup(config, workdir, allow_config_change=allow_config_change)
  try:
    with workdir_lock.held(run.workdir, "training"):
      state = train_run(run)
      if 0 < run.config.halt_after_step < run.config.num_train_steps:
        return {}
      return evaluate.evaluate_run(run, state, run.checkpointer.latest_step())
  finally:
    run.checkpointer.close()
