"""How far one vmapped sweep step is from the unrolled one, leaf by leaf.

  PYTHONPATH=$PWD python experiments/vmap_drift.py --conv_weight_grad=xla

Two members (normal classes 0 and 1, seeds 0 and 1) of a config's preset
take one stacked training step as `jax.vmap(train_step)` and as the
per-member steps unrolled (`sweep.vmap_step` / `sweep.unrolled_step`, the
two forms `--combine` chooses between), from the same states, batches and
keys. Prints the leaves with the largest |vmap - unrolled| beside the
largest |unrolled| of that leaf. Rounding alone gives relative differences
near 1e-6; more means the two forms compute different things.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top
import jax
import numpy as np

from jax_oneclass import config as config_lib
from jax_oneclass import data, methods, parallel, sweep
from jax_oneclass import run as run_lib

# pylint: enable=g-import-not-at-top


def drift(method_name: str, arg: str, conv_weight_grad: str, top: int = 5):
  """[(max |vmap - unrolled|, max |unrolled|, leaf)] after one step, the
  largest differences first."""
  config = config_lib.load(method_name, arg)
  config.conv_weight_grad = conv_weight_grad
  info = data.dataset_info(config)
  method = methods.get_method(config, info)
  mesh = parallel.make_mesh()
  states, batches = [], []
  for member in (0, 1):
    states.append(run_lib.initial_state(method, info.image_shape, mesh, member))
    config.data.normal_class = member
    batches.append(next(data.train_batches(config)))
  stacked_mesh = sweep.sweep_mesh(2, config.batch_size)
  state = sweep.stack(states)
  batch = sweep._put_batch(stacked_mesh, batches)  # pylint: disable=protected-access
  rngs = sweep.stack([jax.random.key(1), jax.random.key(2)])
  active = np.ones(2, bool)
  forms = {
    "vmap": sweep.vmap_step(method),
    "unrolled": sweep.unrolled_step([method, method]),
  }
  out = {}
  for name, step in forms.items():
    fn = sweep.jit_stacked(step, stacked_mesh)
    copy = sweep._copy(state)  # pylint: disable=protected-access
    out[name] = jax.device_get(fn(copy, batch, rngs, active)[0])
  rows = []
  for (path, v), u in zip(
    jax.tree_util.tree_leaves_with_path(out["vmap"]),
    jax.tree.leaves(out["unrolled"]),
  ):
    v, u = np.asarray(v, np.float64), np.asarray(u, np.float64)
    if np.issubdtype(v.dtype, np.floating) and v.size:
      rows.append(
        (
          float(np.max(np.abs(v - u))),
          float(np.max(np.abs(u))),
          jax.tree_util.keystr(path),
        )
      )
  return sorted(rows, reverse=True)[:top]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--method", default="disaug")
  parser.add_argument("--arg", default="digits")
  parser.add_argument("--conv_weight_grad", default="xla")
  args = parser.parse_args()
  print(
    f"{args.method}:{args.arg}, conv_weight_grad={args.conv_weight_grad}; "
    f"jax {jax.__version__}"
  )
  for diff, scale, leaf in drift(args.method, args.arg, args.conv_weight_grad):
    print(
      f"  {diff:.3g} of {scale:.3g} ({diff / max(scale, 1e-30):.2%})  {leaf}"
    )


if __name__ == "__main__":
  main()
