"""Runs a few training steps and prints their losses as JSON.

Started by test_parallel.py in a subprocess, so that XLA_FLAGS can give it
a different number of (virtual CPU) devices.
"""

import json
import sys

import jax
import numpy as np

from jax_oneclass import data, parallel, train
from jax_oneclass import run as run_lib
from tests.conftest import tiny_config


def main(method: str, steps: int, workdir: str) -> None:
  run = run_lib.setup(tiny_config(method, steps=steps), workdir)
  mesh = run.mesh
  state = run_lib.run_initial_state(run)
  step_fn = train.jit_train_step(run.method, mesh)
  batches = data.train_batches(run.config)
  losses = []
  for _ in range(steps):
    state, metrics = step_fn(state, parallel.shard_batch(mesh, next(batches)),
                             jax.random.key(0))
    losses.append(float(parallel.to_host(metrics["loss"])))
  # The whole state: parameters, BatchNorm statistics, optimiser states.
  state_sum = float(sum(np.abs(np.asarray(x)).sum()
                        for x in jax.tree.leaves(parallel.to_host(state))))
  print(json.dumps({"devices": jax.device_count(), "losses": losses,
                    "state_abs_sum": state_sum}))


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
