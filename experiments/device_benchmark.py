"""Per-method training-step speed on whatever device JAX sees, float32 and
bfloat16 (config.dtype): step time, images/s and model FLOP utilisation.

  PYTHONPATH=$PWD python experiments/device_benchmark.py           # real sizes
  PYTHONPATH=$PWD python experiments/device_benchmark.py --tiny    # CPU smoke

Each method's config (`configs/<method>.py`, CIFAR-10 sizes: 32 px; the
localising methods at `--map_size` px) trains on one fixed batch of random
images, `--steps` timed steps after `--warmup` (compiling) ones. FLOPs per
step come from XLA's cost analysis of the compiled step; utilisation is
FLOPs / step time / the device's peak for that dtype: the vendor's dense
figure for known accelerators (PEAK_TFLOPS), otherwise (CPUs) the rate of
a 2048^3 matrix product in that dtype measured here, so on a CPU it reads
'fraction of what a large GEMM reaches'. Writes
experiments/results/device_benchmark.json and its RESULTS.md section.
"""

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common, measure  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-order
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-order

from jax_oneclass import config as config_lib  # pylint: disable=g-import-not-at-top
from jax_oneclass import data, methods, parallel  # pylint: disable=g-import-not-at-top
from jax_oneclass import run as run_lib  # pylint: disable=g-import-not-at-top
from jax_oneclass import errors, train  # pylint: disable=g-import-not-at-top

SCRIPT = "python experiments/device_benchmark.py"
# Dense peak TFLOP/s by device_kind substring: (float32, bfloat16). float32
# is the plain (non-tensor-core) rate; XLA runs float32 matmuls at
# 'default' precision, which on NVIDIA GPUs may use TF32 tensor cores, so
# float32 utilisation can exceed 1 there.
PEAK_TFLOPS = {
    "H200": (67.0, 989.0), "H100": (67.0, 989.0), "A100": (19.5, 312.0),
    "L4": (30.3, 121.0), "TPU v4": (137.5, 275.0), "TPU v5e": (98.5, 197.0),
}
LOCALISING = ("reverse_distillation", "gradient_preference")
TINY = {"model.width": 8, "model.stage_sizes": (1, 1),
        "model.head_dims": (16, 8), "model.latent_size": 8,
        "model.backbone": "resnet18", "model.mlp_widths": (16, 8)}


def peak_flops(dtype: str) -> tuple[float, str]:
  """(peak FLOP/s of the default device for `dtype`, where it came from)."""
  kind = jax.devices()[0].device_kind
  for name, peaks in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return peaks[dtype == "bfloat16"] * 1e12, f"{name} datasheet"
  n = 2048
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n**3 / best, f"measured {n}^3 {dtype} GEMM"


def _overrides(method: str, args, dtype: str) -> dict:
  """Config overrides of one row; only keys the config has."""
  config = common.config_with(method, "cifar10")
  wanted = {"dtype": dtype, "num_train_steps": 1000}
  if method in LOCALISING:
    wanted["data.image_size"] = args.map_size
  if args.tiny:
    wanted.update(TINY)
    # The smallest side each network takes: RD halves 5 times, DCGAN
    # pyramids need a power of two >= 16; the CIFAR ResNet takes any.
    wanted["data.image_size"] = (32 if method in LOCALISING else
                                 16 if method in ("ganomaly", "dgad") else 8)
  if args.batch_size:
    wanted["batch_size"] = args.batch_size
  out = {}
  for key, value in wanted.items():
    try:
      config_lib.current_value(config, key)
      out[key] = value
    except errors.ConfigError:
      continue
  return out


def measure_row(method: str, dtype: str, args) -> dict:
  """Step time, images/s, FLOPs and utilisation of one method and dtype."""
  config = common.config_with(method, "cifar10",
                              _overrides(method, args, dtype))
  size, channels = config.data.image_size, config.data.channels
  info = types.SimpleNamespace(image_shape=(size, size, channels),
                               num_train=5000, class_names=("a", "b"),
                               epoch_size=data.examples_per_epoch(config,
                                                                  5000))
  method_obj = methods.get_method(config, info)
  views = config.data.num_views
  mesh = parallel.make_mesh()
  step_fn = train.jit_train_step(method_obj, mesh)
  state = run_lib.initial_state(method_obj, info.image_shape, mesh, 0)
  images = jax.random.uniform(jax.random.key(0),
                              (config.batch_size, views) + info.image_shape)
  batch = parallel.shard_batch(mesh, {"image": images})
  rng = jax.random.key(1)
  compiled = step_fn.lower(state, batch, rng).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  box = {"state": state}

  def step():
    box["state"], metrics = step_fn(box["state"], batch, rng)
    jax.block_until_ready(metrics)
    box["loss"] = float(metrics["loss"])

  timing = measure.time_steps(step, args.steps, args.warmup,
                                       config.batch_size * views, "images")
  seconds = timing["step_ms_median"] / 1000
  peak, source = peak_flops(dtype)
  return {"batch_size": config.batch_size, "views": views,
          "image_size": size, "step_ms_median": timing["step_ms_median"],
          "images_per_sec": config.batch_size * views / seconds,
          "step_gflop": flops / 1e9, "achieved_tflops": flops / seconds / 1e12,
          "peak_tflops": peak / 1e12, "peak_source": source,
          "mfu": flops / seconds / peak, "final_loss": box["loss"],
          "warmup_s_incl_compile": timing["warmup_s_incl_compile"]}


def render(part: dict) -> str:
  """The device-benchmark section of RESULTS.md."""
  lines = ["## Device benchmark (per method, float32 and bfloat16)", "",
           f"`PYTHONPATH=$PWD {part['command']}` on {part['device']} "
           f"({part['cpu']}; load {part['load_before']:.1f} before). "
           "FLOPs: XLA's cost analysis of the compiled step; MFU = FLOPs / "
           "median step time / peak (its source in the last column).", "",
           "| method | dtype | batch x views, px | step ms | images/s | "
           "GFLOP/step | TFLOP/s | MFU | final loss | peak |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for key, r in part["rows"].items():
    method, dtype = key.split("/")
    if "error" in r:
      lines.append(f"| {method} | {dtype} | error: {r['error'][:120]} "
                   "|||||||| |")
      continue
    lines.append(
        f"| {method} | {dtype} | {r['batch_size']} x {r['views']}, "
        f"{r['image_size']} | {r['step_ms_median']:.1f} | "
        f"{r['images_per_sec']:.0f} | {r['step_gflop']:.2f} | "
        f"{r['achieved_tflops']:.3f} | {100 * r['mfu']:.1f}% | "
        f"{r['final_loss']:.4f} | {r['peak_source']} "
        f"{r['peak_tflops']:.2f} TFLOP/s |")
  lines.append("")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default=",".join(methods.available_methods()))
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--batch_size", type=int, default=0,
                      help="0: each config's own.")
  parser.add_argument("--map_size", type=int, default=256,
                      help="Image side of the localising methods.")
  parser.add_argument("--tiny", action="store_true",
                      help="Tiny networks and images (a CPU smoke run).")
  parser.add_argument("--out", default="device_benchmark",
                      help="Results name under experiments/results/.")
  args = parser.parse_args()
  os.chdir(common.ROOT)
  from experiments import training_speed  # pylint: disable=g-import-not-at-top
  command = " ".join([SCRIPT, f"--methods={args.methods}",
                      f"--dtypes={args.dtypes}", f"--steps={args.steps}",
                      f"--warmup={args.warmup}",
                      f"--batch_size={args.batch_size}",
                      f"--map_size={args.map_size}"]
                     + (["--tiny"] if args.tiny else []))
  part = {"command": command, "device": str(jax.devices()[0].device_kind),
          "backend": jax.default_backend(), "cpu": training_speed.cpu_model(),
          "load_before": os.getloadavg()[0], "rows": {}}
  for method in args.methods.split(","):
    for dtype in args.dtypes.split(","):
      try:
        row = measure_row(method, dtype, args)
      except Exception as e:  # pylint: disable=broad-except
        row = {"error": f"{type(e).__name__}: {e}"}
      part["rows"][f"{method}/{dtype}"] = row
      print(method, dtype, json.dumps(row), flush=True)
  common.save_part(args.out, part)
  print(common.write_section(args.out, render(part)))


if __name__ == "__main__":
  main()
