"""Reference (PyTorch, CPU) side of the inference benchmark.

anomalib 2.7's own deployment path: the Lightning module (pre-processor,
torch model, post-processor) exported with ``AnomalibModule.to_torch`` and
run by ``anomalib.deploy.TorchInferencer``, and exported with
``AnomalibModule.to_onnx`` and run by onnxruntime. Two subcommands, each
printing one JSON object (and writing it to --out):

  export  builds the model (random weights: ``pre_trained=False`` for
          reverse distillation; weights do not change the cost) and writes
          <root>/<model>/weights/{torch/model.pt,onnx/model.onnx};
  time    loads one export in this fresh process, warms up, then times
          batch-1 latency and batched throughput on uint8 images.

It does not import ``jax_oneclass`` and runs in its own environment::

  PY=/work/torch_venv/bin/python
  $PY experiments/torch/anomalib_inference.py export --model=rd_resnet18 \
      --root=/tmp/jo_inference/anomalib
  TRUST_REMOTE_CODE=1 $PY experiments/torch/anomalib_inference.py time \
      --model=rd_resnet18 --impl=torch --root=/tmp/jo_inference/anomalib \
      --batch_size=16 --repeats=5 --threads=2

Models: rd_resnet18 and rd_wrn50 (ReverseDistillation, 256 px, layers 1-3,
anomaly map 'add'), ganomaly (Ganomaly, 32 px, 64 features, latent 100, no
extra layers: the sizes of configs/ganomaly.py). Every timed call starts
from uint8 images [N, H, W, 3] and ends with the score and (reverse
distillation) the anomaly map and mask as NumPy arrays, as ours does.
"""

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import measure  # Standard library only: no JAX here.
# pylint: enable=g-import-not-at-top,wrong-import-position

warnings.filterwarnings("ignore")

MODELS = {
  "rd_resnet18": ("reverse_distillation", "resnet18", 256),
  "rd_wrn50": ("reverse_distillation", "wide_resnet50_2", 256),
  "ganomaly": ("ganomaly", None, 32),
}


def _build(model_name):
  """The anomalib Lightning module of `model_name`, in eval mode."""
  # pylint: disable=g-import-not-at-top
  from anomalib.models import Ganomaly, ReverseDistillation

  # pylint: enable=g-import-not-at-top
  family, backbone, size = MODELS[model_name]
  if family == "reverse_distillation":
    pre = ReverseDistillation.configure_pre_processor((size, size))
    module = ReverseDistillation(
      backbone=backbone,
      pre_trained=False,
      pre_processor=pre,
      evaluator=False,
      visualizer=False,
    )
  else:
    pre = Ganomaly.configure_pre_processor((size, size))
    module = Ganomaly(
      n_features=64,
      latent_vec_size=100,
      extra_layers=0,
      pre_processor=pre,
      evaluator=False,
      visualizer=False,
    )
  return module.eval()


def cmd_export(args):
  """Writes anomalib's torch and ONNX exports of one model."""
  torch.manual_seed(0)
  module = _build(args.model)
  size = MODELS[args.model][2]
  root = Path(args.root) / args.model
  times = {}
  start = time.perf_counter()
  torch_path = module.to_torch(root)
  times["torch_export_s"] = time.perf_counter() - start
  start = time.perf_counter()
  onnx_path = module.to_onnx(root, input_size=(size, size))
  times["onnx_export_s"] = time.perf_counter() - start
  measure.emit(
    {
      "benchmark": "anomalib_export",
      "model": args.model,
      "torch": str(torch_path),
      "onnx": str(onnx_path),
      **times,
    },
    args.out,
  )


def _images(count, size, seed):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (count, size, size, 3), np.uint8)


def _torch_runner(root):
  """images uint8 [N, H, W, 3] -> outputs, with TorchInferencer."""
  from anomalib.deploy import TorchInferencer  # pylint: disable=g-import-not-at-top

  inferencer = TorchInferencer(
    path=root / "weights/torch/model.pt", device="cpu"
  )

  def outputs(batch):
    return {
      k: getattr(batch, k).numpy()
      for k in ("pred_score", "pred_label", "anomaly_map", "pred_mask")
      if getattr(batch, k, None) is not None
    }

  @torch.no_grad()
  def run(images):
    # A float tensor [N, 3, H, W] for every batch size; one NumPy HWC image
    # (TorchInferencer's documented input) is timed apart (numpy_input).
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return outputs(inferencer.predict(x))

  @torch.no_grad()
  def numpy_input(image):
    return outputs(inferencer.predict(image))

  run.numpy_input = numpy_input
  return run


def _onnx_runner(root, threads):
  """images uint8 [N, H, W, 3] -> outputs, with onnxruntime."""
  import onnxruntime  # pylint: disable=g-import-not-at-top

  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = threads
  session = onnxruntime.InferenceSession(
    str(root / "weights/onnx/model.onnx"),
    options,
    providers=["CPUExecutionProvider"],
  )
  name = session.get_inputs()[0].name
  outputs = [o.name for o in session.get_outputs()]

  def run(images):
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32)
    return dict(zip(outputs, session.run(None, {name: x / 255.0})))

  return run


def cmd_time(args):
  """Times one exported model in this process."""
  torch.set_num_threads(args.threads)
  root = Path(args.root) / args.model
  start = time.perf_counter()
  run = (
    _torch_runner(root)
    if args.impl == "torch"
    else _onnx_runner(root, args.threads)
  )
  load_s = time.perf_counter() - start
  size = MODELS[args.model][2]
  images = _images(args.batch_size, size, args.seed)
  steal, total = measure.cpu_ticks()
  start = time.perf_counter()
  timing = measure.time_latency_and_throughput(
    run, images, args.repeats, args.warmup
  )
  steal_end, total_end = measure.cpu_ticks()
  outputs = run(images)
  if hasattr(run, "numpy_input"):  # TorchInferencer.predict(HWC uint8).
    numpy_times = []
    for image in images[: args.repeats]:
      begin = time.perf_counter()
      run.numpy_input(image)
      numpy_times.append(time.perf_counter() - begin)
    timing["latency_ms_numpy_input_median"] = (
      1000 * sorted(numpy_times)[len(numpy_times) // 2]
    )
  import anomalib  # pylint: disable=g-import-not-at-top

  measure.emit(
    {
      "benchmark": "anomalib_inference",
      "model": args.model,
      "impl": f"anomalib {args.impl}",
      **timing,
      "load_s": load_s,
      "timed_s": time.perf_counter() - start,
      "cpu_steal_pct": 100 * (steal_end - steal) / max(1, total_end - total),
      "outputs": {k: list(v.shape) for k, v in outputs.items()},
      "batch_size": args.batch_size,
      "repeats": args.repeats,
      "threads": args.threads,
      "peak_rss_mb": measure.rss_mb(),
      "anomalib_version": anomalib.__version__,
      "torch_version": torch.__version__,
      "torch_num_threads": torch.get_num_threads(),
      "onnxruntime_version": _onnxruntime_version(),
    },
    args.out,
  )


def _onnxruntime_version():
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top

    return onnxruntime.__version__
  except ImportError:
    return None


def _parser():
  """Returns the command-line parser."""
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n", maxsplit=1)[0]
  )
  sub = parser.add_subparsers(dest="command", required=True)

  def shared(p):
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--root", default="/tmp/jo_inference/anomalib")
    p.add_argument("--out", default="", help="Also write the JSON here.")

  p = sub.add_parser("export", help="Write the torch and ONNX exports.")
  shared(p)
  p.set_defaults(func=cmd_export)
  p = sub.add_parser("time", help="Time one export.")
  shared(p)
  p.add_argument("--impl", choices=("torch", "onnx"), required=True)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(func=cmd_time)
  return parser


def main(argv=None):
  """Parses `argv` and runs the chosen subcommand."""
  args = _parser().parse_args(argv)
  args.func(args)


if __name__ == "__main__":
  main()
