"""Steady-state training-step time, ours vs PyTorch/anomalib, float32.

  PYTHONPATH=$PWD python experiments/training_speed.py steps \\
      --torch_python=/work/torch_venv/bin/python --rounds=2
  PYTHONPATH=$PWD python experiments/training_speed.py end_to_end \\
      --checkouts=/work/main,$PWD
  python experiments/training_speed.py report

'steps' times, per row, our jitted train step and the torch equivalent on
one fixed batch of random images (no input pipeline), `--steps` timed after
`--warmup` untimed (compiling) ones, each side in a fresh process, the
sides alternating `--rounds` times; a row's figure is each side's fastest
process. Rows (`--rows`):

  disaug, rotnet   CIFAR ResNet-18 (width 64, 32 px) + the reference head;
                   torch side experiments/torch_two_stage.py
  rd_resnet18,     reverse distillation's trained decoder + bottleneck on a
  rd_wide_resnet50_2   frozen encoder; torch side anomalib's model
                   (experiments/anomalib_localization.py rd_throughput)
  ganomaly         DCGAN GANomaly; torch side anomalib's
                   (experiments/anomalib_ganomaly.py throughput)

Ours runs once per `--modes` entry (config.conv_weight_grad, through the
child's --conv_weight_grad flag). 'in_process' compiles the two-stage step
once per mode in one process and calls them in turn
(`--modes=xla,im2col,taps`). 'end_to_end' times the quickstart (DisAug on
digits, train + eval) and a short CIFAR-10 class run in fresh processes,
alternating between git checkouts (e.g. main before and this branch after).
"""

import argparse
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

SCRIPT = "python experiments/training_speed.py"
DEFAULT_ROWS = "disaug,rotnet,rd_resnet18,rd_wide_resnet50_2,ganomaly"


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown"


def ours_two_stage(args) -> dict:
  """Our two-stage step (this process), built as a run builds it."""
  # pylint: disable=g-import-not-at-top
  from experiments import common
  from jax_oneclass import data, methods
  from jax_oneclass.components import conv
  # pylint: enable=g-import-not-at-top
  views = 4 if args.method == "rotnet" else 2
  config = common.config_with(args.method, "cifar10", {
      "batch_size": args.batch_size, "model.width": args.width,
      "num_train_steps": 1000, "dtype": args.dtype,
      "conv_weight_grad": args.conv_weight_grad})
  info = types.SimpleNamespace(
      image_shape=(args.image_size,) * 2 + (3,), num_train=5000,
      epoch_size=data.examples_per_epoch(config, 5000), class_names=("a", "b"))
  method = methods.get_method(config, info)
  result, _ = common.time_train_step(method, info, args.batch_size,
                                     args.steps, args.warmup, views)
  return {**result, "images_per_step": args.batch_size * views,
          "conv_weight_grad": config.conv_weight_grad,
          "conv_tuned": {str(k): v for k, v in conv.tuned_choices().items()}}


def _row_commands(row: str, args, mode: str) -> tuple[list[str], list[str]]:
  """(ours with conv weight-gradient `mode`, torch) commands of one row."""
  steps = [f"--steps={args.steps}", f"--warmup={args.warmup}"]
  ours = [f"--conv_weight_grad={mode}"]
  threads = f"--threads={os.cpu_count()}"
  if row in ("disaug", "rotnet"):
    flags = [f"--method={row}", f"--batch_size={args.two_stage_batch}",
             "--image_size=32", "--width=64", *steps]
    return ([sys.executable, __file__, "_ours_two_stage", *flags, *ours],
            [args.torch_python, str(ROOT / "experiments/torch_two_stage.py"),
             *flags, threads])
  if row.startswith("rd_"):
    flags = [f"--backbone={row[3:]}", f"--image_size={args.rd_image_size}",
             f"--batch_size={args.rd_batch}", *steps]
    return ([sys.executable, str(ROOT / "experiments/localization_benchmark.py"),
             "_ours_rd_throughput", *flags, *ours],
            [args.torch_python, str(ROOT / "experiments/anomalib_localization.py"),
             "rd_throughput", *flags, threads])
  if row == "ganomaly":
    flags = ["--image_size=32", f"--batch_size={args.gan_batch}",
             "--width=64", "--latent=100", *steps]
    return ([sys.executable, str(ROOT / "experiments/gan_benchmark.py"),
             "_ours_throughput", *flags, *ours],
            [args.torch_python, str(ROOT / "experiments/anomalib_ganomaly.py"),
             "throughput", *flags, threads])
  raise SystemExit(f"Unknown row {row!r}; rows: {DEFAULT_ROWS}.")


def _run(command: list[str], env=None) -> dict:
  """One fresh process; its last JSON object plus the load around it."""
  load = os.getloadavg()[0]
  out = subprocess.run(command, capture_output=True, text=True, check=False,
                       cwd=ROOT, env={**os.environ, **(env or {})})
  if out.returncode:
    raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
  text = out.stdout
  result = json.loads(text[text.rfind("\n{") + 1:])
  keep = ("images_per_sec", "step_ms", "step_ms_median", "step_ms_min",
          "step_s_each", "warmup_s_incl_compile", "cpu_steal_pct",
          "images_per_step", "step_matmul_gflop", "conv_tuned",
          "final_loss", "peak_rss_mb")
  return {**{k: result[k] for k in keep if k in result},
          "load_before": round(load, 2),
          "load_after": round(os.getloadavg()[0], 2)}


def part_steps(args) -> dict:
  """Every row: ours (per mode) and torch alternating in fresh processes."""
  modes = args.modes.split(",")
  out = {"command": " ".join([
      SCRIPT, "steps", f"--rows={args.rows}", f"--tag={args.tag}", f"--modes={args.modes}",
      f"--steps={args.steps}", f"--warmup={args.warmup}",
      f"--rounds={args.rounds}", f"--two_stage_batch={args.two_stage_batch}",
      f"--rd_image_size={args.rd_image_size}", f"--rd_batch={args.rd_batch}",
      f"--gan_batch={args.gan_batch}"]),
      "cpu": cpu_model(), "cores": os.cpu_count(), "rows": {}}
  for row in args.rows.split(","):
    ref_cmd = _row_commands(row, args, modes[0])[1]
    runs = {**{f"ours_{m}": [] for m in modes}, "torch": []}
    for _ in range(args.rounds):
      for mode in modes:
        runs[f"ours_{mode}"].append(_run(_row_commands(row, args, mode)[0]))
      runs["torch"].append(_run(ref_cmd))
    best = {k: min(v, key=lambda r: r["step_ms_median"])
            for k, v in runs.items()}
    out["rows"][row] = {
        "best": best, "all": runs,
        "speedup": {k: best["torch"]["step_ms_median"] / v["step_ms_median"]
                    for k, v in best.items() if k != "torch"}}
    print(row, json.dumps(out["rows"][row]["speedup"]), flush=True)
  return out


def part_in_process(args) -> dict:
  """The two-stage step compiled once per mode in one process, then the
  compiled steps called in turn for `--rounds` rounds of `--steps` each:
  the fairest mode comparison on a machine whose load drifts."""
  # pylint: disable=g-import-not-at-top
  from experiments import common
  from jax_oneclass import data, methods, parallel, train
  from jax_oneclass import run as run_lib
  # pylint: enable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  views = 4 if args.method == "rotnet" else 2
  config = common.config_with(args.method, "cifar10", {
      "batch_size": args.two_stage_batch, "num_train_steps": 1000})
  info = types.SimpleNamespace(
      image_shape=(32, 32, 3), num_train=5000,
      epoch_size=data.examples_per_epoch(config, 5000), class_names=("a", "b"))
  mesh = parallel.make_mesh()
  state = run_lib.initial_state(methods.get_method(config, info),
                                info.image_shape, mesh, 0)
  images = jax.random.uniform(jax.random.key(0),
                              (args.two_stage_batch, views, 32, 32, 3))
  batch = parallel.shard_batch(mesh, {"image": images})
  rng = jax.random.key(1)
  compiled = {}
  for mode in args.modes.split(","):
    config.conv_weight_grad = mode
    method = methods.get_method(config, info)
    compiled[mode] = train.jit_train_step(method, mesh).lower(
        state, batch, rng).compile()
  seconds = {mode: [] for mode in compiled}
  loads = []
  for _ in range(args.warmup + args.rounds):
    loads.append(round(os.getloadavg()[0], 2))
    for mode, step in compiled.items():
      for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch, rng)
        jax.block_until_ready(metrics)
        seconds[mode].append(round(time.perf_counter() - start, 3))
  timed = {m: s[args.warmup * args.steps:] for m, s in seconds.items()}
  return {"command": " ".join([
      SCRIPT, "in_process", f"--method={args.method}",
      f"--modes={args.modes}", f"--two_stage_batch={args.two_stage_batch}",
      f"--steps={args.steps}", f"--warmup={args.warmup}",
      f"--rounds={args.rounds}"]),
          "cpu": cpu_model(), "cores": os.cpu_count(), "loads": loads,
          "seconds_each": seconds,
          "median_s": {m: sorted(s)[len(s) // 2] for m, s in timed.items()}}


def part_end_to_end(args) -> dict:
  """Wall time of whole runs (train + eval) per checkout, alternating."""
  folder = None
  commands = {"quickstart (disaug digits)": [
      "-m", "jax_oneclass.main", "--config=configs/disaug.py:digits"]}
  if args.cifar:
    from experiments import common  # pylint: disable=g-import-not-at-top
    folder = common.cifar_folder(args.cifar)
    commands[f"cifar10 class 0 disaug, {args.cifar_steps} steps"] = [
        "-m", "jax_oneclass.main",
        f"--config=configs/disaug.py:folder,folder={folder},normal_class=0,"
        f"num_train_steps={args.cifar_steps},eval.max_fit_examples=2000"]
  out = {"command": " ".join([SCRIPT, "end_to_end",
                              f"--checkouts={args.checkouts}",
                              f"--cifar={args.cifar}",
                              f"--cifar_steps={args.cifar_steps}",
                              f"--rounds={args.rounds}"]),
         "cpu": cpu_model(), "cores": os.cpu_count(), "rows": {}}
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
              cwd=checkout, capture_output=True, text=True, check=False,
              env={**os.environ, "PYTHONPATH": checkout})
          if done.returncode:
            raise SystemExit(f"{name} in {checkout} failed:\n"
                             f"{done.stderr[-3000:]}")
          walls[checkout].append({"wall_s": time.perf_counter() - start,
                                  "load_before": round(load, 2)})
    out["rows"][name] = walls
    print(name, json.dumps(walls), flush=True)
  return out


def _steps_table(steps: dict) -> list[str]:
  """One 'steps' run's table."""
  modes = [k for k in next(iter(steps["rows"].values()))["best"]
           if k != "torch"]
  lines = [f"`PYTHONPATH=$PWD {steps['command']}` on {steps['cpu']}, "
           f"{steps['cores']} cores. Median step of each side's fastest "
           "fresh process; load = 1-min load average before the runs "
           "(the machine was shared).", "",
           "| row | torch ms | " + " | ".join(f"ours ({m[5:]}) ms"
                                               for m in modes)
           + " | speedup (torch / ours) | load |",
           "|---|---|" + "---|" * len(modes) + "---|---|"]
  for row, res in steps["rows"].items():
    best = res["best"]
    loads = [r["load_before"] for v in res["all"].values() for r in v]
    lines.append(
        f"| {row} | {best['torch']['step_ms_median']:.0f} | "
        + " | ".join(f"{best[m]['step_ms_median']:.0f}" for m in modes)
        + " | " + ", ".join(f"{m[5:]} {res['speedup'][m]:.2f}x"
                            for m in modes)
        + f" | {min(loads):.1f}-{max(loads):.1f} |")
  for row, res in steps["rows"].items():
    tuned = res["best"].get("ours_auto", {}).get("conv_tuned")
    if tuned:
      picks = [v["best"] for v in tuned.values()]
      lines.append(f"- {row}, `auto`: {len(picks)} convolution shapes "
                   "timed; kept " + ", ".join(
                       f"{m} for {picks.count(m)}" for m in sorted(set(picks))))
  return lines + [""]


def render(parts: dict) -> str:
  """The training-speed section of RESULTS.md."""
  lines = ["## Training speed (steady state, float32)", ""]
  for name in sorted(parts):
    if name.startswith("training_speed_steps"):
      lines += _steps_table(parts[name])
  inproc = parts.get("training_speed_in_process")
  if inproc:
    lines += [f"`PYTHONPATH=$PWD {inproc['command']}` on {inproc['cpu']}: "
              "median seconds per step after the warm-up rounds, the modes' "
              "compiled steps called in turn in one process; load "
              f"{min(inproc['loads']):.1f}-{max(inproc['loads']):.1f}.", "",
              "| mode | median s | every step |", "|---|---|---|"]
    for mode, median in inproc["median_s"].items():
      lines.append(f"| {mode} | {median:.2f} | "
                   f"{' '.join(str(t) for t in inproc['seconds_each'][mode])}"
                   " |")
    lines.append("")
  e2e = parts.get("training_speed_end_to_end")
  if e2e:
    lines += [f"`PYTHONPATH=$PWD {e2e['command']}` on {e2e['cpu']}: wall "
              "seconds of whole runs (train + eval), fresh processes, "
              "checkouts alternating.", "",
              "| run | " + " | ".join(Path(c).name for c in
                                      next(iter(e2e["rows"].values())))
              + " |", "|---|" + "---|" * len(next(iter(
                  e2e["rows"].values())))]
    for name, walls in e2e["rows"].items():
      lines.append(f"| {name} | " + " | ".join(
          ", ".join(f"{r['wall_s']:.0f} s (load {r['load_before']:.1f})"
                    for r in runs) for runs in walls.values()) + " |")
    lines.append("")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("part", choices=["steps", "in_process", "end_to_end",
                                       "report", "_ours_two_stage"])
  for name, default in (
      ("rows", DEFAULT_ROWS), ("modes", "auto,xla"), ("steps", 8),
      ("warmup", 3), ("rounds", 2), ("two_stage_batch", 32),
      ("rd_image_size", 128), ("rd_batch", 8), ("gan_batch", 64),
      ("torch_python", os.environ.get("ANOMALIB_PYTHON",
                                      "/work/torch_venv/bin/python")),
      ("checkouts", f"/work/main,{ROOT}"), ("cifar", ""),
      ("tag", ""),  # Results file suffix, to keep several runs' rows.
      ("cifar_steps", 200),
      # The children of 'steps':
      ("method", "disaug"), ("batch_size", 32), ("image_size", 32),
      ("width", 64), ("dtype", "float32"),
      ("conv_weight_grad", "im2col_cpu")):
    parser.add_argument(f"--{name}", type=type(default), default=default)
  args = parser.parse_args()
  os.chdir(ROOT)
  if args.part == "_ours_two_stage":
    measure.emit(ours_two_stage(args))
    return
  from experiments import common  # pylint: disable=g-import-not-at-top
  if args.part != "report":
    common.save_part(f"training_speed_{args.part}{args.tag}",
                     globals()[f"part_{args.part}"](args))
  parts = {p.stem: json.loads(p.read_text())
           for p in sorted(common.RESULTS_DIR.glob("training_speed_*.json"))}
  print(common.write_section("training_speed", render(parts)))


if __name__ == "__main__":
  main()
