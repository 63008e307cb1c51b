"""How far a sweep member drifts from its single run, against how far the
single run drifts from itself after a one-ulp nudge.

  PYTHONPATH=$PWD python experiments/rounding_sensitivity.py \
      --config=configs/disaug.py:folder,folder=<cifar10-jpeg> \
      --set=model.width=32 --steps=32 --name=cifar10_disaug

Three trajectories train from the same initial state on the same batches
(one normal class, its seeded order) with the same key:
  single   the single run's jitted step (`train.jit_train_step`);
  nudged   the same step from parameters multiplied by (1 + 2**-23), one
           float32 ulp at 1;
  member   member 0 of `--members` copies stacked in one unrolled sweep
           program (`sweep.unrolled_step`, the form `--combine=auto` takes
           on this CPU).
At chosen steps it prints max |nudged - single| and max |member - single|
over the parameters (absolute, and relative to the leaf's largest |value|
over leaves larger than 1e-3). If a one-ulp nudge grows as fast as the
member's difference, no two differently compiled programs (another fusion,
CPU or jaxlib) can agree after that many steps, and the member is as close
to its single run as float32 allows. Writes
experiments/results/rounding_sensitivity_<name>.json and its section of
RESULTS.md.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top
import jax
import jaxlib
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import common, measure
from jax_oneclass import config as config_lib
from jax_oneclass import data, parallel, sweep, train
from jax_oneclass import run as run_lib

# pylint: enable=g-import-not-at-top

REPORT_STEPS = (1, 2, 3, 4, 6, 8, 16, 32, 64, 128)


def _parameter_leaves(state):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(state.params)]


def difference(state, reference) -> tuple[float, float]:
  """(max absolute, max relative to the leaf's largest |value|) difference
  of the parameters; the relative one over leaves above 1e-3 only."""
  pairs = list(
    zip(
      _parameter_leaves(jax.device_get(state)),
      _parameter_leaves(jax.device_get(reference)),
      strict=True,
    )
  )
  absolute = max(float(np.max(np.abs(a - b))) for a, b in pairs)
  relative = max(
    float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    for a, b in pairs
    if np.max(np.abs(b)) > 1e-3
  )
  return absolute, relative


def trajectories(config, steps: int, members: int) -> list[dict]:
  """The three trajectories' differences at REPORT_STEPS up to `steps`."""
  workdir = Path(tempfile.mkdtemp(prefix="rounding_sensitivity_"))
  run = run_lib.setup(config, workdir)
  try:
    single_state, _ = run_lib.restore_or_init(run)
  finally:
    run.checkpointer.close()
  nudged_state = sweep._copy(single_state)  # pylint: disable=protected-access
  nudged_state = nudged_state.replace(
    params=jax.tree.map(lambda p: p * (1 + 2.0**-23), nudged_state.params)
  )
  single_step = train.jit_train_step(run.method, run.mesh)
  mesh = sweep.sweep_mesh(members, config.batch_size)
  program = sweep.jit_stacked(sweep.unrolled_step([run.method] * members), mesh)
  stacked = sweep._put_members(  # pylint: disable=protected-access
    mesh, sweep.stack([jax.device_get(single_state)] * members)
  )
  rng = jax.random.key(config.seed + 1)
  rngs = sweep._put_members(mesh, sweep.stack([rng] * members))  # pylint: disable=protected-access
  active = parallel.put_global(np.ones(members, bool), NamedSharding(mesh, P()))
  batches = data.train_batches(run.config, 0)
  rows = []
  for step in range(1, steps + 1):
    host = next(batches)
    batch = parallel.shard_batch(run.mesh, host)
    single_state, metrics = single_step(single_state, batch, rng)
    nudged_state, _ = single_step(nudged_state, batch, rng)
    stacked, _ = program(
      stacked,
      sweep._put_batch(mesh, [host] * members),  # pylint: disable=protected-access
      rngs,
      active,
    )
    if step in REPORT_STEPS or step == steps:
      member = sweep.unstack(stacked, 0)
      nudged_abs, nudged_rel = difference(nudged_state, single_state)
      member_abs, member_rel = difference(member, single_state)
      row = {
        "step": step,
        "loss": float(metrics["loss"]),
        "nudged_abs": nudged_abs,
        "nudged_rel": nudged_rel,
        "member_abs": member_abs,
        "member_rel": member_rel,
      }
      print(
        f"step {step}: one-ulp nudge {nudged_abs:.3g} ({nudged_rel:.3g} "
        f"of a leaf), member {member_abs:.3g} ({member_rel:.3g})",
        flush=True,
      )
      rows.append(row)
  shutil.rmtree(workdir, ignore_errors=True)
  return rows


def render(result: dict) -> str:
  lines = [
    f"## Rounding sensitivity: a member against a one-ulp nudge "
    f"({result['name']})",
    "",
    f"Command: `{result['command']}`. CPU {result['cpu']}, jaxlib "
    f"{result['jaxlib']}"
    + (
      f", load {' '.join(f'{x:.2f}' for x in result['load_average'])} at "
      "the start"
      if "load_average" in result
      else ""
    )
    + ". From one initial state, on the same batches "
    "and key: the single run's step; the same step from parameters times "
    "(1 + 2^-23); member 0 of "
    f"{result['members']} in one unrolled sweep program. Max |difference| "
    "from the single run over the parameters (relative: to the leaf's "
    "largest |value|, leaves above 1e-3).",
    "",
    "| step | one-ulp nudge: abs | rel | member: abs | rel |",
    "|---|---|---|---|---|",
  ]
  for row in result["rows"]:
    lines.append(
      f"| {row['step']} | {row['nudged_abs']:.3g} | {row['nudged_rel']:.3g} "
      f"| {row['member_abs']:.3g} | {row['member_rel']:.3g} |"
    )
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--set", action="append", default=[])
  parser.add_argument("--steps", type=int, default=32)
  parser.add_argument("--members", type=int, default=3)
  parser.add_argument("--name", default="run")
  args = parser.parse_args()
  path, _, arg = args.config.partition(":")
  config = config_lib.load(
    path, arg or None, dict(s.split("=", 1) for s in args.set)
  )
  config.progress_bar = False
  machine = measure.machine()  # Before: its load shows what else ran.
  rows = trajectories(config, args.steps, args.members)
  result = {
    "name": args.name,
    "command": "PYTHONPATH=$PWD python experiments/rounding_sensitivity.py "
    + " ".join(
      [f"--config={args.config}"]
      + [f"--set={s}" for s in args.set]
      + [f"--steps={args.steps}", f"--members={args.members}"]
      + [f"--name={args.name}"]
    ),
    "cpu": machine["cpu"],
    "load_average": machine["load_average"],
    "jaxlib": jaxlib.__version__,
    "members": args.members,
    "rows": rows,
  }
  common.save_part(f"rounding_sensitivity_{args.name}", result)
  common.write_section(f"rounding_sensitivity_{args.name}", render(result))


if __name__ == "__main__":
  main()
