"""Reference benchmark of anomalib's PyTorch GANomaly (CPU), for comparison.

This script is the reference side of the GANomaly comparison: it imports the
torch model and losses from the PyPI package ``anomalib`` and drives them with
a plain training loop that mirrors ``Ganomaly.training_step`` of anomalib's
Lightning module (no Lightning trainer, no anomalib pre-processing), so the
numbers can be set next to the JAX implementation in this repository.

It does not import ``jax_oneclass`` and must run in its own environment, e.g.
the virtualenv ``/work/anomalib_venv`` (CPU torch, anomalib, pillow, numpy,
scikit-learn)::

  PY=/work/anomalib_venv/bin/python

  # Train-step throughput on random inputs in [-1, 1].
  $PY experiments/torch/anomalib_ganomaly.py throughput --image_size=32 \
      --batch_size=64 --width=64 --latent=100 --channels=3 --steps=20 \
      --warmup=3 --threads=2 --out=/tmp/anomalib_ganomaly/throughput.json

  # One-class CIFAR-10: train on one class, score the whole test split.
  $PY experiments/torch/anomalib_ganomaly.py cifar10 \
      --data=/tmp/cifar10/cifar10-jpeg --normal_class=0 --steps=500 \
      --batch_size=64 --image_size=32 --width=64 --latent=100 --seed=0 \
      --out=/tmp/anomalib_ganomaly/cifar10_c0.json

One training step (as in anomalib's ``training_step``, manual optimisation):

  1. ``padded, fake, latent_i, latent_o = model(x)`` (train mode);
  2. ``pred_real = D(padded)``, ``pred_fake = D(fake)``;
  3. generator loss (weights wadv=1, wcon=50, wenc=1), ``zero_grad`` /
     ``backward(retain_graph=True)`` / ``step`` of the generator's Adam;
  4. ``pred_fake = D(fake.detach())``, discriminator loss on
     ``(pred_real, pred_fake)``, ``zero_grad`` / ``backward`` / ``step`` of the
     discriminator's Adam.

Both optimisers are Adam with lr 2e-4 and betas (0.5, 0.999). The anomaly score
is what the model returns in eval mode: ``mean((latent_i - latent_o) ** 2)``
over the latent channels (anomalib min-max normalises it afterwards, which does
not change the AUROC).

Each subcommand prints one JSON object and, with ``--out``, also writes it to a
file (parent folders are created).
"""

import argparse
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score
import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# Importing anomalib pulls in every model and their deprecation warnings.
# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import measure  # Standard library only: no JAX here.
import anomalib
from anomalib.models.image.ganomaly import loss as ganomaly_loss
from anomalib.models.image.ganomaly import torch_model as ganomaly_torch
# pylint: enable=g-import-not-at-top,wrong-import-position

# Peak RSS once torch and anomalib are imported, before any model exists: the
# baseline that peak_rss_mb includes (anomalib imports every model family).
_IMPORT_RSS_MB = measure.rss_mb()
CIFAR10_TARBALL = Path("/work/shared/data/cifar10-jpeg.tar.gz")
LR = 2e-4
BETAS = (0.5, 0.999)


def _versions():
  """Returns the versions of the libraries this benchmark measures."""
  return {
    "torch_version": torch.__version__,
    "anomalib_version": anomalib.__version__,
    "torch_num_threads": torch.get_num_threads(),
    "import_rss_mb": _IMPORT_RSS_MB,
    "python_version": sys.version.split()[0],
  }


class GanomalyTrainer:
  """anomalib's GANomaly torch model, its two losses and its two optimisers.

  Attributes:
    model: `anomalib...torch_model.GanomalyModel` (generator + discriminator).
    generator_loss: `anomalib...loss.GeneratorLoss` (wadv=1, wcon=50, wenc=1).
    discriminator_loss: `anomalib...loss.DiscriminatorLoss`.
    d_opt: Adam over the discriminator's parameters.
    g_opt: Adam over the generator's parameters.
  """

  def __init__(self, image_size, channels, width, latent):
    self.model = ganomaly_torch.GanomalyModel(
      input_size=(image_size, image_size),
      num_input_channels=channels,
      n_features=width,
      latent_vec_size=latent,
      extra_layers=0,
      add_final_conv_layer=True,
    )
    self.generator_loss = ganomaly_loss.GeneratorLoss(wadv=1, wcon=50, wenc=1)
    self.discriminator_loss = ganomaly_loss.DiscriminatorLoss()
    # Same creation order as anomalib's configure_optimizers: D first, then G.
    self.d_opt = torch.optim.Adam(
      self.model.discriminator.parameters(), lr=LR, betas=BETAS
    )
    self.g_opt = torch.optim.Adam(
      self.model.generator.parameters(), lr=LR, betas=BETAS
    )

  def num_params(self):
    """Returns the parameter counts of the generator and the discriminator."""
    count = lambda m: sum(p.numel() for p in m.parameters())
    return {
      "generator_params": count(self.model.generator),
      "discriminator_params": count(self.model.discriminator),
    }

  def train_step(self, images):
    """Runs one full training step on `images` (NCHW float in [-1, 1]).

    Args:
      images: float32 tensor of shape (batch, channels, height, width).

    Returns:
      (generator loss, discriminator loss) as detached scalar tensors.
    """
    model = self.model
    model.train()
    padded, fake, latent_i, latent_o = model(images)
    pred_real, _ = model.discriminator(padded)

    pred_fake, _ = model.discriminator(fake)
    g_loss = self.generator_loss(
      latent_i, latent_o, padded, fake, pred_real, pred_fake
    )
    self.g_opt.zero_grad()
    g_loss.backward(retain_graph=True)
    self.g_opt.step()

    pred_fake, _ = model.discriminator(fake.detach())
    d_loss = self.discriminator_loss(pred_real, pred_fake)
    self.d_opt.zero_grad()
    d_loss.backward()
    self.d_opt.step()
    return g_loss.detach(), d_loss.detach()

  @torch.no_grad()
  def scores(self, images, batch_size=500):
    """Returns eval-mode anomaly scores (numpy, one per image).

    Args:
      images: float32 tensor of shape (n, channels, height, width).
      batch_size: images per forward pass.
    """
    self.model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
      batch = self.model(images[start : start + batch_size])
      out.append(batch.pred_score.reshape(-1).cpu().numpy())
    return np.concatenate(out)


def _to_tensor(uint8_nhwc):
  """uint8 NHWC numpy -> float32 NCHW torch tensor in [-1, 1]."""
  x = torch.from_numpy(np.ascontiguousarray(uint8_nhwc))
  return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def cmd_throughput(args):
  """Times full training steps on random inputs in [-1, 1]."""
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  trainer = GanomalyTrainer(
    args.image_size, args.channels, args.width, args.latent
  )
  images = (
    torch.rand(args.batch_size, args.channels, args.image_size, args.image_size)
    * 2.0
    - 1.0
  )

  losses = []

  def step():
    losses.append(trainer.train_step(images))

  timing = measure.time_steps(
    step, args.steps, args.warmup, args.batch_size, "images"
  )
  # Before the FLOP count and kernel rates allocate.
  peak_rss = measure.rss_mb()
  g_loss, d_loss = losses[-1]
  result = {
    "benchmark": "anomalib_ganomaly_throughput",
    **timing,
    "step_matmul_gflop": measure.torch_step_flops(step) / 1e9,
    "kernel_rates": measure.torch_kernel_rates(),
    "final_generator_loss": float(g_loss),
    "final_discriminator_loss": float(d_loss),
    "peak_rss_mb": peak_rss,
    "image_size": args.image_size,
    "batch_size": args.batch_size,
    "width": args.width,
    "latent": args.latent,
    "channels": args.channels,
    "steps": args.steps,
    "warmup": args.warmup,
    "threads": args.threads,
    "seed": args.seed,
    **trainer.num_params(),
    **_versions(),
  }
  measure.emit(result, args.out)


def _ensure_cifar10(data):
  """Returns the data folder, extracting the shared tarball if missing."""
  data = Path(data)
  if (data / "train").is_dir() and (data / "test").is_dir():
    return data
  if not CIFAR10_TARBALL.exists():
    raise FileNotFoundError(
      f"{data} has no train/ and test/, and {CIFAR10_TARBALL} does not exist"
    )
  print(f"extracting {CIFAR10_TARBALL} to {data.parent}", file=sys.stderr)
  data.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(CIFAR10_TARBALL) as tar:
    tar.extractall(data.parent)
  if not (data / "train").is_dir():
    raise FileNotFoundError(
      f"{data}/train missing after extracting {CIFAR10_TARBALL}"
    )
  return data


def _load_split(split_dir, class_names, image_size):
  """Loads <split>/<class>/*.jpg of `class_names` into uint8 NHWC + labels.

  Args:
    split_dir: folder holding one subfolder per class.
    class_names: list of (index, name) pairs to load.
    image_size: target side; images of another size are resized (bilinear).

  Returns:
    (images uint8 [n, image_size, image_size, 3], class indices int64 [n]).
  """
  images, labels = [], []
  for index, name in class_names:
    for path in sorted((split_dir / name).glob("*.jpg")):
      with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (image_size, image_size):
          img = img.resize((image_size, image_size), Image.BILINEAR)
        images.append(np.asarray(img, dtype=np.uint8))
      labels.append(index)
  return np.stack(images), np.asarray(labels, dtype=np.int64)


def cmd_cifar10(args):
  """One-class CIFAR-10: train on the normal class, AUROC on the test split."""
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  rng = np.random.default_rng(args.seed)
  data = _ensure_cifar10(args.data)
  classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
  if not 0 <= args.normal_class < len(classes):
    raise ValueError(
      f"normal_class {args.normal_class} not in 0..{len(classes) - 1}"
    )

  start = time.perf_counter()
  normal = [(args.normal_class, classes[args.normal_class])]
  train_x, _ = _load_split(data / "train", normal, args.image_size)
  test_x, test_y = _load_split(
    data / "test", list(enumerate(classes)), args.image_size
  )
  load_seconds = time.perf_counter() - start
  if train_x.shape[0] < args.batch_size:
    raise ValueError(f"{train_x.shape[0]} training images < batch size")
  labels = (test_y != args.normal_class).astype(np.int64)  # 1 = anomalous.

  trainer = GanomalyTrainer(args.image_size, 3, args.width, args.latent)
  batches_per_epoch = train_x.shape[0] // args.batch_size  # Drop last.
  order = None
  g_losses, d_losses = [], []
  start = time.perf_counter()
  for step in range(args.steps):
    index = step % batches_per_epoch
    if index == 0:
      order = rng.permutation(train_x.shape[0])
    batch_idx = order[index * args.batch_size : (index + 1) * args.batch_size]
    g_loss, d_loss = trainer.train_step(_to_tensor(train_x[batch_idx]))
    g_losses.append(float(g_loss))
    d_losses.append(float(d_loss))
    if args.log_every and (step + 1) % args.log_every == 0:
      print(
        f"step {step + 1}/{args.steps} g_loss {g_losses[-1]:.4f} "
        f"d_loss {d_losses[-1]:.4f} "
        f"{time.perf_counter() - start:.1f}s",
        file=sys.stderr,
        flush=True,
      )
  train_seconds = time.perf_counter() - start

  start = time.perf_counter()
  scores = trainer.scores(_to_tensor(test_x))
  score_seconds = time.perf_counter() - start
  finite = bool(np.all(np.isfinite(scores)))
  auroc = float(roc_auc_score(labels, scores)) if finite else float("nan")

  tail = max(1, min(50, len(g_losses)))
  result = {
    "benchmark": "anomalib_ganomaly_cifar10",
    "auroc": auroc,
    "normal_class": args.normal_class,
    "normal_class_name": classes[args.normal_class],
    "train_seconds": train_seconds,
    "images_per_sec": args.steps * args.batch_size / train_seconds,
    "score_seconds": score_seconds,
    "load_seconds": load_seconds,
    "num_train": int(train_x.shape[0]),
    "num_test": int(test_x.shape[0]),
    "num_test_anomalous": int(labels.sum()),
    "epochs": args.steps / batches_per_epoch,
    "final_generator_loss_mean": float(np.mean(g_losses[-tail:])),
    "final_discriminator_loss_mean": float(np.mean(d_losses[-tail:])),
    "scores_finite": finite,
    "peak_rss_mb": measure.rss_mb(),
    "data": str(data),
    "steps": args.steps,
    "batch_size": args.batch_size,
    "image_size": args.image_size,
    "width": args.width,
    "latent": args.latent,
    "seed": args.seed,
    "threads": args.threads,
    **trainer.num_params(),
    **_versions(),
  }
  measure.emit(result, args.out)


def _parser():
  """Returns the command-line parser."""
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n", maxsplit=1)[0]
  )
  sub = parser.add_subparsers(dest="command", required=True)

  def common(p, steps, threads=2):
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument(
      "--width",
      type=int,
      default=64,
      help="n_features of anomalib's GanomalyModel.",
    )
    p.add_argument(
      "--latent",
      type=int,
      default=100,
      help="latent_vec_size of anomalib's GanomalyModel.",
    )
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
      "--threads", type=int, default=threads, help="torch.set_num_threads."
    )
    p.add_argument("--out", default="", help="Also write the JSON here.")

  p = sub.add_parser("throughput", help="Train-step images/s on random input.")
  common(p, steps=20)
  p.add_argument("--channels", type=int, default=3)
  p.add_argument("--warmup", type=int, default=3)
  p.set_defaults(func=cmd_throughput)

  p = sub.add_parser("cifar10", help="One-class CIFAR-10 AUROC.")
  common(p, steps=500)
  p.add_argument("--data", default="/tmp/cifar10/cifar10-jpeg")
  p.add_argument("--normal_class", type=int, default=0)
  p.add_argument(
    "--log_every",
    type=int,
    default=100,
    help="Log losses to stderr every this many steps (0: off).",
  )
  p.set_defaults(func=cmd_cifar10)
  return parser


def main(argv=None):
  args = _parser().parse_args(argv)
  args.func(args)


if __name__ == "__main__":
  main()
