"""Runs a few training steps and prints their losses as JSON.

test_parallel.py starts it in a subprocess, so that XLA_FLAGS can give it
another number of (virtual CPU) devices, and calls `run_steps` in its own
one-device process.
"""

import json
import sys

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


if __name__ == "__main__":
  print(json.dumps(run_steps(sys.argv[1], int(sys.argv[2]), sys.argv[3])))
