"""Sweeps: a paper's whole one-class protocol (every class x seed) as one job.

  python -m jax_oneclass.sweep --config=configs/disaug.py:digits \\
      --classes=all --seeds=0,1,2 --workdir=/tmp/sweep
  python -m jax_oneclass.sweep --config=configs/rotnet.py:digits \\
      --classes=0,3,5 --grid=optimizer.learning_rate=1e-3,3e-4 \\
      --config.num_train_steps=200 --workdir=/tmp/sweep_lr

Members. Every (class, seed, grid point) is a member with its own folder,
W/class_<c>/seed_<s>[/<key>=<v>,...], laid out exactly like a single run's
workdir (config.json, dataset_info.json, checkpoints/, fitted/,
results.json, ...), so `jax_oneclass.main --mode=eval`, predict, export and
`Detector.load` take a member folder unchanged. `--grid=key=v1,v2`
(repeatable) sweeps any other config key; on MVTec the categories are a
grid: `--grid=data.category=bottle,cable`.

Stacked training. Members whose configs differ only in normal class, seed
or keys that change neither a shape nor a traced constant train in one
jitted program: their states are stacked on a leading member axis and the
method's own `train_step` runs per member on a batch [members, batch, ...]
in which each member draws its own class's images in its own seeded order
and augmentations (one `data.train_batches` per member) with its own key
`jax.random.key(seed + 1)`, exactly as `train.py` does, so a member equals
its single run. Members are grouped by tracing each one's `train_step`
(jaxpr and constants); any difference makes another group, run as another
program in the same process. `--combine` picks how a program combines its
members: 'vmap' (`jax.vmap(train_step)`), 'unrolled' (the per-member steps
one after another in one jitted program) or 'auto' (times one compiled
step of each on the first group of several members and keeps the faster,
saying which). `--stack=K` bounds the members per program (memory). The
mesh has a 'member' axis beside 'data' (8 devices and 8 members: 8 x 1; 4
members: 4 x 2; one CPU: 1 x 1): the stacked state is split over
'member', the batch over ('member', 'data').

Several hosts. Under --coordinator_address/--num_processes/--process_id
(or JAX's auto-detection), with a member per process at least, process i
trains every n-th member from the i-th on its own devices and writes their
folders (`parallel.host_local`); then process 0 writes the tables. With
fewer members, all hosts run every member, split over 'data'.
`--shard=i/n` instead takes every n-th member (from the i-th) for
independent jobs, e.g. a SLURM array without a coordinator; each job
writes only its members' folders, and the tables cover the members
finished so far (`--report_only` redraws them).

Faults. SIGTERM (pre-emption) or Ctrl-C saves every member and the same
command continues; finished members (results.json at their last
checkpoint) are skipped. A member whose loss goes non-finite stops, is
named and reported, and keeps its last good checkpoint while the others go
on; a member that stops early (a 'stop_training' metric) is frozen at that
step (its checkpoint saved there) while the others go on.

Results. Each member is evaluated as a single run is (its results.json);
then W/sweep_results.json (every scorer), W/sweep_table.md (one row per
class, one column per seed, mean +- std over seeds, for the headline
scorer; the overall mean over classes +- the std over seeds of the
per-seed class mean; a published number where jax_oneclass/
reference_results.json has one) and W/sweep_auroc.png.
"""

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if __name__ == "__main__":
  # The command checks its input before JAX and TensorFlow load; then this
  # file, imported as jax_oneclass.sweep, runs it (sweep_cli.run exits).
  from jax_oneclass import sweep_cli  # pylint: disable=g-import-not-at-top

  def _run_checked(*args):
    from jax_oneclass import sweep  # pylint: disable=g-import-not-at-top

    sweep.run_checked(*args)

  sweep_cli.run(_run_checked)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

from jax_oneclass import checkpointing, data, evaluate, logging_utils  # pylint: disable=g-import-not-at-top
from jax_oneclass import parallel, train, workdir_lock  # pylint: disable=g-import-not-at-top
from jax_oneclass import run as run_lib  # pylint: disable=g-import-not-at-top
from jax_oneclass import sweep_cli  # pylint: disable=g-import-not-at-top
from jax_oneclass.sweep_cli import (  # pylint: disable=g-import-not-at-top
  COMBINES,
  parse_grid,
  resolve_classes,
)
from jax_oneclass.errors import ConfigError, Interrupted, NonFiniteLossError  # pylint: disable=g-import-not-at-top

MEMBER_AXIS = "member"
# 'auto' takes vmap only when one vmapped step's state is this close to the
# unrolled one's: vmap sums in another order, and Adam turns rounding in
# near-zero gradients into steps of the learning rate. Measured on tiny
# digits runs, largest |parameter difference| to the single run after 4
# steps: unrolled 6e-8 (RotNet) to 6.7e-5 (reverse distillation, one
# weight); vmap 1.1e-6 (RotNet), 4.8e-7 (GANomaly), but 0.096 (reverse
# distillation; 8e-4 after one step).
VMAP_TOLERANCE = 1e-5
STATUS_FILE = "sweep_member.json"
RESULTS_FILE = "sweep_results.json"
TABLE_FILE = "sweep_table.md"
PLOT_FILE = "sweep_auroc.png"
REFERENCE_FILE = Path(__file__).with_name("reference_results.json")


# --- Members -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Member:
  """One (class, seed, grid point) of a sweep and its run folder."""

  normal_class: int
  seed: int
  grid: tuple  # ((dotted key, value), ...) in --grid order.
  config: ml_collections.ConfigDict
  workdir: Path

  @property
  def name(self) -> str:
    return " ".join(
      [
        f"class {self.normal_class}",
        f"seed {self.seed}",
        *(f"{k}={v}" for k, v in self.grid),
      ]
    )


def class_names(config) -> tuple[str, ...]:
  """The configured data set's class names (label = index)."""
  from jax_oneclass.data import sources  # pylint: disable=g-import-not-at-top

  return tuple(sources.get_source(config).class_names)


def _folder_value(value) -> str:
  text = value if isinstance(value, str) else json.dumps(value)
  return re.sub(r"[^A-Za-z0-9._=+-]", "_", text.replace(", ", ","))


def member_folder(normal_class: int, seed: int, grid) -> Path:
  """class_<c>/seed_<s>[/<key>=<v>,...] (relative to the sweep folder)."""
  folder = Path(f"class_{normal_class}") / f"seed_{seed}"
  if grid:
    folder /= ",".join(f"{k}={_folder_value(v)}" for k, v in grid)
  return folder


def make_members(
  config, workdir, classes: Sequence[int], seeds: Sequence[int], grid=()
) -> list[Member]:
  """Every (grid point, class, seed) member of a sweep, in that order."""
  keys = [k for k, _ in grid]
  members = []
  for point in itertools.product(*(values for _, values in grid)):
    for normal_class in classes:
      for seed in seeds:
        member_config = ml_collections.ConfigDict(config.to_dict())
        member_config.data.normal_class = int(normal_class)
        member_config.seed = int(seed)
        member_config.update_from_flattened_dict(dict(zip(keys, point)))
        point_items = tuple(zip(keys, point))
        members.append(
          Member(
            int(normal_class),
            int(seed),
            point_items,
            member_config,
            Path(workdir) / member_folder(normal_class, seed, point_items),
          )
        )
  return members


def shard_members(members: list[Member], index: int, count: int) -> list:
  """Every `count`-th member from the `index`-th."""
  return members[index::count]


# --- Grouping and the stacked program -----------------------------------------


def static_key(config) -> str:
  """The config without the keys members may differ in within a program."""
  flat = run_lib._flat(json.loads(json.dumps(config.to_dict())))  # pylint: disable=protected-access
  for key in sweep_cli.MEMBER_KEYS:
    flat.pop(key, None)
  return json.dumps(flat, sort_keys=True, default=str)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def trace_signature(method, state, batch, rng) -> str:
  """A digest of `method.train_step`'s jaxpr and constants for abstract
  inputs like these: members with equal digests run the same program."""
  closed = jax.make_jaxpr(method.train_step)(
    _abstract(state), _abstract(batch), _abstract(rng)
  )
  digest = hashlib.sha256(str(closed.jaxpr).encode())
  for const in closed.consts:
    if _is_key(const):
      const = jax.random.key_data(const)
    value = np.asarray(const)
    digest.update(str((value.shape, value.dtype)).encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def _is_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def mesh_shape(
  num_devices: int, num_members: int, batch_size: int, num_processes: int = 1
) -> tuple[int, int]:
  """(member, data) axis sizes: as many devices on 'member' as divide both
  the device count and `num_members` while the rest still divides
  `batch_size`. Several processes: 'data' only."""
  member = 1
  if num_processes == 1:
    member = max(
      d
      for d in range(1, num_devices + 1)
      if num_devices % d == 0
      and num_members % d == 0
      and batch_size % (num_devices // d) == 0
    )
  return member, num_devices // member


def sweep_mesh(num_members: int, batch_size: int) -> Mesh:
  """A (member, data) mesh over every device (see `mesh_shape`)."""
  devices = np.asarray(parallel.devices())
  shape = mesh_shape(
    len(devices), num_members, batch_size, parallel.process_count()
  )
  return Mesh(devices.reshape(shape), (MEMBER_AXIS, parallel.DATA_AXIS))


# Jitted, so that stacking or slicing a whole state outside a traced step
# is one compiled program, not one small compilation per leaf shape.
@jax.jit
def stack(trees: Sequence[Any]):
  """Pytrees -> one pytree with a leading member axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@jax.jit
def unstack(tree, index):
  """Member `index` of a stacked pytree. The index is traced: one program
  serves every member."""
  return jax.tree.map(lambda x: x[index], tree)


def _host_slice(tree, index: int):
  """Member `index` of a stacked pytree of host (NumPy) arrays."""
  return jax.tree.map(lambda x: x[index], tree)


def _keep(active, new, old):
  """`new` for active members, `old` (frozen) for the others."""

  def pick(n, o):
    mask = active.reshape(active.shape + (1,) * (n.ndim - 1))
    if _is_key(n):
      return jax.random.wrap_key_data(
        jnp.where(
          mask[..., None], jax.random.key_data(n), jax.random.key_data(o)
        ),
        impl=jax.random.key_impl(n),
      )
    return jnp.where(mask, n, o)

  return jax.tree.map(pick, new, old)


def vmap_step(method):
  """(states, batch, rngs, active) -> (states, metrics): one vmapped
  `train_step` over the member axis; inactive members keep their state."""

  def step(states, batch, rngs, active):
    new, metrics = jax.vmap(method.train_step)(states, batch, rngs)
    return _keep(active, new, states), metrics

  return step


def unrolled_step(methods):
  """Like `vmap_step`, but member i's own `methods[i].train_step` runs on
  its slice, one after another, in one program."""

  def step(states, batch, rngs, active):
    outs = [
      m.train_step(unstack(states, i), unstack(batch, i), rngs[i])
      for i, m in enumerate(methods)
    ]
    new = stack([o[0] for o in outs])
    metrics = stack([o[1] for o in outs])
    return _keep(active, new, states), metrics

  return step


def jit_stacked(step, mesh: Mesh):
  """`step` jitted: state and keys split over 'member', the batch over
  ('member', 'data'), metrics replicated; the old state is donated."""
  members = NamedSharding(mesh, P(MEMBER_AXIS))
  batch = NamedSharding(mesh, P(MEMBER_AXIS, parallel.DATA_AXIS))
  replicated = NamedSharding(mesh, P())
  return jax.jit(
    step,
    in_shardings=(members, batch, members, replicated),
    out_shardings=(members, replicated),
    donate_argnums=0,
  )


def _put_batch(mesh: Mesh, host_batches: Sequence[dict]) -> dict:
  """Per-member host batches -> global [members, batch, ...] arrays."""
  sharding = NamedSharding(mesh, P(MEMBER_AXIS, parallel.DATA_AXIS))
  return jax.tree.map(
    lambda *xs: jax.make_array_from_process_local_data(sharding, np.stack(xs)),
    *host_batches,
  )


def _put_members(mesh: Mesh, tree):
  return parallel.put_global(tree, NamedSharding(mesh, P(MEMBER_AXIS)))


def _copy(tree):
  return jax.tree.map(lambda x: x.copy(), tree)


def _timed_step(fn, state, batch, rngs, active):
  """(wall seconds of one step of compiled `fn`, the new state): compiled
  and run once first, on copies of the state (it is donated)."""
  jax.block_until_ready(fn(_copy(state), batch, rngs, active))
  start = time.perf_counter()
  new, _ = jax.block_until_ready(fn(_copy(state), batch, rngs, active))
  return time.perf_counter() - start, new


def max_difference(a, b) -> float:
  """The largest |a - b| over the floating-point leaves of two pytrees."""
  pairs = [
    (x, y)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    if jnp.issubdtype(x.dtype, jnp.floating) and x.size
  ]
  return float(_max_abs_difference(pairs)) if pairs else 0.0


@jax.jit
def _max_abs_difference(pairs):
  return jnp.max(jnp.stack([jnp.max(jnp.abs(x - y)) for x, y in pairs]))


# --- Training -----------------------------------------------------------------


@dataclasses.dataclass
class _Slot:
  """A member being trained: its run, state while loading, and outcome."""

  member: Member
  run: run_lib.Run
  start_step: int
  status: str = "training"  # finished, stopped_early, non_finite, halted.
  step: int = 0
  error: str = ""


def _status_path(member: Member) -> Path:
  return member.workdir / STATUS_FILE


def _read_json(path: Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _write_status(slot: _Slot) -> None:
  logging_utils.write_json(
    _status_path(slot.member),
    {
      "status": slot.status,
      "step": slot.step,
      "error": slot.error,
      "member": slot.member.name,
    },
  )


def _latest_step(member: Member):
  """The member's newest checkpoint step, or None; creates nothing."""
  if not (member.workdir / "checkpoints").is_dir():
    return None  # Another shard's member, or not started.
  checkpointer = checkpointing.Checkpointer(
    member.workdir / "checkpoints", member.config.keep_checkpoints
  )
  try:
    return checkpointer.latest_step()
  finally:
    checkpointer.close()


def _trained_step(member: Member, total: int, latest="read"):
  """The step a member's training ended at (num_train_steps, or where it
  stopped early), if its checkpoints show it ended; else None. `latest`:
  its newest checkpoint step, if known."""
  if latest == "read":
    latest = _latest_step(member)
  if latest is None:
    return None
  status = _read_json(_status_path(member)) or {}
  if latest >= total or (
    status.get("status") == "stopped_early" and status.get("step") == latest
  ):
    return latest
  return None


def _finished_results(member: Member, total: int):
  """The member's results.json when it is complete (at the step its
  training ended), else None."""
  step = _trained_step(member, total)
  results = _read_json(member.workdir / "results.json")
  if step is not None and results and results.get("step") == step:
    return results
  return None


def _agreed_choice(mode: str) -> str:
  """Process 0's combine mode on every process: each times its own steps,
  and hosts that chose differently would run different programs."""
  if parallel.process_count() == 1:
    return mode
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  names = sorted(COMBINES)
  index = multihost_utils.broadcast_one_to_all(np.int32(names.index(mode)))
  return names[int(index)]


class _Combiner:
  """The combine mode: fixed, or chosen once by timing ('auto')."""

  def __init__(self, mode: str):
    if mode not in COMBINES:
      raise ConfigError(
        f"--combine={mode!r} must be one of {', '.join(COMBINES)}."
      )
    self.mode = mode
    self.timings, self.difference = {}, None

  def step_fn(self, methods, mesh, state, batch, rngs, active):
    """The jitted step for one program of members."""
    build = {
      "vmap": lambda: jit_stacked(vmap_step(methods[0]), mesh),
      "unrolled": lambda: jit_stacked(unrolled_step(methods), mesh),
    }
    if self.mode != "auto":
      return build[self.mode]()
    if len(methods) == 1:
      return build["unrolled"]()  # Either is the single run's step.
    fns = {name: make() for name, make in build.items()}
    outs = {
      name: _timed_step(fn, state, batch, rngs, active)
      for name, fn in fns.items()
    }
    self.timings = {name: out[0] for name, out in outs.items()}
    self.difference = max_difference(outs["vmap"][1], outs["unrolled"][1])
    self.mode = _agreed_choice(min(self.timings, key=self.timings.get))
    why = "faster"
    if self.difference > VMAP_TOLERANCE:
      self.mode, why = (
        "unrolled",
        (
          f"vmap's state differs by {self.difference:.2g} after one step "
          "(members would not equal their single runs)"
        ),
      )
    logging_utils.info(
      f"--combine=auto: one step of {len(methods)} members took "
      + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.timings.items())
      + f"; using {self.mode} ({why})."
    )
    return fns[self.mode]


def _group_slots(slots: list[_Slot], states, batches, stack_limit):
  """Programs: lists of slot indices that share static config, start step
  and traced `train_step`, at most `stack_limit` each."""
  groups = {}
  for i, slot in enumerate(slots):
    rng = jax.random.key(slot.run.config.seed + 1)
    key = (
      static_key(slot.run.config),
      slot.start_step,
      trace_signature(slot.run.method, states[i], batches[i], rng),
    )
    groups.setdefault(key, []).append(i)
  limit = stack_limit or max(len(slots), 1)
  return [
    indices[k : k + limit]
    for indices in groups.values()
    for k in range(0, len(indices), limit)
  ]


def _prepare(member: Member, allow_config_change: bool):
  """(slot, state, first batch, batch iterator) of a member to train."""
  run = run_lib.setup(
    member.config, member.workdir, allow_config_change=allow_config_change
  )
  state, start_step = run_lib.restore_or_init(run)
  slot = _Slot(member, run, start_step, step=start_step)
  batches = data.train_batches(run.config, start_step)
  first = next(batches)
  return slot, state, first, batches


def _save(slot: _Slot, state, step: int) -> None:
  config = slot.run.config
  slot.run.checkpointer.save(step, state, run_lib.checkpoint_meta(config, step))


def _member_state(stacked, index: int, run: run_lib.Run):
  """Member `index`'s state, replicated over its run's mesh like a single
  run's."""
  return parallel.put_global(
    unstack(stacked, index), parallel.replicated(run.mesh)
  )


def train_program(
  slots: list[_Slot],
  states,
  firsts,
  iterators,
  combiner: _Combiner,
  progress,
  done_before: int,
) -> Any:
  """Trains one program of members together; returns the stacked state.

  Mirrors `train.train_run` per member: the same saves, logs, early stop
  and non-finite checks, one member at a time where they differ.
  """
  config = slots[0].run.config
  total, start = config.num_train_steps, slots[0].start_step
  stop = (
    total if config.halt_after_step <= 0 else min(total, config.halt_after_step)
  )
  if start >= stop:
    for slot in slots:
      slot.status = "finished" if start >= total else "halted"
    return stack(states)
  mesh = sweep_mesh(len(slots), config.batch_size)
  logging_utils.info(
    f"Training {len(slots)} member(s) in one program from step {start}: "
    + ", ".join(s.member.name for s in slots)
    + f" (mesh {dict(mesh.shape)})."
  )
  state = _put_members(mesh, stack(states))
  rngs = _put_members(
    mesh, stack([jax.random.key(s.run.config.seed + 1) for s in slots])
  )
  active = np.ones(len(slots), bool)
  replicated = NamedSharding(mesh, P())
  writers = [
    logging_utils.MetricWriter(s.run.workdir / "tensorboard" / "train")
    for s in slots
  ]
  for slot in slots:
    run_lib.save_run_files(slot.run, slot.start_step)
  pending, step = [], start
  first_batch = _put_batch(mesh, firsts)
  step_fn = combiner.step_fn(
    [s.run.method for s in slots],
    mesh,
    state,
    first_batch,
    rngs,
    parallel.put_global(active, replicated),
  )
  last_save = time.monotonic()
  every_secs = config.get("checkpoint_every_secs", 0.0)
  batch = first_batch

  def save_members(at_step, only=None):
    for i, slot in enumerate(slots):
      if (only is None and active[i]) or i == only:
        _save(slot, _member_state(state, i, slot.run), at_step)

  try:
    with train.sigterm_requests() as sigterm:
      while step < stop and active.any():
        if batch is None:
          batch = _put_batch(mesh, [next(it) for it in iterators])
        state, metrics = step_fn(
          state, batch, rngs, parallel.put_global(active, replicated)
        )
        batch = None
        pending.append(metrics)
        step += 1
        timed = every_secs > 0 and time.monotonic() - last_save >= every_secs
        timed, terminated = train._agreed(  # pylint: disable=protected-access
          (timed, sigterm.is_set()), step, config.log_every_steps
        )
        save = (
          step % config.checkpoint_every_steps == 0
          or step == stop
          or timed
          or terminated
        )
        stopping = []
        if save or step % config.log_every_steps == 0:
          fetched = [parallel.to_host(m) for m in pending]
          losses = []
          for i, slot in enumerate(slots):
            if not active[i]:
              continue
            summary = train.mean_metrics([_host_slice(m, i) for m in fetched])
            try:
              train.check_finite(
                summary, step - len(pending) + 1, step, slot.run.checkpointer
              )
            except NonFiniteLossError as e:
              active[i] = False
              slot.status, slot.error = "non_finite", str(e)
              logging_utils.warn(f"{slot.member.name} stopped: {e}")
              _write_status(slot)
              continue
            slot.step = step
            losses.append(summary["loss"])
            writers[i].write_scalars(step, summary)
            if summary.get("stop_training", 0) > 0:
              stopping.append(i)
          pending = []
          if losses:
            progress.update(
              done_before + (step - start) * len(slots),
              {"loss": float(np.mean(losses))},
            )
        if save:
          save_members(step)
          last_save = time.monotonic()
        for i in stopping:
          if not save:
            save_members(step, only=i)
          active[i] = False
          slots[i].status, slots[i].step = "stopped_early", step
          logging_utils.info(
            f"{slots[i].member.name}: early stopping at step {step} of {total}."
          )
        if terminated:
          for slot in slots:
            slot.run.checkpointer.wait()
          raise Interrupted(
            f"Stopped by SIGTERM at step {step} of {total}; saved every "
            "member's checkpoint. Run the same command again to continue."
          )
  except KeyboardInterrupt:
    for i, slot in enumerate(slots):
      slot.run.checkpointer.wait()
      if active[i] and step > (slot.run.checkpointer.latest_step() or 0):
        _save(slot, _member_state(state, i, slot.run), step)
    raise Interrupted(
      f"Interrupted at step {step} of {total}; saved every member that "
      "had a new step. Run the same command again to continue."
    ) from None
  finally:
    for writer in writers:
      writer.close()
    for slot in slots:
      slot.run.checkpointer.wait()
  for i, slot in enumerate(slots):
    if slot.status == "training":
      slot.status = "finished" if step >= total else "halted"
      slot.step = step
  return state


def _evaluate(slot: _Slot, state) -> dict:
  slot.run.checkpointer.wait()
  return evaluate.evaluate_run(
    slot.run, state, slot.run.checkpointer.latest_step()
  )


def run_sweep(
  config,
  workdir,
  classes="all",
  seeds=None,
  grid=(),
  stack_limit: int | None = None,
  combine: str = "auto",
  shard: tuple[int, int] = (0, 1),
  allow_config_change: bool = False,
) -> dict:
  """Trains and evaluates every member of a sweep; returns sweep_results.

  `classes`: 'all', '0,3,5', a list of ints or None (the config's class);
  `seeds`: a list of ints ('0,1,2' too) or None (the config's seed);
  `grid`: [(dotted key, [values])] or --grid strings ('key=v1,v2').
  """
  everyone, members = plan(
    config, workdir, classes, seeds, grid, stack_limit, shard
  )
  if not _spreads_over_hosts(len(members), shard):
    outcomes, halted = _train_members(
      config, members, stack_limit, combine, allow_config_change
    )
    return {} if halted else write_report(config, workdir, everyone, outcomes)
  mine = shard_members(members, jax.process_index(), jax.process_count())
  with parallel.host_local():
    outcomes, halted = _train_members(
      config, mine, stack_limit, combine, allow_config_change
    )
  if _all_finished_training(workdir, halted):
    return {}
  # Every process reads the others' members from disk; process 0 writes.
  with parallel.host_local():
    return write_report(
      config, workdir, everyone, outcomes, write=jax.process_index() == 0
    )


def _spreads_over_hosts(num_members: int, shard: tuple[int, int]) -> bool:
  """Whether each process trains its own members on its own devices:
  under several processes, without --shard, with a member for each."""
  count = jax.process_count()
  return count > 1 and tuple(shard) == (0, 1) and num_members >= count


def _all_finished_training(workdir, halted: bool) -> bool:
  """Waits for every process's members (their files are then written);
  whether any process halted."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  flags = multihost_utils.process_allgather(np.int32(halted))
  multihost_utils.sync_global_devices(f"jax_oneclass sweep {workdir}")
  return bool(np.any(flags))


def _train_members(
  config, members, stack_limit, combine: str, allow_config_change: bool
):
  """Trains and evaluates `members` in stacked programs: ({member workdir:
  (status, results or None, error)}, whether a member halted)."""
  combiner = _Combiner(combine)
  outcomes = {}  # Member workdir -> (status, results or None, error).
  todo = []
  for member in members:
    total = run_lib.resolve_duration(
      member.config, data.dataset_info(member.config)
    ).num_train_steps
    results = _finished_results(member, total)
    if results is not None:
      logging_utils.info(f"{member.name}: finished, skipped.")
      status = (_read_json(_status_path(member)) or {}).get(
        "status", "finished"
      )
      outcomes[member.workdir] = (status, results, "")
    else:
      todo.append(member)

  by_config = {}
  for member in todo:
    by_config.setdefault(static_key(member.config), []).append(member)
  halted = False
  total_work = _remaining_work(todo)
  progress = logging_utils.Progress(
    total_work, 0, config.batch_size, config.get("progress_bar", True)
  )
  done = 0
  try:
    for group_members in by_config.values():
      with contextlib.ExitStack() as locks:
        # One writer per member folder, as a single run takes.
        for member in group_members:
          locks.enter_context(workdir_lock.held(member.workdir, "training"))
        # Built per static config: methods set process-wide modes (conv).
        prepared = [_prepare(m, allow_config_change) for m in group_members]
        slots = [p[0] for p in prepared]
        states = [p[1] for p in prepared]
        firsts = [p[2] for p in prepared]
        iterators = [p[3] for p in prepared]
        try:
          for indices in _group_slots(slots, states, firsts, stack_limit):
            program = [slots[i] for i in indices]
            to_train = [
              i
              for i in indices
              if _trained_step(
                slots[i].member,
                slots[i].run.config.num_train_steps,
                slots[i].run.checkpointer.latest_step(),
              )
              is None
            ]
            stacked = None
            if to_train:
              program = [slots[i] for i in to_train]
              stacked = train_program(
                program,
                [states[i] for i in to_train],
                [firsts[i] for i in to_train],
                [iterators[i] for i in to_train],
                combiner,
                progress,
                done,
              )
              done += len(program) * (
                program[0].run.config.num_train_steps - program[0].start_step
              )
            for i in indices:
              slot = slots[i]
              if i in to_train:
                member_state = _member_state(
                  stacked, to_train.index(i), slot.run
                )
              else:  # Trained, not yet evaluated: its checkpoint.
                member_state, slot.step = run_lib.restore_latest(slot.run)
                slot.status = (_read_json(_status_path(slot.member)) or {}).get(
                  "status", "finished"
                )
              if slot.status == "halted":
                halted = True
              if slot.status in ("finished", "stopped_early"):
                results = _evaluate(slot, member_state)
                outcomes[slot.member.workdir] = (slot.status, results, "")
              else:
                outcomes[slot.member.workdir] = (slot.status, None, slot.error)
              _write_status(slot)
        finally:
          for slot in slots:
            slot.run.checkpointer.close()
  finally:
    progress.close()
  return outcomes, halted


def _remaining_work(members: list[Member]) -> int:
  """Member-steps left (an estimate for the progress bar)."""
  work = 0
  for member in members:
    total = member.config.num_train_steps
    if total <= 0:
      continue
    work += total - (_latest_step(member) or 0)
  return max(work, 1)


def plan(config, workdir, classes, seeds, grid, stack_limit, shard):
  """(every member of the sweep, this job's shard of them), checked."""
  sweep_cli.check_stack(stack_limit)
  everyone = members_for_report(config, workdir, classes, seeds, grid)
  index, count = shard
  return everyone, shard_members(everyone, index, count)


def members_for_report(config, workdir, classes, seeds, grid) -> list:
  """Every member of the sweep (all shards)."""
  if grid and isinstance(grid[0], str):
    grid = parse_grid(grid, config)
  seeds = sweep_cli.resolve_seeds(config, seeds)
  return make_members(
    config, workdir, resolve_classes(config, classes), seeds, grid
  )


# --- Report -------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample std (0 for one value)."""
  values = np.asarray(values, np.float64)
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return float(np.mean(values)), std


def reference_results(method: str, data_name: str) -> list[dict]:
  """Published numbers for (method, data set) from reference_results.json."""
  entries = json.loads(REFERENCE_FILE.read_text())["results"]
  return [
    e for e in entries if e["method"] == method and e["data"] == data_name
  ]


def summarise_scorer(rows: dict) -> dict:
  """{row: {seed: auroc}} -> per row the seeds' values, their mean and
  std, and the overall mean over rows +- the std over seeds of the
  per-seed mean over rows (seeds that have every row only)."""
  per_row = {
    r: {
      "seeds": {str(s): x for s, x in v.items()},
      **dict(zip(("mean", "std"), _mean_std(list(v.values())))),
    }
    for r, v in rows.items()
    if v
  }
  seeds = sorted({s for v in rows.values() for s in v})
  complete = [s for s in seeds if all(s in v for v in rows.values())]
  per_seed = {
    str(s): float(np.mean([v[s] for v in rows.values()])) for s in complete
  }
  overall = None
  if per_row:
    mean = float(np.mean([r["mean"] for r in per_row.values()]))
    std = _mean_std(list(per_seed.values()))[1] if per_seed else 0.0
    overall = {"mean": mean, "std": std, "seed_means": per_seed}
  return {"rows": per_row, "overall": overall}


def _section(member: Member) -> str:
  """The grid point a member's table belongs to ('' without a grid);
  MVTec categories are rows, not sections."""
  return ",".join(f"{k}={v}" for k, v in member.grid if k != "data.category")


def _row(member: Member, names) -> str:
  for key, value in member.grid:
    if key == "data.category":
      return str(value)
  name = names[member.normal_class]
  c = member.normal_class
  return str(c) if name == str(c) else f"{c} ({name})"


def write_report(
  config, workdir, members: list[Member], outcomes: dict, write: bool = True
):
  """sweep_results.json, sweep_table.md and sweep_auroc.png from every
  member's results (this job's `outcomes`, others' results.json); with
  `write` False only returns the report."""
  workdir = Path(workdir)
  names = class_names(config)
  entries, sections = [], {}
  for member in members:
    status, results, error = outcomes.get(member.workdir, (None, None, ""))
    if status is None:  # Another shard's member: read what it wrote.
      total = run_lib.resolve_duration(
        member.config, data.dataset_info(member.config)
      ).num_train_steps
      results = _finished_results(member, total)
      saved = _read_json(_status_path(member)) or {}
      status = (
        saved.get("status", "missing") if results or saved else ("missing")
      )
      error = saved.get("error", "")
    entries.append(
      {
        "class": member.normal_class,
        "seed": member.seed,
        "grid": {k: v for k, v in member.grid},
        "workdir": str(member.workdir.relative_to(workdir)),
        "status": status,
        "error": error,
        "step": results["step"] if results else None,
        "scorer": results["scorer"] if results else None,
        "auroc": results["auroc"] if results else {},
        **(
          {
            "localization": {
              k: {m: v[m] for m in ("pixel_auroc", "aupro")}
              for k, v in results["localization"].items()
            }
          }
          if results and "localization" in results
          else {}
        ),
      }
    )
    if results:
      section = sections.setdefault(_section(member), {})
      for scorer, value in results["auroc"].items():
        section.setdefault(scorer, {}).setdefault(_row(member, names), {})[
          member.seed
        ] = value
  headline = next((e["scorer"] for e in entries if e["scorer"]), None)
  summary = {
    section: {
      scorer: summarise_scorer(rows) for scorer, rows in sorted(scorers.items())
    }
    for section, scorers in sections.items()
  }
  report = {
    "method": config.method,
    "data": config.data.name,
    "headline_scorer": headline,
    "seeds": sorted({m.seed for m in members}),
    "members": entries,
    "summary": summary,
    "reference": reference_results(config.method, config.data.name),
    "notes": "AUROC as fractions. Per row: mean and sample std over "
    "seeds; overall: mean over rows, std over seeds of the "
    "per-seed mean over rows.",
  }
  if write:
    logging_utils.write_json(workdir / RESULTS_FILE, report)
  if write and logging_utils.is_main_process():
    (workdir / TABLE_FILE).write_text(format_table(report))
    if headline is not None:
      plot_report(report, workdir / PLOT_FILE)
  return report


def _percent(mean, std=None) -> str:
  text = f"{100 * mean:.1f}"
  return text if std is None else f"{text} ± {100 * std:.1f}"


def format_table(report: dict) -> str:
  """Markdown: per grid point, classes x seeds of the headline AUROC (%)."""
  headline = report["headline_scorer"]
  seeds = report["seeds"]
  lines = [f"# Sweep: {report['method']} on {report['data']}", ""]
  problems = [
    m
    for m in report["members"]
    if m["status"] not in ("finished", "stopped_early")
  ]
  done = len(report["members"]) - len(problems)
  lines.append(
    f"{done} of {len(report['members'])} members finished. "
    f"Image AUROC (%) of the headline scorer `{headline}`; mean "
    "± sample std over seeds; overall: mean over rows ± std "
    "over seeds of the per-seed mean."
  )
  references = report["reference"]
  for section, scorers in report["summary"].items():
    if headline not in scorers:
      continue
    lines += ["", f"## {section}" if section else "## Results", ""]
    per = scorers[headline]
    header = ["class", *(f"seed {s}" for s in seeds), "mean ± std"]
    if references:
      header.append("published")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row_name, stats in per["rows"].items():
      cells = [
        row_name,
        *(
          _percent(stats["seeds"][str(s)]) if str(s) in stats["seeds"] else "-"
          for s in seeds
        ),
        _percent(stats["mean"], stats["std"]),
      ]
      if references:
        cells.append("")
      lines.append("| " + " | ".join(cells) + " |")
    overall = per["overall"]
    cells = [
      "**overall**",
      *(
        _percent(overall["seed_means"][str(s)])
        if str(s) in overall["seed_means"]
        else "-"
        for s in seeds
      ),
      _percent(overall["mean"], overall["std"]),
    ]
    if references:
      cells.append(
        "; ".join(f"{r['value']:g} [{i + 1}]" for i, r in enumerate(references))
      )
    lines.append("| " + " | ".join(cells) + " |")
  if references:
    lines += ["", "Published:"]
    lines += [
      f"[{i + 1}] {r['source']}, {r['table']}: {r['value']:g} "
      f"{r['metric']} ({r['setting']})."
      for i, r in enumerate(references)
    ]
  if problems:
    lines += ["", "Not finished:"]
    lines += [
      f"- {m['workdir']}: {m['status']}"
      + (f" ({m['error'].split('. ')[0]})" if m["error"] else "")
      for m in problems
    ]
  return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> None:
  """Per row: the headline AUROC's mean over seeds, its std as an error
  bar and each seed as a dot; one panel per grid point."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  headline = report["headline_scorer"]
  sections = [
    (s, v[headline]) for s, v in report["summary"].items() if headline in v
  ]
  if not sections:
    return
  fig, axes = plt.subplots(
    len(sections), 1, squeeze=False, figsize=(8, 3 * len(sections))
  )
  for ax, (section, per) in zip(axes[:, 0], sections):
    rows = list(per["rows"])
    means = [per["rows"][r]["mean"] for r in rows]
    stds = [per["rows"][r]["std"] for r in rows]
    x = np.arange(len(rows))
    ax.bar(x, means, yerr=stds, capsize=3, color="#8fb3d9")
    for i, r in enumerate(rows):
      dots = list(per["rows"][r]["seeds"].values())
      ax.plot([i] * len(dots), dots, "k.")
    ax.set_xticks(x, rows, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(min(0.5, min(means) - 0.05), 1.0)
    ax.set_ylabel(f"AUROC ({headline})", fontsize=8)
    ax.set_title(
      f"{report['method']} on {report['data']}"
      + (f", {section}" if section else "")
      + f": mean {per['overall']['mean']:.3f}",
      fontsize=9,
    )
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


# --- Command line (flags and checks: sweep_cli) -------------------------------


def run_checked(values, config, classes, shard) -> None:
  """The sweep of the command line, once sweep_cli checked its input."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from jax_oneclass.errors import OneClassError  # pylint: disable=g-import-not-at-top

  if not values.verbose:
    logging.set_verbosity(logging.WARNING)
    logging_utils.quiet_libraries()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")
  try:
    parallel.initialize_distributed(
      values.coordinator_address, values.num_processes, values.process_id
    )
    args = (config, values.workdir, classes, values.seeds, list(values.grid))
    if values.report_only:
      report = write_report(
        config, values.workdir, members_for_report(*args), {}
      )
    else:
      report = run_sweep(
        *args,
        stack_limit=values.stack,
        combine=values.combine,
        shard=shard,
        allow_config_change=values.allow_config_change,
      )
  except OneClassError as e:
    if values.debug:
      raise
    logging.flush()
    print(f"\nerror: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:  # Outside training (it saves itself).
    if values.debug:
      raise
    print(
      "\nerror: Interrupted (Ctrl-C) outside training, e.g. while "
      "evaluating a member; every finished checkpoint is kept. Run the "
      "same command again to continue.",
      file=sys.stderr,
    )
    sys.exit(2)
  if parallel.process_index() == 0:
    if not report:
      print("Sweep halted early (config.halt_after_step); rerun to go on.")
      return
    print(format_table(report))
    print(f"Results: {Path(values.workdir) / RESULTS_FILE}")
