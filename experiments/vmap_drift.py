"""How far one vmapped sweep step is from the unrolled one, leaf by leaf.

  PYTHONPATH=$PWD python experiments/vmap_drift.py --conv_weight_grad=xla

Two members (normal classes 0 and 1, seeds 0 and 1) of a config's preset
take one stacked training step as `jax.vmap(train_step)` and as the
per-member steps unrolled (`sweep.vmap_step` / `sweep.unrolled_step`, the
two forms `--combine` chooses between), from the same states, batches and
keys. Prints the leaves with the largest |vmap - unrolled| beside the
largest |unrolled| of that leaf, then the same for the unrolled step taken
from parameters nudged by one float32 ulp (times 1 + 2^-23): what rounding
alone does to this step. A vmap difference far above the nudge's means the
two forms compute different things; one of its size is rounding that the
step amplifies.
"""

import argparse
import json
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


def _nudged(state):
  """`state` with every parameter times (1 + 2**-23): one float32 ulp."""
  return state.replace(
    params=jax.tree.map(lambda p: p * (1 + 2.0**-23), state.params)
  )


def _largest(a, b, top: int):
  """[(max |a - b|, max |b|, leaf)], the largest differences first."""
  rows = []
  for (path, x), y in zip(
    jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
  ):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if np.issubdtype(x.dtype, np.floating) and x.size:
      rows.append(
        (
          float(np.max(np.abs(x - y))),
          float(np.max(np.abs(y))),
          jax.tree_util.keystr(path),
        )
      )
  return sorted(rows, reverse=True)[:top]


def drift(method_name: str, arg: str, conv_weight_grad: str, top: int = 5):
  """{'vmap': rows, 'nudged': rows, 'loss': {form: [per member]}}: after one
  step, the leaves that differ most from the unrolled step's, for the
  vmapped step and for the unrolled step from parameters nudged by one
  ulp (what rounding alone can do to this step)."""
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
    "vmap": (sweep.vmap_step(method), state),
    "unrolled": (sweep.unrolled_step([method, method]), state),
    "nudged": (sweep.unrolled_step([method, method]), _nudged(state)),
  }
  out, loss = {}, {}
  for name, (step, start) in forms.items():
    fn = sweep.jit_stacked(step, stacked_mesh)
    copy = sweep._copy(start)  # pylint: disable=protected-access
    new, metrics = jax.device_get(fn(copy, batch, rngs, active))
    out[name] = new
    loss[name] = [float(x) for x in np.asarray(metrics["loss"])]
  return {
    "vmap": _largest(out["vmap"], out["unrolled"], top),
    "nudged": _largest(out["nudged"], out["unrolled"], top),
    "loss": loss,
  }


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
  result = drift(args.method, args.arg, args.conv_weight_grad)
  print("  loss per member: " + json.dumps(result["loss"]))
  for form, title in (
    ("vmap", "vmap vs unrolled"),
    ("nudged", "unrolled from parameters x (1 + 2^-23) vs unrolled"),
  ):
    print(f"  {title}:")
    for diff, scale, leaf in result[form]:
      print(
        f"    {diff:.3g} of {scale:.3g} ({diff / max(scale, 1e-30):.2%})"
        f"  {leaf}"
      )


if __name__ == "__main__":
  main()
