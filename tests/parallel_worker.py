"""Runs a few training steps of each method and prints their losses as JSON.

  python tests/parallel_worker.py clr,dgad 3 /tmp/workdirs

test_parallel.py starts it in a subprocess, so that XLA_FLAGS can give it
another number of (virtual CPU) devices, and calls `run_steps` in its own
one-device process. One subprocess runs every method: each start costs
seconds of importing TensorFlow and JAX.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np

from jax_oneclass import data, parallel, train
from jax_oneclass import run as run_lib
from tests.conftest import tiny_config


def run_steps(method: str, steps: int, workdir) -> dict:
  """Devices, per-step losses and the state's absolute sum after `steps`
  steps of `method`'s tiny config."""
  run = run_lib.setup(tiny_config(method, steps=steps), workdir)
  mesh = run.mesh
  state = run_lib.run_initial_state(run)
  step_fn = train.jit_train_step(run.method, mesh)
  batches = data.train_batches(run.config)
  losses = []
  for _ in range(steps):
    state, metrics = step_fn(
      state, parallel.shard_batch(mesh, next(batches)), jax.random.key(0)
    )
    losses.append(float(parallel.to_host(metrics["loss"])))
  # The whole state: parameters, BatchNorm statistics, optimiser states.
  state_sum = float(
    sum(
      np.abs(np.asarray(x)).sum()
      for x in jax.tree.leaves(parallel.to_host(state))
    )
  )
  run.checkpointer.close()
  return {
    "devices": jax.device_count(),
    "losses": losses,
    "state_abs_sum": state_sum,
  }


def main(argv) -> None:
  """Prints {method: `run_steps`} for argv's comma-separated methods, steps
  and root folder (a workdir per method)."""
  names, steps, root = argv[1].split(","), int(argv[2]), Path(argv[3])
  print(json.dumps({m: run_steps(m, steps, root / m) for m in names}))


if __name__ == "__main__":
  main(sys.argv)
