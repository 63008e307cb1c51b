"""Training and inference speed: ours, and ours against PyTorch/anomalib.

  python experiments/speed.py steps --rows=disaug,rotnet,ganomaly,rd_resnet18 \\
      --torch_python=$TORCH_PYTHON --json=/tmp/steps.json
  python experiments/speed.py device            # every method, real sizes
  python experiments/speed.py device --tiny     # a CPU smoke run
  python experiments/speed.py end_to_end --checkouts=/work/main,$PWD
  python experiments/speed.py inference --models=rd_resnet18,rd_wrn50,ganomaly
  python experiments/speed.py report            # only re-render

Parts:

  steps       per row, our jitted train step and the PyTorch equivalent on
              one fixed batch of random images (no input pipeline), each
              `--rounds` times in a fresh process, the sides alternating;
              per side the medians over every timed step of CPU seconds
              (time.process_time, all threads) and wall seconds. The torch
              side runs with OMP_WAIT_POLICY=PASSIVE; without a torch
              Python, ours alone. Each row also has each side's peak RSS
              (the highest of its processes). With `--profile=N` our
              processes trace N more steps and record XLA:CPU's operation
              seconds per step by kind (experiments/op_profile.py). Rows:
                disaug, rotnet  CIFAR ResNet-18 (width 64, 32 px) + head;
                                torch side torch/torch_two_stage.py
                rd_resnet18, rd_wide_resnet50_2  reverse distillation;
                                torch/anomalib_localization.py rd_throughput
                ganomaly        DCGAN GANomaly (32 px, width 64, latent 100);
                                torch/anomalib_ganomaly.py throughput
  device      per method and dtype (config.dtype), on whatever device JAX
              sees: step time, images/s and model FLOP utilisation (XLA's
              cost analysis / the device's peak: the datasheet's for known
              accelerators, a measured 2048^3 GEMM on CPUs).
  end_to_end  wall time of the quickstart (DisAug on digits, train + eval)
              and optionally a short CIFAR-10 class run, fresh processes
              alternating between git checkouts (before / after).
  inference   a trained detector: batch-1 latency and batched images/s of
              our Detector (jit) and ONNX export against anomalib's
              TorchInferencer and ONNX export (torch/anomalib_inference.py),
              each in a fresh process, alternating; `inference_sweep` gives
              our score's per-image cost at several batch sizes.

The convolution mode and the dtype are config keys (`--conv_weight_grad`,
`--dtype`); under the default mode 'auto', `steps` prints per row and
process how many convolutions of each operation took each path. With `--json=PATH` a part writes its raw
figures there only; without, to experiments/results/ and its RESULTS.md
section.
"""

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments import measure  # pylint: disable=g-import-not-at-top,wrong-import-position

SCRIPT = "python experiments/speed.py"
TORCH_DIR = ROOT / "experiments" / "torch"
DEFAULT_ROWS = "disaug,rotnet,rd_resnet18,rd_wide_resnet50_2,ganomaly"
# anomalib's OCBE has width_per_group 64 for every backbone; ours matches.
OCBE_WIDTH = 64
# The MLP heads of configs/disaug.py and configs/rotnet.py, for the torch twin.
HEAD_DIMS = {"disaug": (512,) * 8 + (128,), "rotnet": (512,) * 8}
# Each process's figures kept in a `steps` row's "runs".
RUN_KEYS = (
  "step_s_each",
  "step_cpu_s_each",
  "warmup_s_incl_compile",
  "cpu_steal_pct",
  "images_per_step",
  "step_matmul_gflop",
  "peak_rss_mb",
  "import_rss_mb",
  "kernel_rates",
  "load_before",
  "torch_version",
  "threads",
  "conv_weight_grad",
  "conv_paths",
  "profile",
)
# Dense peak TFLOP/s by device_kind substring: (float32, bfloat16). float32
# is the plain (non-tensor-core) rate; XLA runs float32 matmuls at
# 'default' precision, which on NVIDIA GPUs may use TF32 tensor cores, so
# float32 utilisation can exceed 1 there.
PEAK_TFLOPS = {
  "H200": (67.0, 989.0),
  "H100": (67.0, 989.0),
  "A100": (19.5, 312.0),
  "L4": (30.3, 121.0),
  "TPU v4": (137.5, 275.0),
  "TPU v5e": (98.5, 197.0),
}
LOCALISING = ("reverse_distillation", "gradient_preference")
TINY = {
  "model.width": 8,
  "model.stage_sizes": (1, 1),
  "model.head_dims": (16, 8),
  "model.latent_size": 8,
  "model.backbone": "resnet18",
  "model.mlp_widths": (16, 8),
}
# Inference models: (method, config overrides, image size, timing batch).
MODELS = {
  "rd_resnet18": (
    "reverse_distillation",
    {"model.backbone": "resnet18"},
    256,
    16,
  ),
  "rd_wrn50": (
    "reverse_distillation",
    {"model.backbone": "wide_resnet50_2"},
    256,
    4,
  ),
  "ganomaly": ("ganomaly", {}, 32, 32),
}
IMPLS = ("ours detector", "anomalib torch", "ours onnx", "anomalib onnx")
# Commands of the scripts merged into this one, as saved results name them.
MERGED = {
  "python experiments/training_speed.py end_to_end": "end_to_end",
  "python experiments/device_benchmark.py": "device",
  "python experiments/inference_benchmark.py": "inference",
}


def _common():
  from experiments import common  # pylint: disable=g-import-not-at-top

  return common


def _was_run_as(command: str, note: str = "") -> str:
  """`command` in backticks, then in brackets where a merged script's part
  lives now and `note`."""
  notes = [
    f"since merged into `{SCRIPT}` as `{part}`"
    for old, part in MERGED.items()
    if old in command
  ]
  notes += [note] if note else []
  return f"`{command}`" + (f" ({'; '.join(notes)})" if notes else "")


def _save(args, name: str, result: dict) -> bool:
  """Writes `result` to --json, or to results/<name>.json; True for the
  latter (then the part re-renders its section)."""
  if args.json:
    measure.emit(result, args.json)
    return False
  _common().save_part(name, result)
  return True


# --- steps -------------------------------------------------------------------


def _row_setup(row: str, args) -> tuple:
  """(method, config arg, overrides, image side, views) of a `steps` row."""
  base = {"num_train_steps": 1000, "dtype": args.dtype}
  if args.conv_weight_grad:
    base["conv_weight_grad"] = args.conv_weight_grad
  if row in ("disaug", "rotnet"):
    return (
      row,
      "cifar10",
      {**base, "batch_size": args.two_stage_batch, "model.width": 64},
      32,
      4 if row == "rotnet" else 2,
    )
  if row.startswith("rd_"):
    return (
      "reverse_distillation",
      "digits",
      {
        **base,
        "model.backbone": row[3:],
        "data.image_size": args.rd_image_size,
        "model.ocbe_width_per_group": OCBE_WIDTH,
        "batch_size": args.rd_batch,
      },
      args.rd_image_size,
      1,
    )
  if row == "ganomaly":
    return (
      "ganomaly",
      "cifar10",
      {
        **base,
        "batch_size": args.gan_batch,
        "model.width": 64,
        "model.latent_size": 100,
        "data.image_size": 32,
      },
      32,
      1,
    )
  raise SystemExit(f"Unknown row {row!r}; rows: {DEFAULT_ROWS}.")


def ours_step(args) -> dict:
  """Our jitted train step of one row, timed in this process."""
  # pylint: disable=g-import-not-at-top
  from jax_oneclass import data, methods
  from jax_oneclass.components import conv

  # pylint: enable=g-import-not-at-top
  common = _common()
  method_name, arg, overrides, size, views = _row_setup(args.row, args)
  config = common.config_with(method_name, arg, overrides)
  info = types.SimpleNamespace(
    image_shape=(size, size, 3),
    num_train=5000,
    epoch_size=data.examples_per_epoch(config, 5000),
    class_names=("a", "b"),
  )
  method = methods.get_method(config, info)
  result, _ = common.time_train_step(
    method,
    info,
    config.batch_size,
    args.steps,
    args.warmup,
    views,
    profile_calls=args.profile,
  )
  return {
    **result,
    "images_per_step": config.batch_size * views,
    "conv_weight_grad": config.conv_weight_grad,
    "conv_paths": conv.chosen_paths(),
    "dtype": config.dtype,
  }


def conv_path_counts(paths: dict) -> dict:
  """{operation: {path: convolutions}} of `conv.chosen_paths()`'s entries
  (what 'auto' chose; empty for the other modes)."""
  counts = {}
  for entry, path in sorted(paths.items()):
    by_path = counts.setdefault(entry.split()[0], {})
    by_path[path] = by_path.get(path, 0) + 1
  return counts


def _torch_command(row: str, args, python: str) -> list[str]:
  """The PyTorch side of one row, run by `python`."""
  timed = [
    f"--steps={args.steps}",
    f"--warmup={args.warmup}",
    f"--threads={os.cpu_count()}",
  ]
  if row in ("disaug", "rotnet"):
    return [
      python,
      str(TORCH_DIR / "torch_two_stage.py"),
      f"--method={row}",
      f"--batch_size={args.two_stage_batch}",
      "--image_size=32",
      "--width=64",
      "--head_dims=" + ",".join(str(d) for d in HEAD_DIMS[row]),
      *timed,
    ]
  if row.startswith("rd_"):
    return [
      python,
      str(TORCH_DIR / "anomalib_localization.py"),
      "rd_throughput",
      f"--backbone={row[3:]}",
      f"--image_size={args.rd_image_size}",
      f"--batch_size={args.rd_batch}",
      *timed,
    ]
  return [
    python,
    str(TORCH_DIR / "anomalib_ganomaly.py"),
    "throughput",
    "--image_size=32",
    f"--batch_size={args.gan_batch}",
    "--width=64",
    "--latent=100",
    *timed,
  ]


def _run(command: list[str], env=None) -> dict:
  """One fresh process: its last JSON object plus the 1-min load before."""
  load = os.getloadavg()[0]
  out = subprocess.run(
    command,
    capture_output=True,
    text=True,
    check=False,
    cwd=ROOT,
    env={**os.environ, **(env or {})},
  )
  if out.returncode:
    raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
  text = out.stdout
  result = json.loads(text[text.rfind("\n{") + 1 :])
  return {**result, "load_before": round(load, 2)}


def _side(runs: list[dict]) -> dict:
  """Per-step medians over every timed step of a side's processes, and the
  highest peak RSS of them (None without processes)."""
  if not runs:
    return {"cpu_s": None, "wall_s": None, "peak_rss_mb": None}
  wall = [t for r in runs for t in r["step_s_each"]]
  cpu = [t for r in runs for t in r["step_cpu_s_each"]]
  return {
    "cpu_s": measure.median(cpu),
    "wall_s": measure.median(wall),
    "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
  }


def steps_row(runs: dict) -> dict:
  """A `steps` row of {"ours": [process figures], "torch": [...]}."""
  sides = {side: _side(found) for side, found in runs.items()}
  row = {
    f"{side}_{key}": sides[side][key]
    for key in ("cpu_s", "wall_s", "peak_rss_mb")
    for side in ("ours", "torch")
  }
  loads = [r["load_before"] for found in runs.values() for r in found]
  return {
    **row,
    "load_1min": measure.median(loads),
    "runs": {
      side: [{k: r[k] for k in RUN_KEYS if k in r} for r in found]
      for side, found in runs.items()
    },
  }


def part_steps(args) -> dict:
  """Every row: ours and torch alternating in fresh processes."""
  host = measure.machine()
  jaxlib = importlib.metadata.version("jaxlib")
  print(
    f"CPU: {host['cpu']}; jaxlib {jaxlib}; uptime: {host['uptime']}", flush=True
  )
  torch_python = args.torch_python
  if not Path(torch_python).exists():
    print(
      f"No torch Python at {torch_python} (--torch_python or "
      "$TORCH_PYTHON): timing ours only; torch figures are null.",
      file=sys.stderr,
      flush=True,
    )
    torch_python = None
  settings = [
    "steps",
    "warmup",
    "rounds",
    "two_stage_batch",
    "rd_image_size",
    "rd_batch",
    "gan_batch",
    "dtype",
    "conv_weight_grad",
    "profile",
  ]
  out = {
    "command": " ".join(
      [SCRIPT, "steps", f"--rows={args.rows}"]
      + [
        f"--{k}={getattr(args, k)}"
        for k in settings
        if getattr(args, k) not in ("", None, 0)
      ]
    ),
    "cpu_model": host["cpu"],
    "jaxlib": jaxlib,
    "cores": host["cores"],
    "uptime": host["uptime"],
    "torch_python": torch_python,
    "rows": {},
  }
  for row in args.rows.split(","):
    _row_setup(row, args)  # Fails early on an unknown row.
    ours_cmd = [
      sys.executable,
      __file__,
      "_ours_step",
      f"--row={row}",
      *(
        f"--{k}={getattr(args, k)}"
        for k in settings
        if k != "rounds" and getattr(args, k) not in ("", None, 0)
      ),
    ]
    runs = {"ours": [], "torch": []}
    for _ in range(args.rounds):
      runs["ours"].append(_run(ours_cmd))
      if torch_python:
        runs["torch"].append(
          _run(
            _torch_command(row, args, torch_python),
            {"OMP_WAIT_POLICY": "PASSIVE"},
          )
        )
    out["rows"][row] = steps_row(runs)
    print(
      row,
      json.dumps({k: v for k, v in out["rows"][row].items() if k != "runs"}),
      flush=True,
    )
    for i, run in enumerate(runs["ours"]):
      if run.get("conv_paths"):
        counts = conv_path_counts(run["conv_paths"])
        print(f"{row} process {i}: 'auto' chose {counts}", flush=True)
      if run.get("profile"):
        ranked = sorted(run["profile"].items(), key=lambda kv: -kv[1])
        print(f"{row} process {i}: operation s/step {dict(ranked)}")
  return out


# --- device ------------------------------------------------------------------


def peak_flops(dtype: str) -> tuple[float, str]:
  """(peak FLOP/s of the default device for `dtype`, where it came from)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

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


def _device_overrides(method: str, args, dtype: str) -> dict:
  """Config overrides of one device row; only keys the config has."""
  # pylint: disable=g-import-not-at-top
  from jax_oneclass import config as config_lib
  from jax_oneclass import errors

  # pylint: enable=g-import-not-at-top
  config = _common().config_with(method, "cifar10")
  wanted = {"dtype": dtype, "num_train_steps": 1000}
  if args.conv_weight_grad:
    wanted["conv_weight_grad"] = args.conv_weight_grad
  if method in LOCALISING:
    wanted["data.image_size"] = args.map_size
  if args.tiny:
    wanted.update(TINY)
    # The smallest side each network takes: RD halves 5 times, DCGAN
    # pyramids need a power of two >= 16; the CIFAR ResNet takes any.
    wanted["data.image_size"] = (
      32
      if method in LOCALISING
      else 16
      if method in ("ganomaly", "dgad")
      else 8
    )
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


def device_row(method: str, dtype: str, args) -> dict:
  """Step time, images/s, FLOPs and utilisation of one method and dtype."""
  # pylint: disable=g-import-not-at-top
  import jax
  from jax_oneclass import data, methods, parallel, train
  from jax_oneclass import run as run_lib

  # pylint: enable=g-import-not-at-top
  config = _common().config_with(
    method, "cifar10", _device_overrides(method, args, dtype)
  )
  size, channels = config.data.image_size, config.data.channels
  info = types.SimpleNamespace(
    image_shape=(size, size, channels),
    num_train=5000,
    class_names=("a", "b"),
    epoch_size=data.examples_per_epoch(config, 5000),
  )
  method_obj = methods.get_method(config, info)
  views = config.data.num_views
  mesh = parallel.make_mesh()
  step_fn = train.jit_train_step(method_obj, mesh)
  state = run_lib.initial_state(method_obj, info.image_shape, mesh, 0)
  images = jax.random.uniform(
    jax.random.key(0), (config.batch_size, views) + info.image_shape
  )
  batch = parallel.shard_batch(mesh, {"image": images})
  rng = jax.random.key(1)
  cost = step_fn.lower(state, batch, rng).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  box = {"state": state}

  def step():
    box["state"], metrics = step_fn(box["state"], batch, rng)
    jax.block_until_ready(metrics)
    box["loss"] = float(metrics["loss"])

  timing = measure.time_steps(
    step, args.steps, args.warmup, config.batch_size * views, "images"
  )
  seconds = timing["step_ms_median"] / 1000
  peak, source = peak_flops(dtype)
  return {
    "batch_size": config.batch_size,
    "views": views,
    "image_size": size,
    "step_ms_median": timing["step_ms_median"],
    "step_cpu_s_median": measure.median(timing["step_cpu_s_each"]),
    "images_per_sec": config.batch_size * views / seconds,
    "step_gflop": flops / 1e9,
    "achieved_tflops": flops / seconds / 1e12,
    "peak_tflops": peak / 1e12,
    "peak_source": source,
    "mfu": flops / seconds / peak,
    "final_loss": box["loss"],
    "conv_weight_grad": config.conv_weight_grad,
    "warmup_s_incl_compile": timing["warmup_s_incl_compile"],
  }


def part_device(args) -> dict:
  """Every method x dtype in this process; a failing row records its error."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax_oneclass import methods  # pylint: disable=g-import-not-at-top

  names = args.methods or ",".join(methods.available_methods())
  command = " ".join(
    [
      SCRIPT,
      "device",
      f"--methods={names}",
      f"--dtypes={args.dtypes}",
      f"--steps={args.steps}",
      f"--warmup={args.warmup}",
      f"--batch_size={args.batch_size}",
      f"--map_size={args.map_size}",
    ]
    + (
      [f"--conv_weight_grad={args.conv_weight_grad}"]
      if args.conv_weight_grad
      else []
    )
    + (["--tiny"] if args.tiny else [])
  )
  host = measure.machine()
  part = {
    "command": command,
    "device": str(jax.devices()[0].device_kind),
    "backend": jax.default_backend(),
    "cpu": host["cpu"],
    "load_before": host["load_average"][0],
    "rows": {},
  }
  for method in names.split(","):
    for dtype in args.dtypes.split(","):
      try:
        row = device_row(method, dtype, args)
      except Exception as e:  # pylint: disable=broad-except
        row = {"error": f"{type(e).__name__}: {e}"}
      part["rows"][f"{method}/{dtype}"] = row
      print(method, dtype, json.dumps(row), flush=True)
  return part


def render_device(part: dict) -> str:
  """A device run's section of RESULTS.md."""
  lines = [
    "## Device benchmark (per method, float32 and bfloat16)",
    "",
    f"{_was_run_as('PYTHONPATH=$PWD ' + part['command'])} on "
    f"{part['device']} ({part['cpu']}; load {part['load_before']:.1f} "
    "before). FLOPs: XLA's cost analysis of the compiled step; MFU = "
    "FLOPs / median step time / peak (its source in the last "
    "column).",
    "",
    "| method | dtype | batch x views, px | step ms | images/s | "
    "GFLOP/step | TFLOP/s | MFU | final loss | peak |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for key, r in part["rows"].items():
    method, dtype = key.split("/")
    if "error" in r:
      lines.append(
        f"| {method} | {dtype} | error: {r['error'][:120]} |||||||| |"
      )
      continue
    lines.append(
      f"| {method} | {dtype} | {r['batch_size']} x {r['views']}, "
      f"{r['image_size']} | {r['step_ms_median']:.1f} | "
      f"{r['images_per_sec']:.0f} | {r['step_gflop']:.2f} | "
      f"{r['achieved_tflops']:.3f} | {100 * r['mfu']:.1f}% | "
      f"{r['final_loss']:.4f} | {r['peak_source']} "
      f"{r['peak_tflops']:.2f} TFLOP/s |"
    )
  lines.append("")
  return "\n".join(lines)


# --- end_to_end --------------------------------------------------------------


def part_end_to_end(args) -> dict:
  """Wall time of whole runs (train + eval) per checkout, alternating."""
  commands = {
    "quickstart (disaug digits)": [
      "-m",
      "jax_oneclass.main",
      "--config=configs/disaug.py:digits",
    ]
  }
  if args.cifar:
    folder = _common().cifar_folder(args.cifar)
    commands[f"cifar10 class 0 disaug, {args.cifar_steps} steps"] = [
      "-m",
      "jax_oneclass.main",
      f"--config=configs/disaug.py:folder,folder={folder},normal_class=0,"
      f"num_train_steps={args.cifar_steps},eval.max_fit_examples=2000",
    ]
  out = {
    "command": " ".join(
      [
        SCRIPT,
        "end_to_end",
        f"--checkouts={args.checkouts}",
        f"--cifar={args.cifar}",
        f"--cifar_steps={args.cifar_steps}",
        f"--rounds={args.rounds}",
      ]
    ),
    "cpu": measure.machine()["cpu"],
    "cores": os.cpu_count(),
    "rows": {},
  }
  checkouts = args.checkouts.split(",")
  for name, command in commands.items():
    walls = {c: [] for c in checkouts}
    for _ in range(args.rounds):
      for checkout in checkouts:
        with tempfile.TemporaryDirectory() as workdir:
          load = os.getloadavg()[0]
          start = time.perf_counter()
          done = subprocess.run(
            [sys.executable, *command, f"--workdir={workdir}"],
            cwd=checkout,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "PYTHONPATH": checkout},
          )
          if done.returncode:
            raise SystemExit(
              f"{name} in {checkout} failed:\n{done.stderr[-3000:]}"
            )
          walls[checkout].append(
            {
              "wall_s": time.perf_counter() - start,
              "load_before": round(load, 2),
            }
          )
    out["rows"][name] = walls
    print(name, json.dumps(walls), flush=True)
  return out


# --- the training-speed section ----------------------------------------------


def _legacy_steps_table(steps: dict) -> list[str]:
  """A table of training_speed.py's 'steps' (ours once per conv mode)."""
  modes = [
    k for k in next(iter(steps["rows"].values()))["best"] if k != "torch"
  ]
  lines = [
    f"`PYTHONPATH=$PWD {steps['command']}` (since merged into "
    f"`{SCRIPT} steps`, which times one `--conv_weight_grad` mode "
    f"per run) on {steps['cpu']}, {steps['cores']} cores. Median step "
    "of each side's fastest fresh process; load = 1-min load average "
    "before the runs (the machine was shared).",
    "",
    "| row | torch ms | "
    + " | ".join(f"ours ({m[5:]}) ms" for m in modes)
    + " | speedup (torch / ours) | load |",
    "|---|---|" + "---|" * len(modes) + "---|---|",
  ]
  for row, res in steps["rows"].items():
    best = res["best"]
    loads = [r["load_before"] for v in res["all"].values() for r in v]
    lines.append(
      f"| {row} | {best['torch']['step_ms_median']:.0f} | "
      + " | ".join(f"{best[m]['step_ms_median']:.0f}" for m in modes)
      + " | "
      + ", ".join(f"{m[5:]} {res['speedup'][m]:.2f}x" for m in modes)
      + f" | {min(loads):.1f}-{max(loads):.1f} |"
    )
  for row, res in steps["rows"].items():
    tuned = res["best"].get("ours_auto", {}).get("conv_tuned")
    if tuned:
      picks = [v["best"] for v in tuned.values()]
      lines.append(
        f"- {row}, `auto`: {len(picks)} convolution shapes "
        "timed; kept "
        + ", ".join(f"{m} for {picks.count(m)}" for m in sorted(set(picks)))
      )
  return lines + [""]


def _steps_table(steps: dict) -> list[str]:
  """A table of this script's 'steps'."""

  def cell(value, scale=1000):
    return "-" if value is None else f"{scale * value:.0f}"

  lines = [
    f"`PYTHONPATH=$PWD {steps['command']}` on {steps['cpu_model']}, "
    f"{steps['cores']} cores, jaxlib {steps['jaxlib']} (uptime: "
    f"{steps['uptime']}). Medians over every timed step of each "
    "side's fresh processes: CPU ms (all threads) and wall ms; "
    "torch with OMP_WAIT_POLICY=PASSIVE; peak RSS = the highest of a "
    "side's processes (VmHWM, imports included); load = median 1-min "
    "load before the processes.",
    "",
    "| row | ours CPU ms | torch CPU ms | ours wall ms | torch wall "
    "ms | wall: torch / ours | ours peak MiB | torch peak MiB | load |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for row, r in steps["rows"].items():
    ratio = (
      "-"
      if r["torch_wall_s"] is None
      else f"{r['torch_wall_s'] / r['ours_wall_s']:.2f}x"
    )
    lines.append(
      f"| {row} | {cell(r['ours_cpu_s'])} | "
      f"{cell(r['torch_cpu_s'])} | {cell(r['ours_wall_s'])} | "
      f"{cell(r['torch_wall_s'])} | {ratio} | "
      f"{cell(r.get('ours_peak_rss_mb'), 1)} | "
      f"{cell(r.get('torch_peak_rss_mb'), 1)} | {r['load_1min']:.1f} |"
    )
  return lines + [""]


def render_training_speed(parts: dict) -> str:
  """The training-speed section of RESULTS.md."""
  lines = ["## Training speed (steady state, float32)", ""]
  for name in sorted(parts):
    if name.startswith("speed_steps"):
      lines += _steps_table(parts[name])
  for name in sorted(parts):
    if name.startswith("training_speed_steps"):
      lines += _legacy_steps_table(parts[name])
  inproc = parts.get("training_speed_in_process")
  if inproc:
    lines += [
      f"`PYTHONPATH=$PWD {inproc['command']}` (a part retired with "
      "the process-wide conv mode it switched; the script is in "
      "commit 1ed8442) on "
      f"{inproc['cpu']}: median seconds per step after the warm-up "
      "rounds, the modes' compiled steps called in turn in one "
      f"process; load {min(inproc['loads']):.1f}-"
      f"{max(inproc['loads']):.1f}.",
      "",
      "| mode | median s | every step |",
      "|---|---|---|",
    ]
    for mode, median in inproc["median_s"].items():
      lines.append(
        f"| {mode} | {median:.2f} | "
        f"{' '.join(str(t) for t in inproc['seconds_each'][mode])}"
        " |"
      )
    lines.append("")
  for name in sorted(parts):
    if not name.startswith("training_speed_end_to_end"):
      continue
    e2e = parts[name]
    first = next(iter(e2e["rows"].values()))
    lines += [
      f"{_was_run_as('PYTHONPATH=$PWD ' + e2e['command'])} on "
      f"{e2e['cpu']}: wall seconds of whole runs (train + eval), "
      "fresh processes, checkouts alternating.",
      "",
      "| run | " + " | ".join(Path(c).name for c in first) + " |",
      "|---|" + "---|" * len(first),
    ]
    for row, walls in e2e["rows"].items():
      lines.append(
        f"| {row} | "
        + " | ".join(
          ", ".join(
            f"{r['wall_s']:.0f} s (load {r['load_before']:.1f})" for r in runs
          )
          for runs in walls.values()
        )
        + " |"
      )
    lines.append("")
  return "\n".join(lines)


# --- inference ---------------------------------------------------------------


def _write_folder(root: Path, size: int = 64) -> None:
  """A small MVTec-shaped folder of random images (speed only)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  category = root / "widget"

  def save(name, array):
    path = category / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)

  for i in range(8):
    save(
      f"train/good/{i:03d}.png", rng.integers(0, 256, (size, size, 3), np.uint8)
    )
  for kind in ("good", "defect"):
    for i in range(2):
      save(
        f"test/{kind}/{i:03d}.png",
        rng.integers(0, 256, (size, size, 3), np.uint8),
      )
  for i in range(2):
    mask = np.zeros((size, size), np.uint8)
    mask[4:20, 8:24] = 255
    save(f"ground_truth/defect/{i:03d}_mask.png", mask)


def _workdir(root: Path, model: str) -> Path:
  return root / "ours" / model


def inference_prepare(args):
  """Trains one model's workdir for one step and exports it as ONNX."""
  # pylint: disable=g-import-not-at-top
  from jax_oneclass import export
  from jax_oneclass.detector import Detector

  # pylint: enable=g-import-not-at-top
  method, overrides, size, batch = MODELS[args.model]
  root = Path(args.root)
  data_root = root / "data"
  if not (data_root / "widget").is_dir():
    _write_folder(data_root)
  workdir = _workdir(root, args.model)
  overrides = {
    **overrides,
    "data.image_size": size,
    "num_train_steps": 1,
    "batch_size": 4,
    "checkpoint_every_steps": 1,
    "log_every_steps": 1,
    "data.holdout_fraction": 0.25,
    "eval.batch_size": batch,
    "eval.plots": False,
    "eval.num_overlays": 0,
  }
  arg = (
    f"mvtec,folder={data_root},category=widget,data_dir={data_root / 'tfds'}"
  )
  start = time.perf_counter()
  _common().run_method(method, arg, workdir, overrides)
  train_s = time.perf_counter() - start
  start = time.perf_counter()
  export.export(Detector.load(workdir), "onnx", workdir / "onnx")
  measure.emit(
    {
      "model": args.model,
      "train_and_eval_s": train_s,
      "onnx_export_s": time.perf_counter() - start,
      "onnx_mb": (workdir / "onnx" / "model.onnx").stat().st_size / 2**20,
    }
  )


def _runner(impl: str, workdir: Path, batch_size: int = 0):
  """images uint8 [N, H, W, 3] -> host outputs, for one of our impls."""
  # pylint: disable=g-import-not-at-top
  from jax_oneclass import export
  from jax_oneclass.detector import Detector

  # pylint: enable=g-import-not-at-top
  if impl == "detector":
    return Detector.load(workdir, batch_size=batch_size or None).predict
  return export.load(workdir / "onnx")


def inference_time(args):
  """Times one of our implementations in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import onnxruntime  # pylint: disable=g-import-not-at-top

  _, _, size, batch = MODELS[args.model]
  start = time.perf_counter()
  run = _runner(
    args.impl, _workdir(Path(args.root), args.model), args.detector_batch
  )
  load_s = time.perf_counter() - start
  images = np.random.default_rng(args.seed).integers(
    0, 256, (args.batch_size or batch, size, size, 3), np.uint8
  )
  steal, total = measure.cpu_ticks()
  start = time.perf_counter()
  timing = measure.time_latency_and_throughput(
    run, images, args.repeats, args.warmup
  )
  steal_end, total_end = measure.cpu_ticks()
  measure.emit(
    {
      "benchmark": "ours_inference",
      "model": args.model,
      "impl": f"ours {args.impl}",
      **timing,
      "load_s": load_s,
      "timed_s": time.perf_counter() - start,
      "cpu_steal_pct": 100 * (steal_end - steal) / max(1, total_end - total),
      "batch_size": len(images),
      "repeats": args.repeats,
      "detector_batch": args.detector_batch or None,
      "peak_rss_mb": measure.rss_mb(),
      "jax_version": jax.__version__,
      "onnxruntime_version": onnxruntime.__version__,
    }
  )


def part_inference_sweep(args) -> dict:
  """Per-image ms of our jitted score function at several batch sizes, in
  one process (what the Detector's batch size costs on this machine)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from jax_oneclass import parallel
  from jax_oneclass.detector import Detector

  # pylint: enable=g-import-not-at-top
  print(json.dumps(measure.machine()), flush=True)
  det = Detector.load(_workdir(Path(args.root), args.model))
  rows = []
  for size in [int(b) for b in args.batches.split(",")]:
    images = np.random.default_rng(args.seed).random(
      (size,) + det.image_shape, np.float32
    )
    batch = parallel.shard_batch(det.run.mesh, {"image": images})
    score = lambda b=batch: jax.block_until_ready(
      det._score(det.state, det.stage.fitted, b)
    )  # pylint: disable=protected-access
    score()
    times = []
    for _ in range(max(1, 8 // size)):
      start = time.perf_counter()
      score()
      times.append(time.perf_counter() - start)
    rows.append(
      {
        "batch": size,
        "ms_per_image": 1000 * min(times) / size,
        "calls": len(times),
        "load_average": list(os.getloadavg()),
      }
    )
    print(json.dumps(rows[-1]), flush=True)
  return {"model": args.model, "sweep": rows}


def _inference_commands(args, model: str) -> dict:
  """The four timing commands of one model, by implementation."""
  timed = [
    f"--model={model}",
    f"--repeats={args.repeats}",
    f"--warmup={args.warmup}",
  ]
  ref = [
    args.torch_python,
    str(TORCH_DIR / "anomalib_inference.py"),
    "time",
    f"--root={Path(args.root) / 'anomalib'}",
    f"--batch_size={MODELS[model][3]}",
    f"--threads={os.cpu_count()}",
    *timed,
  ]
  ours = [
    sys.executable,
    __file__,
    "_inference_time",
    f"--root={args.root}",
    *timed,
  ]
  return {
    "ours detector": ours
    + ["--impl=detector", f"--detector_batch={args.detector_batch}"],
    "anomalib torch": ref + ["--impl=torch"],
    "ours onnx": ours + ["--impl=onnx"],
    "anomalib onnx": ref + ["--impl=onnx"],
  }


def _inference_prepare_all(args, model: str) -> dict:
  """Our workdir and ONNX export, and anomalib's exports, made once."""
  common = _common()
  out = {}
  root = Path(args.root)
  if (
    args.rebuild
    or not (_workdir(root, model) / "onnx" / "signature.json").exists()
  ):
    out["ours"] = common.run_json(
      [
        sys.executable,
        __file__,
        "_inference_prepare",
        f"--model={model}",
        f"--root={root}",
      ]
    )
  if (
    args.rebuild
    or not (
      root / "anomalib" / model / "weights" / "onnx" / "model.onnx"
    ).exists()
  ):
    out["anomalib"] = common.run_json(
      [
        args.torch_python,
        str(TORCH_DIR / "anomalib_inference.py"),
        "export",
        f"--model={model}",
        f"--root={root / 'anomalib'}",
      ]
    )
  return out


def _inference_summary(runs: list[dict]) -> dict:
  """The best latency and throughput of one implementation's runs."""
  return {
    "latency_ms_median": min(r["latency_ms_median"] for r in runs),
    "images_per_sec": max(r["images_per_sec"] for r in runs),
    "rounds_latency_ms": [round(r["latency_ms_median"], 1) for r in runs],
    "rounds_images_per_sec": [round(r["images_per_sec"], 2) for r in runs],
    "cpu_steal_pct": max(r["cpu_steal_pct"] for r in runs),
    "load_s": min(r["load_s"] for r in runs),
    "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
  }


def _inference_table(result: dict) -> list[str]:
  heads = [
    "model",
    "implementation",
    "batch-1 latency ms (median)",
    "images/s (batch)",
    "latency: anomalib torch / this",
    "images/s: this / anomalib torch",
    "latency per round",
    "images/s per round",
  ]
  lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
  for model, row in result["models"].items():
    ref = row["impls"]["anomalib torch"]
    for impl in IMPLS:
      side = row["impls"][impl]
      lines.append(
        f"| {model} | {impl} | {side['latency_ms_median']:.1f} | "
        f"{side['images_per_sec']:.2f} (batch {row['batch_size']}) | "
        f"{ref['latency_ms_median'] / side['latency_ms_median']:.2f}x | "
        f"{side['images_per_sec'] / ref['images_per_sec']:.2f}x | "
        f"{' / '.join(f'{v:.0f}' for v in side['rounds_latency_ms'])} | "
        f"{' / '.join(f'{v:.2f}' for v in side['rounds_images_per_sec'])}"
        " |"
      )
  return lines


def render_inference(result: dict) -> str:
  """An inference run's section of RESULTS.md."""
  host = result["machine"]
  title = "## Inference: trained detector against anomalib's deployment"
  if result.get("detector_batch"):
    title += (
      f" (our Detector scoring {result['detector_batch']} "
      "image(s) per compiled call)"
    )
  lines = [
    title,
    "",
    _was_run_as(
      result["command"],
      "anomalib side: "
      "`experiments/torch/anomalib_inference.py` in the PyTorch "
      "virtualenv",
    )
    + f". {host['cpu']}, {host['cores']} cores; load average "
    f"{host['load_average'][0]:.1f} before and "
    f"{result['load_average_after'][0]:.1f} after the run "
    f"({result['wall_s'] / 60:.1f} min). Every implementation in a "
    "fresh process, alternating ours and anomalib's; each figure is the "
    "best of the rounds (every round's figure in the last columns). "
    "Inputs: random uint8 images at the model's size; every call ends "
    "with scores and, for reverse distillation, anomaly maps and masks on "
    "the host. Random weights on both sides (the cost does not depend on "
    "them).",
    "",
    *_inference_table(result),
    "",
  ]
  numpy_input = [
    f"{model} {min(r['latency_ms_numpy_input_median'] for r in runs):.0f}"
    for model, row in result["models"].items()
    for runs in [row["runs"]["anomalib torch"]]
    if all("latency_ms_numpy_input_median" in r for r in runs)
  ]
  if numpy_input:
    lines += [
      "anomalib torch's batch-1 latency above feeds TorchInferencer a "
      "float tensor [1, 3, H, W]; with one HWC uint8 NumPy image (its "
      "documented input) it takes, in ms: " + ", ".join(numpy_input) + ".",
      "",
    ]
  lines.append(
    "Versions: "
    + ", ".join(f"{k} {v}" for k, v in sorted(result["versions"].items()))
    + "."
  )
  if result.get("notes"):
    lines += ["", *result["notes"]]
  return "\n".join(lines) + "\n"


def inference_name(args) -> str:
  """The results name of an inference run."""
  if not args.detector_batch:
    return "inference"
  return f"inference_detector_batch{args.detector_batch}_" + "_".join(
    args.models.split(",")
  )


def part_inference(args) -> dict:
  """Prepare once, then every implementation alternating in fresh
  processes."""
  if not Path(args.torch_python).exists():
    raise SystemExit(
      f"No torch Python at {args.torch_python}: the "
      "inference part needs anomalib's side; pass "
      "--torch_python."
    )
  models = args.models.split(",")
  command = (
    f"{SCRIPT} inference --models={args.models} "
    f"--rounds={args.rounds} --repeats={args.repeats} "
    f"--warmup={args.warmup}"
  )
  if args.detector_batch:
    command += f" --detector_batch={args.detector_batch}"
  start = time.perf_counter()
  host = measure.machine()
  print(json.dumps(host), flush=True)
  prepared = {m: _inference_prepare_all(args, m) for m in models}
  timed_start = time.perf_counter()
  result = {
    "command": command,
    "machine": host,
    "prepared": prepared,
    "models": {},
  }
  versions = {}
  for model in models:
    commands = _inference_commands(args, model)
    runs = {impl: [] for impl in IMPLS}
    for _ in range(args.rounds):
      for impl in IMPLS:
        found = _common().run_json(commands[impl])
        runs[impl].append(found)
        print(
          f"{model} {impl}: {found['latency_ms_median']:.1f} ms, "
          f"{found['images_per_sec']:.2f} images/s",
          flush=True,
        )
        versions.update(
          {k: v for k, v in found.items() if k.endswith("_version")}
        )
    result["models"][model] = {
      "batch_size": MODELS[model][3],
      "impls": {
        impl: _inference_summary(found) for impl, found in runs.items()
      },
      "runs": runs,
    }
  result["versions"] = versions
  result["timed_wall_s"] = time.perf_counter() - timed_start
  result["wall_s"] = time.perf_counter() - start
  result["load_average_after"] = list(os.getloadavg())
  result["detector_batch"] = args.detector_batch or None
  return result


# --- command line ------------------------------------------------------------


def report(parts=("steps", "device", "inference")) -> None:
  """Re-renders the sections of the given kinds from experiments/results/."""
  common = _common()
  load = lambda path: json.loads(path.read_text())
  if "steps" in parts:
    found = {
      p.stem: load(p)
      for pattern in ("speed_steps*.json", "training_speed_*.json")
      for p in sorted(common.RESULTS_DIR.glob(pattern))
    }
    common.write_section("training_speed", render_training_speed(found))
  if "device" in parts:
    for path in sorted(common.RESULTS_DIR.glob("device_benchmark*.json")):
      common.write_section(path.stem, render_device(load(path)))
  if "inference" in parts:
    for path in sorted(common.RESULTS_DIR.glob("inference*.json")):
      common.write_section(path.stem, render_inference(load(path)))


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  sub = parser.add_subparsers(dest="part", required=True)
  torch_python = os.environ.get("TORCH_PYTHON", "/work/torch_venv/bin/python")

  def add(name, help_text, **defaults):
    p = sub.add_parser(name, help=help_text)
    for flag, default in defaults.items():
      p.add_argument(f"--{flag}", type=type(default), default=default)
    return p

  def config_flags(p):
    p.add_argument("--dtype", default="float32")
    p.add_argument(
      "--conv_weight_grad",
      default="",
      help="config.conv_weight_grad ('' the config's own).",
    )

  steps = dict(
    steps=8,
    warmup=3,
    profile=0,
    two_stage_batch=32,
    rd_image_size=128,
    rd_batch=8,
    gan_batch=64,
  )
  p = add(
    "steps",
    "ours vs PyTorch per row",
    rows=DEFAULT_ROWS,
    rounds=2,
    torch_python=torch_python,
    json="",
    tag="",
    **steps,
  )
  config_flags(p)
  p = add("_ours_step", "a child of steps", row="disaug", **steps)
  config_flags(p)
  p = add(
    "device",
    "per method and dtype on this device",
    methods="",
    dtypes="float32,bfloat16",
    steps=10,
    warmup=2,
    batch_size=0,
    map_size=256,
    json="",
    out="device_benchmark",
  )
  p.add_argument(
    "--tiny",
    action="store_true",
    help="Tiny networks and images (a CPU smoke run).",
  )
  p.add_argument("--conv_weight_grad", default="")
  add(
    "end_to_end",
    "whole runs across checkouts",
    json="",
    tag="",
    checkouts=f"/work/main,{ROOT}",
    cifar="",
    cifar_steps=200,
    rounds=2,
  )
  inference = dict(
    root="/tmp/jo_inference", repeats=3, warmup=1, seed=0, detector_batch=0
  )
  p = add(
    "inference",
    "a trained detector against anomalib's",
    json="",
    models="rd_resnet18,rd_wrn50,ganomaly",
    rounds=2,
    torch_python=torch_python,
    **inference,
  )
  p.add_argument("--rebuild", action="store_true")
  add(
    "inference_sweep",
    "our score's cost per batch size",
    json="",
    model="rd_resnet18",
    batches="1,4,16",
    **inference,
  )
  add(
    "_inference_prepare",
    "a child of inference",
    model="rd_resnet18",
    root="/tmp/jo_inference",
  )
  p = add(
    "_inference_time",
    "a child of inference",
    model="rd_resnet18",
    batch_size=0,
    **inference,
  )
  p.add_argument("--impl", choices=("detector", "onnx"), required=True)
  add("report", "only re-render")
  return parser


def main():
  args = _parser().parse_args()
  os.chdir(ROOT)
  os.environ.setdefault("TRUST_REMOTE_CODE", "1")  # anomalib's .pt loading.
  children = {
    "_ours_step": lambda a: measure.emit(ours_step(a)),
    "_inference_prepare": inference_prepare,
    "_inference_time": inference_time,
  }
  if args.part in children:
    children[args.part](args)
    return
  if args.part == "report":
    report()
  elif args.part == "steps":
    if _save(args, f"speed_steps{args.tag}", part_steps(args)):
      report(("steps",))
  elif args.part == "end_to_end":
    if _save(
      args, f"training_speed_end_to_end{args.tag}", part_end_to_end(args)
    ):
      report(("steps",))
  elif args.part == "device":
    part = part_device(args)
    if _save(args, args.out, part):
      _common().write_section(args.out, render_device(part))
  elif args.part == "inference":
    result = part_inference(args)
    if _save(args, inference_name(args), result):
      _common().write_section(inference_name(args), render_inference(result))
  elif args.part == "inference_sweep":
    measure.emit(part_inference_sweep(args), args.json)
  if not getattr(args, "json", "") and args.part != "inference_sweep":
    print((ROOT / "experiments" / "RESULTS.md").read_text())


if __name__ == "__main__":
  main()
