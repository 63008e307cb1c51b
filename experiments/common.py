"""Helpers shared by the benchmark scripts in experiments/.

Each script writes its raw figures to experiments/results/<part>.json and
its markdown section to experiments/results/<family>.md; `write_report()`
joins every section into experiments/RESULTS.md.
"""

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "experiments" / "results"
# Run as `python experiments/<script>.py`, a script's own folder leads
# sys.path, where experiments/torch/ (the PyTorch-side scripts) would read as
# an empty `torch` package to any library that probes for torch.
sys.path[:] = [
  p for p in sys.path if Path(p or ".").resolve() != ROOT / "experiments"
]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=g-import-not-at-top

from jax_oneclass import config as config_lib  # pylint: disable=g-import-not-at-top
from jax_oneclass import run as run_lib  # pylint: disable=g-import-not-at-top
from jax_oneclass import train  # pylint: disable=g-import-not-at-top


def config_with(method, arg, overrides=None):
  """`configs/<method>.py:<arg>` with {'dotted.key': value} overrides."""
  return config_lib.load(method, arg, overrides)


def run_method(method, arg, workdir, overrides=None) -> dict:
  """Trains and evaluates one run; its results plus 'wall_seconds'."""
  config = config_with(method, arg, overrides)
  config.progress_bar = False
  start = time.perf_counter()
  results = train.train_and_evaluate(config, workdir)
  results["wall_seconds"] = round(time.perf_counter() - start, 1)
  return results


def cifar_folder(path: str) -> str:
  """An extracted folder with train/ and test/, extracting a .tar.gz once."""
  path = Path(path)
  if not path.exists():
    print(
      f"error: {path} does not exist: the CIFAR-10 JPEG data "
      "(cifar10-jpeg.tar.gz, read from ../shared/data/ beside the "
      "repository by default) is missing. Pass --source=<that .tar.gz or "
      "its extracted folder with train/ and test/>.",
      file=sys.stderr,
    )
    raise SystemExit(2)
  if path.is_file():
    target = Path(os.environ.get("JAX_ONECLASS_DATA", "/tmp/jax_oneclass_data"))
    marker = target / (path.name + ".extracted")
    if not marker.exists():
      target.mkdir(parents=True, exist_ok=True)
      with tarfile.open(path) as tar:
        tar.extractall(target, filter="data")
      marker.touch()
    path = target
  for candidate in [path, *sorted(p for p in path.rglob("*") if p.is_dir())]:
    if (candidate / "train").is_dir() and (candidate / "test").is_dir():
      return str(candidate)
  raise SystemExit(f"No folder with train/ and test/ under {path}.")


def _matmul_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      lhs = eqn.invars[0].aval
      (contracting, _), _ = eqn.params["dimension_numbers"]
      total += (
        2.0
        * eqn.outvars[0].aval.size
        * math.prod(lhs.shape[d] for d in contracting)
      )
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval
      out_features = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
      # A strided conv's input gradient is a conv over the dilated input;
      # the inserted zeros are not work (torch does not count them either).
      zeros = math.prod(eqn.params["lhs_dilation"])
      total += 2.0 * eqn.outvars[0].aval.size * rhs.size / out_features / zeros
    inner = [
      v
      for value in eqn.params.values()
      for v in (value if isinstance(value, (list, tuple)) else [value])
      if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns")
    ]
    counts = [_matmul_flops(getattr(v, "jaxpr", v)) for v in inner]
    if name == "cond":
      total += max(counts, default=0.0)
    else:  # A while loop's body is counted once.
      total += sum(counts) * eqn.params.get("length", 1)
  return total


def matmul_flops(fn, *args) -> float:
  """Convolution and matrix-product FLOPs (2 a multiply-add) of `fn(*args)`,
  forward and backward as its jaxpr holds them: the convention of torch's
  FlopCounterMode, so both sides of a benchmark count the same way."""
  return _matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def time_train_step(
  method,
  info,
  batch_size: int,
  steps: int,
  warmup: int,
  views: int = 1,
  profile_calls: int = 0,
) -> tuple[dict, object]:
  """Times `method`'s jitted train step on one fixed batch of random images
  ([batch_size, views, H, W, C]; no input pipeline) in this process.

  Returns (`measure.time_steps`'s figures plus the step's conv + matmul
  GFLOP, the machine's float32 kernel rates, the last step's scalar metrics,
  the peak RSS and, with `profile_calls`, `op_profile.profile` of that many
  calls; the final state).
  """
  # pylint: disable=g-import-not-at-top
  from experiments import measure
  from jax_oneclass import parallel

  # pylint: enable=g-import-not-at-top
  mesh = parallel.make_mesh()
  box = {"state": run_lib.initial_state(method, info.image_shape, mesh, 0)}
  step_fn = train.jit_train_step(method, mesh)
  images = jax.random.uniform(
    jax.random.key(0), (batch_size, views) + tuple(info.image_shape)
  )
  batch = parallel.shard_batch(mesh, {"image": images})
  rng = jax.random.key(1)
  flops = matmul_flops(step_fn, box["state"], batch, rng)

  def step():
    box["state"], box["metrics"] = step_fn(box["state"], batch, rng)
    jax.block_until_ready(box["metrics"])

  timing = measure.time_steps(step, steps, warmup, batch_size * views, "images")
  peak_rss = measure.rss_mb()  # Before the kernel rates and the profile.
  profile = {}
  if profile_calls:
    from experiments import op_profile  # pylint: disable=g-import-not-at-top

    text = step_fn.lower(box["state"], batch, rng).compile().as_text()
    profile = {"profile": op_profile.profile(step, text, profile_calls)}
  return {
    **timing,
    **profile,
    "peak_rss_mb": peak_rss,
    "step_matmul_gflop": flops / 1e9,
    "kernel_rates": measure.jax_kernel_rates(),
    "final_metrics": {
      k: float(v)
      for k, v in box["metrics"].items()
      if getattr(v, "ndim", 1) == 0
    },
    "jax_version": jax.__version__,
    "devices": str(jax.devices()),
  }, box["state"]


def run_step_cpu_s(
  method_name: str, arg: str, overrides: dict, steps: int, warmup: int
) -> dict:
  """CPU seconds (time.process_time) of one jitted train step of a run as
  `run_method` would train it: the real data, the method's `prepare` on its
  first batches, then `steps` timed steps on the next batch after `warmup`
  untimed ones (compilation). The input pipeline is not timed. Returns
  the median, every step's CPU and wall seconds and the batch size."""
  import tempfile  # pylint: disable=g-import-not-at-top

  # pylint: disable=g-import-not-at-top
  from experiments import measure
  from jax_oneclass import data, parallel

  # pylint: enable=g-import-not-at-top
  config = config_with(method_name, arg, overrides)
  with tempfile.TemporaryDirectory() as workdir:
    run = run_lib.setup(config, workdir)
    try:
      state, _ = run_lib.restore_or_init(run)
      state, batches = train.prepare(run, state, data.train_batches(config, 0))
      batch = parallel.shard_batch(run.mesh, next(batches))
      step_fn = train.jit_train_step(run.method, run.mesh)
      rng = jax.random.key(config.seed + 1)
      box = {"state": state}

      def step():
        box["state"], metrics = step_fn(box["state"], batch, rng)
        jax.block_until_ready(metrics)

      timing = measure.time_steps(
        step, steps, warmup, config.batch_size, "images"
      )
    finally:
      run.checkpointer.close()
  return {
    "cpu_s_per_step": measure.median(timing["step_cpu_s_each"]),
    "cpu_s_each": timing["step_cpu_s_each"],
    "wall_s_each": timing["step_s_each"],
    "batch_size": config.batch_size,
  }


def run_json(command: list[str]) -> dict:
  """Runs a command (from the repository root) that prints one JSON object
  last; returns it."""
  out = subprocess.run(
    command, capture_output=True, text=True, check=False, cwd=ROOT
  )
  if out.returncode:
    raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
  text = out.stdout
  start = text.rfind("\n{") + 1  # The JSON may span several lines.
  return json.loads(text[start:])


def alternate_runs(ours_cmd, ref_cmd, ref_name, unit, rounds) -> dict:
  """Both commands alternately, `rounds` times each; each side's fastest
  run, every run's rate and the ours / reference ratios."""
  key = f"{unit}_per_sec"
  runs = {"ours": [], ref_name: []}
  for _ in range(rounds):
    runs["ours"].append(run_json(ours_cmd))
    runs[ref_name].append(run_json(ref_cmd))
  best = {
    name: max(found, key=lambda r: r[key]) for name, found in runs.items()
  }
  ours, ref = best["ours"], best[ref_name]
  return {
    **best,
    "rounds": {n: [r[key] for r in f] for n, f in runs.items()},
    "speedup": ours[key] / ref[key],
    "speedup_median": ref["step_ms_median"] / ours["step_ms_median"],
  }


def _label(key: str) -> str:
  return f"{int(key):,}" if key.isdigit() else key


def comparison_table(rows, ref, unit, first, columns) -> list[str]:
  """Markdown: a table of `alternate_runs` results (`rows`: label -> result;
  `columns`: (header, field) pairs after the rate), then the winners and
  every run's rate."""
  digits = 2 if unit == "images" else 0
  heads = [
    first,
    "implementation",
    "step ms (mean / median)",
    f"{unit}/s",
    *(h for h, _ in columns),
    "steal %",
    "ours / ref",
  ]
  lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
  for key, row in rows.items():
    for name in ("ours", ref):
      side = row[name]
      ratio = (
        f"**{row['speedup']:.2f}x** ({row['speedup_median']:.2f}x)"
        if name == "ours"
        else ""
      )
      lines.append(
        f"| {_label(key)} | {name} | {side['step_ms']:.0f} / "
        f"{side['step_ms_median']:.0f} | "
        f"{side[f'{unit}_per_sec']:.{digits}f} | "
        + "".join(f"{side[m]:.0f} | " for _, m in columns)
        + f"{side['cpu_steal_pct']:.1f} | {ratio} |"
      )
  faster = [
    f"{_label(key)}: "
    + (
      f"ours is {r['speedup']:.2f}x faster"
      if r["speedup"] >= 1
      else f"{ref} is {1 / r['speedup']:.2f}x faster"
    )
    for key, r in rows.items()
  ]
  runs = [
    f"{_label(key)}: "
    + ", ".join(
      f"{n} " + " / ".join(f"{v:.{digits}f}" for v in f)
      for n, f in r["rounds"].items()
    )
    for key, r in rows.items()
  ]
  return lines + [
    "",
    "; ".join(faster) + ". Rate of every run (fastest "
    "kept): " + "; ".join(runs) + ".",
  ]


def roofline_lines(rows: dict, ref: str, first: str, goal: float = 2.0):
  """Markdown: what each side's step computes and reaches, and the rate a
  `goal`x speed-up would need against the fastest float32 kernel measured
  here. `rows` maps a label to {'ours': .., ref: ..} timing results that
  carry 'step_matmul_gflop', 'step_ms' and 'kernel_rates'."""
  if any("kernel_rates" not in r["ours"] for r in rows.values()):
    return []  # Measured before the scripts counted FLOPs.
  intro = [
    f"#### What {goal:g}x would take on this CPU",
    "",
    "Each side counts its own step's convolution and matrix-product "
    "FLOPs the same way (2 a multiply-add, forward and backward as run: "
    "ours from the step's jaxpr, the reference's with torch's "
    "FlopCounterMode); 'reached' divides that by the mean step time. "
    "GEMM (2048x2048) and 3x3 convolution (batch 32, 32x32, 128 to 128 "
    "channels) are float32 rates measured in the same process.",
    "",
  ]
  heads = [
    first,
    "implementation",
    "conv + matmul GFLOP a step",
    "reached GFLOP/s",
    "GEMM GFLOP/s",
    "3x3 conv GFLOP/s",
  ]
  lines = [*intro, "| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
  notes = []
  for label, row in rows.items():
    for name in ("ours", ref):
      side = row[name]
      rates = side["kernel_rates"]
      lines.append(
        f"| {_label(label)} | {name} | {side['step_matmul_gflop']:.1f} | "
        f"{1000 * side['step_matmul_gflop'] / side['step_ms']:.0f} | "
        f"{rates['gemm_gflops']:.0f} | {rates['conv3x3_gflops']:.0f} |"
      )
    best, where = max(
      (rate, f"{name} {kernel.split('_')[0]}")
      for name in ("ours", ref)
      for kernel, rate in row[name]["kernel_rates"].items()
    )
    target_ms = row[ref]["step_ms"] / goal
    needed = 1000 * row["ours"]["step_matmul_gflop"] / target_ms
    notes.append(
      f"{_label(label)}: {goal:g}x {ref} is a step in {target_ms:.0f} ms, "
      f"i.e. {needed:.0f} GFLOP/s for our step's convolutions and products "
      f"alone: {100 * needed / best:.0f}% of the fastest float32 kernel "
      f"measured here ({best:.0f} GFLOP/s, {where})"
    )
  return lines + ["", "; ".join(notes) + ".", ""]


def save_part(name: str, result: dict) -> None:
  """Writes one benchmark part's raw figures to results/<name>.json."""
  RESULTS_DIR.mkdir(parents=True, exist_ok=True)
  (RESULTS_DIR / f"{name}.json").write_text(
    json.dumps(result, indent=1, sort_keys=True) + "\n"
  )


def write_section(family: str, markdown: str) -> str:
  """Stores one script's section; returns the re-rendered RESULTS.md."""
  RESULTS_DIR.mkdir(parents=True, exist_ok=True)
  (RESULTS_DIR / f"{family}.md").write_text(markdown)
  return write_report()


def write_report() -> str:
  """RESULTS.md = a header + every experiments/results/*.md section."""
  lines = [
    "# Results",
    "",
    "Measured by the scripts in `experiments/`; rerun the command "
    "beside each table to reproduce it. Machine: "
    f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
    f"CPU cores, JAX {jax.__version__}, rendered "
    f"{datetime.date.today().isoformat()}.",
    "",
  ]
  for section in sorted(RESULTS_DIR.glob("*.md")):
    lines.append(section.read_text().rstrip() + "\n")
  report = "\n".join(lines)
  (ROOT / "experiments" / "RESULTS.md").write_text(report)
  return report
