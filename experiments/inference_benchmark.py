"""Inference speed of a trained detector: ours against anomalib's deployment.

  python experiments/inference_benchmark.py --models=rd_resnet18,rd_wrn50,ganomaly \
      --rounds=2 --repeats=3

For each model, four implementations, each timed in its own fresh process,
alternating (ours, anomalib, ours, anomalib, ...) so that both sides see the
same machine load:

  ours detector   jax_oneclass.Detector.load(workdir).predict(uint8 images):
                  host preprocessing, the jit-compiled score function, the
                  thresholds, maps and masks;
  anomalib torch  anomalib.deploy.TorchInferencer on AnomalibModule.to_torch
                  (pre-processor, model, post-processor);
  ours onnx       python -m jax_oneclass.export --format=onnx, run with
                  onnxruntime through jax_oneclass.export.load;
  anomalib onnx   AnomalibModule.to_onnx, run with onnxruntime.

Each process builds or loads its model, warms up, then times batch-1
latency (median ms over --repeats images) and batched throughput (images/s
from the median of --repeats calls on one batch). Models and sizes:
reverse distillation with a ResNet-18 and a WRN-50-2 teacher at 256 px, and
GANomaly at its default size (32 px, width 64, latent 100). Weights do not
change the cost: our workdirs are trained for one step from random weights
(model.pretrained=''), anomalib's models are built with pre_trained=False.

`_sweep --model=rd_resnet18 --batches=1,4,16` prints the per-image cost
of our jitted score at each batch size in one process (Detector.load's
`batch_size`, --detector_batch here, picks the images per call).

The anomalib side (experiments/torch/anomalib_inference.py) runs in the PyTorch
virtualenv given by --anomalib_python. Writes results/inference.json and
the section results/inference.md of RESULTS.md. Workdirs and exports are
kept under --root and reused by later runs (--rebuild makes them anew).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import common, measure
import numpy as np
from PIL import Image
# pylint: enable=g-import-not-at-top,wrong-import-position

SCRIPT = "python experiments/inference_benchmark.py"
ANOMALIB_SCRIPT = Path(__file__).resolve().parent / "torch/anomalib_inference.py"
# name: (method, config overrides, image size, batch size of the timing).
MODELS = {
    "rd_resnet18": ("reverse_distillation",
                    {"model.backbone": "resnet18"}, 256, 16),
    "rd_wrn50": ("reverse_distillation",
                 {"model.backbone": "wide_resnet50_2"}, 256, 4),
    "ganomaly": ("ganomaly", {}, 32, 32),
}
IMPLS = ("ours detector", "anomalib torch", "ours onnx", "anomalib onnx")


def _write_folder(root: Path, size: int = 64) -> None:
  """A small MVTec-shaped folder of random images (speed only)."""
  rng = np.random.default_rng(0)
  category = root / "widget"

  def save(name, array):
    path = category / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)

  for i in range(8):
    save(f"train/good/{i:03d}.png",
         rng.integers(0, 256, (size, size, 3), np.uint8))
  for kind in ("good", "defect"):
    for i in range(2):
      save(f"test/{kind}/{i:03d}.png",
           rng.integers(0, 256, (size, size, 3), np.uint8))
  for i in range(2):
    mask = np.zeros((size, size), np.uint8)
    mask[4:20, 8:24] = 255
    save(f"ground_truth/defect/{i:03d}_mask.png", mask)


def _workdir(root: Path, model: str) -> Path:
  return root / "ours" / model


def cmd_prepare(args):
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
      **overrides, "data.image_size": size, "num_train_steps": 1,
      "batch_size": 4, "checkpoint_every_steps": 1, "log_every_steps": 1,
      "data.holdout_fraction": 0.25, "eval.batch_size": batch,
      "eval.plots": False, "eval.num_overlays": 0}
  arg = (f"mvtec,folder={data_root},category=widget,"
         f"data_dir={data_root / 'tfds'}")
  start = time.perf_counter()
  common.run_method(method, arg, workdir, overrides)
  train_s = time.perf_counter() - start
  start = time.perf_counter()
  export.export(Detector.load(workdir), "onnx", workdir / "onnx")
  measure.emit({"model": args.model, "train_and_eval_s": train_s,
                "onnx_export_s": time.perf_counter() - start,
                "onnx_mb": (workdir / "onnx" / "model.onnx").stat().st_size
                           / 2**20})


def _runner(impl: str, workdir: Path, batch_size: int = 0):
  """images uint8 [N, H, W, 3] -> host outputs, for one of our impls."""
  # pylint: disable=g-import-not-at-top
  from jax_oneclass import export
  from jax_oneclass.detector import Detector
  # pylint: enable=g-import-not-at-top
  if impl == "detector":
    detector = Detector.load(workdir, batch_size=batch_size or None)
    return detector.predict
  return export.load(workdir / "onnx")


def cmd_time(args):
  """Times one of our implementations in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  _, _, size, batch = MODELS[args.model]
  start = time.perf_counter()
  run = _runner(args.impl, _workdir(Path(args.root), args.model),
                args.detector_batch)
  load_s = time.perf_counter() - start
  images = np.random.default_rng(args.seed).integers(
      0, 256, (args.batch_size or batch, size, size, 3), np.uint8)
  steal, total = measure.cpu_ticks()
  start = time.perf_counter()
  timing = measure.time_latency_and_throughput(run, images, args.repeats,
                                               args.warmup)
  steal_end, total_end = measure.cpu_ticks()
  import onnxruntime  # pylint: disable=g-import-not-at-top
  measure.emit({
      "benchmark": "ours_inference", "model": args.model,
      "impl": f"ours {args.impl}", **timing, "load_s": load_s,
      "timed_s": time.perf_counter() - start,
      "cpu_steal_pct": 100 * (steal_end - steal) / max(1, total_end - total),
      "batch_size": len(images), "repeats": args.repeats,
      "detector_batch": args.detector_batch or None,
      "peak_rss_mb": measure.rss_mb(), "jax_version": jax.__version__,
      "onnxruntime_version": onnxruntime.__version__})


def cmd_sweep(args):
  """Per-image ms of our jitted score function at several batch sizes, in
  one process (what the Detector's batch size costs on this machine)."""
  # pylint: disable=g-import-not-at-top
  import jax
  from jax_oneclass import parallel
  from jax_oneclass.detector import Detector
  # pylint: enable=g-import-not-at-top
  print(json.dumps(_machine()), flush=True)
  det = Detector.load(_workdir(Path(args.root), args.model))
  rows = []
  for size in [int(b) for b in args.batches.split(",")]:
    images = np.random.default_rng(args.seed).random(
        (size,) + det.image_shape, np.float32)
    batch = parallel.shard_batch(det.run.mesh, {"image": images})
    score = lambda b=batch: jax.block_until_ready(
        det._score(det.state, det.stage.fitted, b))  # pylint: disable=protected-access
    score()
    times = []
    for _ in range(max(1, 8 // size)):
      start = time.perf_counter()
      score()
      times.append(time.perf_counter() - start)
    rows.append({"batch": size, "ms_per_image": 1000 * min(times) / size,
                 "calls": len(times), "load_average": list(os.getloadavg())})
    print(json.dumps(rows[-1]), flush=True)
  measure.emit({"model": args.model, "sweep": rows})


def _machine() -> dict:
  """CPU model, load and versions, printed and stored with the figures."""
  lscpu = subprocess.run(["lscpu"], capture_output=True, text=True,
                         check=False).stdout
  model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                if line.startswith("Model name")), platform.processor())
  return {"cpu": model, "cores": os.cpu_count(),
          "load_average": list(os.getloadavg()),
          "uptime": subprocess.run(["uptime"], capture_output=True,
                                   text=True, check=False).stdout.strip()}


def _commands(args, model: str) -> dict:
  """The four timing commands of one model, by implementation."""
  timed = [f"--model={model}", f"--repeats={args.repeats}",
           f"--warmup={args.warmup}"]
  batch = MODELS[model][3]
  ref = [args.anomalib_python, str(ANOMALIB_SCRIPT), "time",
         f"--root={Path(args.root) / 'anomalib'}", f"--batch_size={batch}",
         f"--threads={os.cpu_count()}", *timed]
  ours = [sys.executable, __file__, "_time", f"--root={args.root}", *timed]
  return {"ours detector": ours + ["--impl=detector",
                                   f"--detector_batch={args.detector_batch}"],
          "anomalib torch": ref + ["--impl=torch"],
          "ours onnx": ours + ["--impl=onnx"],
          "anomalib onnx": ref + ["--impl=onnx"]}


def _prepare(args, model: str) -> dict:
  """Our workdir and ONNX export, and anomalib's exports, made once."""
  out = {}
  root = Path(args.root)
  if args.rebuild or not (_workdir(root, model) / "onnx" /
                          "signature.json").exists():
    out["ours"] = common.run_json([sys.executable, __file__, "_prepare",
                                   f"--model={model}", f"--root={root}"])
  if args.rebuild or not (root / "anomalib" / model / "weights" / "onnx" /
                          "model.onnx").exists():
    out["anomalib"] = common.run_json([
        args.anomalib_python, str(ANOMALIB_SCRIPT), "export",
        f"--model={model}", f"--root={root / 'anomalib'}"])
  return out


def _summary(runs: list[dict]) -> dict:
  """The best latency and throughput of one implementation's runs."""
  return {"latency_ms_median": min(r["latency_ms_median"] for r in runs),
          "images_per_sec": max(r["images_per_sec"] for r in runs),
          "rounds_latency_ms": [round(r["latency_ms_median"], 1)
                                for r in runs],
          "rounds_images_per_sec": [round(r["images_per_sec"], 2)
                                    for r in runs],
          "cpu_steal_pct": max(r["cpu_steal_pct"] for r in runs),
          "load_s": min(r["load_s"] for r in runs),
          "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def _table(result: dict) -> list[str]:
  heads = ["model", "implementation", "batch-1 latency ms (median)",
           "images/s (batch)", "latency: anomalib torch / this",
           "images/s: this / anomalib torch", "latency per round",
           "images/s per round"]
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
          " |")
  return lines


def _markdown(result: dict) -> str:
  machine = result["machine"]
  title = "## Inference: trained detector against anomalib's deployment"
  if result.get("detector_batch"):
    title += (f" (our Detector scoring {result['detector_batch']} "
              "image(s) per compiled call)")
  lines = [
      title, "",
      f"`{result['command']}` (anomalib side: "
      "`experiments/torch/anomalib_inference.py` in the PyTorch virtualenv). "
      f"{machine['cpu']}, {machine['cores']} cores; load average "
      f"{machine['load_average'][0]:.1f} before and "
      f"{result['load_average_after'][0]:.1f} after the run "
      f"({result['wall_s'] / 60:.1f} min). Every implementation in a "
      "fresh process, alternating ours and anomalib's; each figure is the "
      "best of the rounds (every round's figure in the last columns). "
      "Inputs: random uint8 images at the model's size; every call ends "
      "with scores and, for reverse distillation, anomaly maps and masks on "
      "the host. Random weights on both sides (the cost does not depend on "
      "them).", "", *_table(result), ""]
  numpy_input = [
      f"{model} {min(r['latency_ms_numpy_input_median'] for r in runs):.0f}"
      for model, row in result["models"].items()
      for runs in [row["runs"]["anomalib torch"]]
      if all("latency_ms_numpy_input_median" in r for r in runs)]
  if numpy_input:
    lines += [
        "anomalib torch's batch-1 latency above feeds TorchInferencer a "
        "float tensor [1, 3, H, W]; with one HWC uint8 NumPy image (its "
        "documented input) it takes, in ms: " + ", ".join(numpy_input) + ".",
        ""]
  versions = result["versions"]
  lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in
                                        sorted(versions.items())) + ".")
  if result.get("notes"):
    lines += ["", *result["notes"]]
  return "\n".join(lines) + "\n"


def cmd_run(args):
  """The whole benchmark: prepare, alternate, write the results."""
  models = args.models.split(",")
  command = (f"{SCRIPT} --models={args.models} --rounds={args.rounds} "
             f"--repeats={args.repeats} --warmup={args.warmup}")
  name = "inference"
  if args.detector_batch:
    command += f" --detector_batch={args.detector_batch}"
    name += f"_detector_batch{args.detector_batch}_" + "_".join(models)
  start = time.perf_counter()
  machine = _machine()
  print(json.dumps(machine), flush=True)
  prepared = {m: _prepare(args, m) for m in models}
  timed_start = time.perf_counter()
  result = {"command": command, "machine": machine, "prepared": prepared,
            "models": {}}
  versions = {}
  for model in models:
    commands = _commands(args, model)
    runs = {impl: [] for impl in IMPLS}
    for _ in range(args.rounds):
      for impl in IMPLS:
        found = common.run_json(commands[impl])
        runs[impl].append(found)
        print(f"{model} {impl}: {found['latency_ms_median']:.1f} ms, "
              f"{found['images_per_sec']:.2f} images/s", flush=True)
        versions.update({k: v for k, v in found.items()
                         if k.endswith("_version")})
    result["models"][model] = {
        "batch_size": MODELS[model][3],
        "impls": {impl: _summary(found) for impl, found in runs.items()},
        "runs": runs}
  result["versions"] = versions
  result["timed_wall_s"] = time.perf_counter() - timed_start
  result["wall_s"] = time.perf_counter() - start
  result["load_average_after"] = list(os.getloadavg())
  result["detector_batch"] = args.detector_batch or None
  common.save_part(name, result)
  markdown = _markdown(result)
  common.write_section(name, markdown)
  print(markdown)


def _parser():
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("command", nargs="?", default="run",
                      choices=("run", "_prepare", "_time", "_sweep"))
  parser.add_argument("--models", default="rd_resnet18,rd_wrn50,ganomaly")
  parser.add_argument("--model", choices=sorted(MODELS))
  parser.add_argument("--impl", choices=("detector", "onnx"))
  parser.add_argument("--root", default="/tmp/jo_inference")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--batch_size", type=int, default=0,
                      help="_time: the batch (0: the model's).")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batches", default="1,4,16",
                      help="_sweep: the batch sizes.")
  parser.add_argument(
      "--detector_batch", type=int, default=0,
      help="Images per compiled call of our Detector (0: eval.batch_size, "
      "the timing batch); results go to "
      "inference_detector_batch<k>_<models>.")
  parser.add_argument("--rebuild", action="store_true")
  parser.add_argument("--anomalib_python",
                      default="/work/torch_venv/bin/python")
  return parser


def main():
  args = _parser().parse_args()
  os.environ.setdefault("TRUST_REMOTE_CODE", "1")  # anomalib's .pt loading.
  {"run": cmd_run, "_prepare": cmd_prepare, "_time": cmd_time,
   "_sweep": cmd_sweep}[args.command](args)


if __name__ == "__main__":
  main()
