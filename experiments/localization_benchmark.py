"""Nearest-neighbour memory-bank search vs PyTorch, on CPU.

Parts (each writes results/localization_<part>.json, then re-renders):

  bank           nearest_neighbors.search vs torch.cdist + topk, a row per
                 --bank_sizes entry (our indices checked against numpy).
  report         only re-render (also the saved reverse-distillation
                 train-step comparison; that is now
                 `python experiments/speed.py steps --rows=rd_resnet18`).

Each measurement is a fresh process, ours and the reference alternately
--rounds times, the fastest kept. The torch side is
torch/anomalib_localization.py under --anomalib_python (see
torch/anomalib_ganomaly.py for that virtualenv).

  python experiments/localization_benchmark.py bank --steps=5 --warmup=2
  python experiments/localization_benchmark.py report
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import measure  # pylint: disable=g-import-not-at-top

SCRIPT = "python experiments/localization_benchmark.py"
TORCH_SCRIPT = ROOT / "experiments/torch/anomalib_localization.py"
# anomalib's OCBE width per group, as the saved RD comparison ran it.
OCBE_WIDTH = 64
# part: (list flag, per-run flag, shared flags, reference, rate unit).
PARTS = {
  "bank": (
    "bank_sizes",
    "bank_size",
    ("dim", "queries", "k"),
    "torch",
    "queries",
  ),
}


def ours_bank(args) -> dict:
  """Our search on a random bank, laid out once (as a method's `fit`
  does), this process (JAX only)."""
  # pylint: disable=g-import-not-at-top
  import jax
  from jax_oneclass.components.knn import build_bank, search

  # pylint: enable=g-import-not-at-top
  import_rss = measure.rss_mb()
  bank_key, query_key = jax.random.split(jax.random.key(0))
  vectors = jax.random.normal(bank_key, (args.bank_size, args.dim))
  bank = build_bank(vectors)
  del vectors
  points = jax.random.normal(query_key, (args.queries, args.dim))
  jax.block_until_ready((bank, points))
  data_peak = measure.rss_mb()
  reset = measure.reset_peak_rss()  # Making the data is not the search's peak.
  before = measure.rss_mb("VmRSS")
  step = lambda: jax.block_until_ready(search(bank, points, k=args.k))
  timing = measure.time_steps(
    step, args.steps, args.warmup, args.queries, "queries"
  )
  return {
    **timing,
    "import_rss_mb": import_rss,
    "peak_reset": reset,
    "data_peak_rss_mb": data_peak,
    "rss_before_search_mb": before,
    "search_peak_rss_mb": measure.rss_mb(),
    "peak_rss_mb": max(data_peak, measure.rss_mb()),
    "jax_version": jax.__version__,
  }


def check_bank() -> dict:
  """Checks our indices against a float64 numpy brute force."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from jax_oneclass.components.knn import nearest_neighbors

  # pylint: enable=g-import-not-at-top
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(5000, 256)).astype(np.float32)
  points = rng.normal(size=(300, 256)).astype(np.float32)
  p64, b64 = points.astype(np.float64), bank.astype(np.float64)
  exact = np.sqrt(
    np.maximum(
      0, (p64**2).sum(1)[:, None] - 2 * p64 @ b64.T + (b64**2).sum(1)[None]
    )
  )
  for k in (1, 4):
    dist, index = nearest_neighbors(
      points, bank, k=k, query_chunk=128, bank_chunk=1024
    )
    want = np.argsort(exact, axis=1)[:, :k]
    if not np.array_equal(np.asarray(index), want):
      raise SystemExit(f"nearest_neighbors k={k}: wrong indices.")
    np.testing.assert_allclose(
      np.asarray(dist), np.take_along_axis(exact, want, 1), rtol=1e-5
    )
  return {"queries": 300, "bank": 5000, "k": [1, 4], "indices_equal": True}


def run_part(args) -> dict:
  """One row per entry of the part's list flag (see PARTS)."""
  from experiments import common  # pylint: disable=g-import-not-at-top

  many, one, shared, ref, unit = PARTS[args.part]
  flags = [f"--{f}={getattr(args, f)}" for f in shared]
  timed = [f"--steps={args.steps}", f"--warmup={args.warmup}"]
  out = {
    "command": " ".join(
      [
        SCRIPT,
        args.part,
        f"--{many}={getattr(args, many)}",
        *flags,
        *timed,
        f"--rounds={args.rounds}",
      ]
    ),
    "settings": {
      f: getattr(args, f) for f in (*shared, "steps", "warmup", "rounds")
    },
    "rows": {},
  }
  if args.part == "bank":
    out["check"] = check_bank()
  for value in getattr(args, many).split(","):
    child = [*flags, *timed, f"--{one}={value}"]
    row = common.alternate_runs(
      [sys.executable, __file__, f"_ours_{args.part}", *child],
      [
        args.anomalib_python,
        str(TORCH_SCRIPT),
        args.part,
        *child,
        f"--threads={os.cpu_count()}",
      ],
      ref,
      unit,
      args.rounds,
    )
    out["rows"][value] = row
    print(f"{value}: {row['speedup']:.2f}x", flush=True)
  return out


def render(parts) -> str:
  """The localisation section of RESULTS.md."""
  from experiments import common  # pylint: disable=g-import-not-at-top

  lines = [
    "## Localisation (reverse distillation, memory-bank search)",
    "",
    f"CPU only, {os.cpu_count()} cores: JAX uses all, torch as many "
    "threads. Each side's fastest fresh-process run is shown; ours / "
    "ref is the throughput ratio from mean step times (medians in "
    "brackets); steal % is CPU time the VM's host took while timing "
    "(/proc/stat).",
    "",
  ]
  if "localization_rd_throughput" in parts:
    p = parts["localization_rd_throughput"]
    s, rows = p["settings"], p["rows"]
    ref0, ours0 = (next(iter(rows.values()))[n] for n in ("anomalib", "ours"))
    lines += [
      "### Reverse-distillation train step: ours vs anomalib",
      "",
      f"Command: `{p['command']}` (anomalib {ref0['anomalib_version']}, "
      f"torch {ref0['torch_version']}; JAX {ours0['jax_version']}). Image "
      f"{s['image_size']}x{s['image_size']}x3, batch {s['batch_size']}, "
      "random inputs and teacher weights, OCBE width per group "
      f"{OCBE_WIDTH} on both; {s['steps']} "
      f"timed steps after {s['warmup']} warm-up ones in each of "
      f"{s['rounds']} alternating runs a side. Goal: ours >= 2x. The "
      "step timing is now `python experiments/speed.py steps "
      "--rows=rd_resnet18,rd_wide_resnet50_2`.",
      "",
      *common.comparison_table(
        rows,
        "anomalib",
        "images",
        "backbone",
        [
          ("trained params", "trained_params"),
          ("peak RSS MB", "peak_rss_mb"),
          ("RSS after imports MB", "import_rss_mb"),
        ],
      ),
      "",
      "anomalib's `training_step` mirrored without Lightning: train-"
      "mode forward (teacher in eval mode, no_grad), its loss, Adam "
      "(lr 0.005; its betas (0.5, 0.99), ours (0.5, 0.999)) over "
      "bottleneck + decoder, `loss.item()`. Trained params: those with a "
      "gradient (anomalib's OCBE also holds the official code's unused "
      "conv4/bn4). Peak RSS is VmHWM; our imports include TensorFlow, "
      "anomalib's every anomalib model.",
      "",
      *common.roofline_lines(rows, "anomalib", "backbone"),
    ]
  if "localization_bank" in parts:
    p = parts["localization_bank"]
    s, c, rows = p["settings"], p["check"], p["rows"]
    added = "; ".join(
      f"{int(key):,}: "
      + " vs ".join(
        f"{r[n]['search_peak_rss_mb'] - r[n]['rss_before_search_mb']:.0f}"
        f" MB ({n})"
        for n in ("ours", "torch")
      )
      for key, r in rows.items()
    )
    lines += [
      "### Nearest-neighbour search against a memory bank",
      "",
      f"Command: `{p['command']}`. {s['queries']} queries (one 32x32 map) "
      f"of dimension {s['dim']} a call, k={s['k']}, random float32; "
      f"{s['steps']} timed calls after {s['warmup']} warm-up ones "
      f"(compiling) in each of {s['rounds']} alternating runs a side. "
      "Ours: `search` over a bank laid out once by `build_bank` (as "
      "gradient preference's `fit` does), default blocks and precision; "
      "torch: "
      "`cdist(queries, bank).topk(k, largest=False)`. Our indices equal a "
      f"float64 numpy brute force ({c['queries']} queries, bank "
      f"{c['bank']}, k in {c['k']}, padded blocks).",
      "",
      *common.comparison_table(
        rows,
        "torch",
        "queries",
        "bank size",
        [
          ("RSS before search MB", "rss_before_search_mb"),
          ("peak RSS in search MB", "search_peak_rss_mb"),
          ("RSS after imports MB", "import_rss_mb"),
        ],
      ),
      "",
      f"Memory the search adds (peak, reset after making the data, "
      f"minus RSS before): {added}. torch holds the whole distance matrix "
      "(4 GB at 10^6); ours one query block's distances to one bank "
      "block, plus compiling. Both rank by matmul (cdist's |q|^2 - 2 q.b + |b|^2 path "
      "above 25 rows).",
      "",
    ]
  return "\n".join(lines)


def main():
  """Runs one part (or a child measurement) and re-renders the section."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("part", choices=[*PARTS, "report", "_ours_bank"])
  for name, default in (
    ("steps", 5),
    ("warmup", 2),
    ("rounds", 2),
    ("bank_sizes", "100000,1000000"),
    ("dim", 256),
    ("queries", 1024),
    ("k", 1),
    ("bank_size", 0),  # The last: a child's.
    (
      "anomalib_python",
      os.environ.get("ANOMALIB_PYTHON", "/work/anomalib_venv/bin/python"),
    ),
  ):
    parser.add_argument(f"--{name}", type=type(default), default=default)
  args = parser.parse_args()
  os.chdir(ROOT)
  if args.part.startswith("_ours_"):  # A child: imports what it measures.
    print(json.dumps(globals()[args.part[1:]](args)))
    return
  from experiments import common  # pylint: disable=g-import-not-at-top

  if args.part != "report":
    common.save_part(f"localization_{args.part}", run_part(args))
  paths = [
    common.RESULTS_DIR / f"localization_{part}.json"
    for part in ("rd_throughput", *PARTS)
  ]
  parts = {p.stem: json.loads(p.read_text()) for p in paths if p.exists()}
  print(common.write_section("localization", render(parts)))


if __name__ == "__main__":
  main()
