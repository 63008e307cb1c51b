"""One stacked sweep vs. sequential single runs (default: digits DisAug).

  python experiments/sweep_benchmark.py            # all 10 classes, 1 seed
  python experiments/sweep_benchmark.py --classes=0,1 --steps=4 \\
      --out_dir=/tmp/sweep_bench                   # a smoke run
  python experiments/sweep_benchmark.py --name=cifar10_disaug \\
      --config=configs/disaug.py:folder,folder=/tmp/cifar/cifar10-jpeg \\
      --classes=0,1,2 --steps=100 --set=model.width=32

Runs `python -m jax_oneclass.sweep` over the classes (one fresh process)
and then `python -m jax_oneclass.main` once per class (fresh processes, one
after another), each with the same config and seed; reports the wall time
and the CPU time of each (the children's user + system time, from
resource.getrusage(RUSAGE_CHILDREN)), and the per-class AUROCs side by
side, which should agree to about 3 decimals. Writes
<out_dir>/sweep_benchmark.json and .md (default experiments/results/).
Run it on a quiet machine: other load changes both times.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
  try:
    out = subprocess.run(
      ["lscpu"], capture_output=True, text=True, check=False
    ).stdout
  except OSError:
    return platform.processor() or "unknown"
  for line in out.splitlines():
    if line.startswith("Model name:"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or "unknown"


def _load() -> str:
  try:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
  except OSError:
    return "unknown"


def _jaxlib_version() -> str:
  out = subprocess.run(
    [sys.executable, "-c", "import jaxlib; print(jaxlib.__version__)"],
    capture_output=True,
    text=True,
    check=False,
  )
  return out.stdout.strip() or "unknown"


def timed(command: list[str]) -> dict:
  """Runs `command`; its wall and CPU seconds (a failure stops the script)."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  done = subprocess.run(
    command, cwd=ROOT, capture_output=True, text=True, check=False
  )
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if done.returncode:
    sys.exit(
      f"error: {' '.join(command)} failed "
      f"({done.returncode}):\n{done.stderr[-2000:]}"
    )
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return {
    "wall_seconds": round(wall, 1),
    "cpu_seconds": round(cpu, 1),
    "stdout": done.stdout,
  }


def _combine_line(stdout: str) -> str:
  """The sweep's '--combine=auto: ...' line (the timing it chose by)."""
  return next(
    (line for line in stdout.splitlines() if line.startswith("--combine=")),
    "",
  )


def _overrides(args) -> list[str]:
  flags = ["--config.progress_bar=False", f"--config.seed={args.seed}"]
  flags += [f"--config.{setting}" for setting in args.set]
  if args.steps:
    flags.append(f"--config.num_train_steps={args.steps}")
  return flags


def _auroc(path: Path) -> dict:
  results = json.loads((path / "results.json").read_text())
  return {
    "scorer": results["scorer"],
    "auroc": results["auroc"][results["scorer"]],
  }


def markdown(result: dict) -> str:
  sweep, single = result["sweep"], result["sequential"]
  lines = [
    f"## Stacked sweep vs. sequential single runs ({result['name']})",
    "",
    f"`{result['config']}`"
    + "".join(f" `--config.{s}`" for s in result["settings"])
    + f"; {len(result['classes'])} classes x seed {result['seed']}, "
    f"{result['steps'] or 'preset'} steps, --combine={result['combine']}; "
    f"CPU {result['cpu']}, jaxlib {result['jaxlib']}, load before "
    f"{result['load_before']}, after {result['load_after']}.",
    "",
    "| | wall s | CPU s |",
    "|---|---|---|",
    f"| one sweep (`jax_oneclass.sweep`) | {sweep['wall_seconds']} | "
    f"{sweep['cpu_seconds']} |",
    f"| {len(result['classes'])} runs of `jax_oneclass.main` | "
    f"{single['wall_seconds']} | {single['cpu_seconds']} |",
    f"| ratio (runs / sweep) | "
    f"{single['wall_seconds'] / max(sweep['wall_seconds'], 1e-9):.2f} | "
    f"{single['cpu_seconds'] / max(sweep['cpu_seconds'], 1e-9):.2f} |",
    "",
    f"The sweep said: {result.get('combine_choice') or '(no choice line)'}",
    "",
    f"Per class, AUROC of `{result['scorer']}`:",
    "",
    "| class | sweep | single run | difference |",
    "|---|---|---|---|",
  ]
  for c in result["classes"]:
    a, b = result["auroc"]["sweep"][str(c)], result["auroc"]["single"][str(c)]
    lines.append(f"| {c} | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/disaug.py:digits")
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    help="key=value config override for both sides (repeatable)",
  )
  parser.add_argument(
    "--name", default="digits_disaug", help="results file stem and title"
  )
  parser.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
  parser.add_argument("--seed", type=int, default=1)
  parser.add_argument(
    "--steps", type=int, default=0, help="num_train_steps (0: the preset's)"
  )
  parser.add_argument(
    "--combine", default="auto", choices=("auto", "vmap", "unrolled")
  )
  parser.add_argument("--workdir", default="/tmp/jax_oneclass_sweep_bench")
  parser.add_argument(
    "--out_dir", default=str(ROOT / "experiments" / "results")
  )
  args = parser.parse_args()
  classes = [int(c) for c in args.classes.split(",")]
  work = Path(args.workdir)
  shutil.rmtree(work, ignore_errors=True)
  cpu, jaxlib, load_before = _cpu_model(), _jaxlib_version(), _load()
  print(f"CPU: {cpu}; jaxlib {jaxlib}; load {load_before}", flush=True)

  python = [sys.executable, "-m"]
  config = f"--config={args.config}"
  sweep = timed(
    python
    + [
      "jax_oneclass.sweep",
      config,
      f"--classes={args.classes}",
      f"--seeds={args.seed}",
      f"--combine={args.combine}",
      f"--workdir={work / 'sweep'}",
      *_overrides(args),
    ]
  )
  combine_line = _combine_line(sweep.pop("stdout"))
  print(f"sweep: {sweep}\n{combine_line}", flush=True)
  sequential = {"wall_seconds": 0.0, "cpu_seconds": 0.0}
  for c in classes:
    one = timed(
      python
      + [
        "jax_oneclass.main",
        config,
        f"--config.data.normal_class={c}",
        f"--workdir={work / 'single' / f'class_{c}'}",
        *_overrides(args),
      ]
    )
    one.pop("stdout")
    print(f"class {c}: {one}", flush=True)
    for key in sequential:
      sequential[key] = round(sequential[key] + one[key], 1)

  sweep_auroc = {
    str(c): _auroc(work / "sweep" / f"class_{c}" / f"seed_{args.seed}")
    for c in classes
  }
  single_auroc = {
    str(c): _auroc(work / "single" / f"class_{c}") for c in classes
  }
  result = {
    "name": args.name,
    "config": args.config,
    "settings": args.set,
    "classes": classes,
    "seed": args.seed,
    "steps": args.steps,
    "combine": args.combine,
    "combine_choice": combine_line,
    "cpu": cpu,
    "jaxlib": jaxlib,
    "load_before": load_before,
    "load_after": _load(),
    "cores": os.cpu_count(),
    "sweep": sweep,
    "sequential": sequential,
    "scorer": next(iter(sweep_auroc.values()))["scorer"],
    "auroc": {
      "sweep": {c: v["auroc"] for c, v in sweep_auroc.items()},
      "single": {c: v["auroc"] for c, v in single_auroc.items()},
    },
  }
  out = Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  stem = f"sweep_benchmark_{args.name}"
  (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
  text = markdown(result)
  (out / f"{stem}.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()
