"""Reference (PyTorch, CPU) side of the localisation benchmarks.

Two subcommands, each printing one JSON object (and writing it to --out):

  rd_throughput  training-step images/s and peak memory of anomalib's reverse
                 distillation: its torch model, loss and optimiser driven by
                 a plain loop that mirrors ``ReverseDistillation.training_step``
                 (no Lightning trainer, no anomalib pre-processing).
  bank           nearest-neighbour scoring against a random memory bank with
                 plain PyTorch: ``torch.cdist(queries, bank)`` then
                 ``topk(k, largest=False)`` (anomalib is not imported).

It does not import ``jax_oneclass`` and runs in its own environment, e.g. the
virtualenv ``/work/anomalib_venv`` (CPU torch, torchvision, anomalib)::

  PY=/work/anomalib_venv/bin/python
  $PY experiments/torch/anomalib_localization.py rd_throughput \
      --backbone=wide_resnet50_2 --image_size=128 --batch_size=8 --steps=5 \
      --warmup=2 --threads=2
  $PY experiments/torch/anomalib_localization.py bank --bank_size=1000000 --dim=256 \
      --queries=1024 --k=1 --steps=5 --warmup=2 --threads=2

One reverse-distillation step, as anomalib's Lightning module does it
(automatic optimisation):

  1. ``model.train()``; ``encoder_maps, decoder_maps = model(images)``: the
     forward itself puts the encoder in eval mode and runs it under
     ``torch.no_grad`` (``TimmFeatureExtractor`` with requires_grad=False),
     then bottleneck (OCBE) and decoder in train mode;
  2. ``ReverseDistillationLoss`` (1 - cosine of the flattened maps, summed
     over the three layers);
  3. ``zero_grad`` / ``backward`` / ``step`` of Adam over the decoder and
     bottleneck parameters, lr 0.005, betas (0.5, 0.99) as anomalib's
     ``configure_optimizers`` has it; then ``loss.item()`` (its logging).

``pre_trained=False``: timm builds the backbone with random weights, so no
download is needed; the weights do not change the cost of a step.
"""

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import measure  # Standard library only: no JAX here.
# pylint: enable=g-import-not-at-top,wrong-import-position

warnings.filterwarnings("ignore")

LAYERS = ("layer1", "layer2", "layer3")
LR = 0.005
BETAS = (0.5, 0.99)  # anomalib's configure_optimizers (the paper: 0.999).


def _versions():
  """Returns the versions of the libraries this benchmark measures."""
  return {
    "torch_version": torch.__version__,
    "torch_num_threads": torch.get_num_threads(),
    "python_version": sys.version.split()[0],
  }


def cmd_rd_throughput(args):
  """Times anomalib reverse-distillation training steps on random images."""
  # pylint: disable=g-import-not-at-top
  import anomalib
  from anomalib.models.image.reverse_distillation import loss as rd_loss
  from anomalib.models.image.reverse_distillation import torch_model
  from anomalib.models.image.reverse_distillation.anomaly_map import (
    AnomalyMapGenerationMode,
  )

  # pylint: enable=g-import-not-at-top
  import_rss = measure.rss_mb()
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  size = (args.image_size, args.image_size)
  model = torch_model.ReverseDistillationModel(
    backbone=args.backbone,
    input_size=size,
    layers=LAYERS,
    anomaly_map_mode=AnomalyMapGenerationMode.ADD,
    pre_trained=False,
  )
  criterion = rd_loss.ReverseDistillationLoss()
  trained = list(model.decoder.parameters()) + list(
    model.bottleneck.parameters()
  )
  optimizer = torch.optim.Adam(params=trained, lr=LR, betas=BETAS)
  images = torch.randn(args.batch_size, 3, *size)  # As if normalised.
  losses = []

  def step():
    model.train()
    optimizer.zero_grad()
    loss = criterion(*model(images))
    loss.backward()
    optimizer.step()
    losses.append(loss.item())

  timing = measure.time_steps(
    step, args.steps, args.warmup, args.batch_size, "images"
  )
  # Before the FLOP count and kernel rates allocate.
  peak_rss = measure.rss_mb()
  count = lambda params: sum(p.numel() for p in params)
  measure.emit(
    {
      "benchmark": "anomalib_rd_throughput",
      **timing,
      "step_matmul_gflop": measure.torch_step_flops(step) / 1e9,
      "kernel_rates": measure.torch_kernel_rates(),
      "final_loss": losses[-1],
      "peak_rss_mb": peak_rss,
      "import_rss_mb": import_rss,
      "backbone": args.backbone,
      "image_size": args.image_size,
      "batch_size": args.batch_size,
      "steps": args.steps,
      "warmup": args.warmup,
      "threads": args.threads,
      "optimizer_params": count(trained),
      # conv4/bn4 of anomalib's OCBE exist (as in the official code) but
      # take no part in the forward, so they never get a gradient.
      "trained_params": count(p for p in trained if p.grad is not None),
      "encoder_params": count(model.encoder.parameters()),
      "anomalib_version": anomalib.__version__,
      **_versions(),
    },
    args.out,
  )


def cmd_bank(args):
  """Times cdist + topk of `queries` random vectors against a random bank."""
  import_rss = measure.rss_mb()
  torch.set_num_threads(args.threads)
  generator = torch.Generator().manual_seed(args.seed)
  bank = torch.randn(args.bank_size, args.dim, generator=generator)
  queries = torch.randn(args.queries, args.dim, generator=generator)
  data_peak = measure.rss_mb()
  # The peak of generating the data is not the search's: start afresh.
  reset = measure.reset_peak_rss()
  before = measure.rss_mb("VmRSS")
  result = {}

  @torch.no_grad()
  def step():
    distances = torch.cdist(queries, bank)
    result["values"], result["indices"] = distances.topk(args.k, largest=False)

  timing = measure.time_steps(
    step, args.steps, args.warmup, args.queries, "queries"
  )
  measure.emit(
    {
      "benchmark": "torch_cdist_topk",
      **timing,
      "import_rss_mb": import_rss,
      "data_peak_rss_mb": data_peak,
      "peak_reset": reset,
      "rss_before_search_mb": before,
      "search_peak_rss_mb": measure.rss_mb(),
      "peak_rss_mb": max(data_peak, measure.rss_mb()),
      "bank_size": args.bank_size,
      "dim": args.dim,
      "queries": args.queries,
      "k": args.k,
      "steps": args.steps,
      "warmup": args.warmup,
      "threads": args.threads,
      "index_shape": list(result["indices"].shape),
      **_versions(),
    },
    args.out,
  )


def _parser():
  """Returns the command-line parser."""
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n", maxsplit=1)[0]
  )
  sub = parser.add_subparsers(dest="command", required=True)

  def shared(p):
    p.add_argument("--steps", type=int, default=5, help="Timed steps.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps.")
    p.add_argument(
      "--threads", type=int, default=2, help="torch.set_num_threads."
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="Also write the JSON here.")

  p = sub.add_parser("rd_throughput", help="RD train-step images/s.")
  shared(p)
  p.add_argument("--backbone", default="wide_resnet50_2")
  p.add_argument("--image_size", type=int, default=128)
  p.add_argument("--batch_size", type=int, default=8)
  p.set_defaults(func=cmd_rd_throughput)

  p = sub.add_parser("bank", help="cdist + topk queries/s.")
  shared(p)
  p.add_argument("--bank_size", type=int, default=100_000)
  p.add_argument("--dim", type=int, default=256)
  p.add_argument("--queries", type=int, default=1024)
  p.add_argument("--k", type=int, default=1)
  p.set_defaults(func=cmd_bank)
  return parser


def main(argv=None):
  """Parses `argv` and runs the chosen subcommand."""
  args = _parser().parse_args(argv)
  args.func(args)


if __name__ == "__main__":
  main()
