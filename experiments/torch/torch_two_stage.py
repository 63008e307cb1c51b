"""PyTorch reference for the two-stage training step (float32, CPU), run in
the torch virtualenv by `experiments/speed.py steps`:

  /work/torch_venv/bin/python experiments/torch/torch_two_stage.py --method=disaug

The network is what jax_oneclass.methods.two_stage.network builds: the
CIFAR ResNet-18 (3x3 stem, no max-pool; `--width` 64), the MLP head
(`--head_dims`, Dense without bias -> BN -> ReLU, then a linear layer) and
for RotNet a rotation classifier; SGD with momentum 0.9 and weight decay
3e-4 (configs/rotnet.py, configs/disaug.py). A step trains on random
images: `--batch_size` x 2 views with a cross-view contrastive loss
(disaug) or x 4 rotations with cross-entropy (rotnet). Prints one JSON
object (experiments/measure.py's figures).
"""

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments import measure  # pylint: disable=g-import-not-at-top,wrong-import-position


class BasicBlock(nn.Module):
  """Two 3x3 convs; identity or 1x1-projection shortcut."""

  def __init__(self, c_in, c_out, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(c_out)
    self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(c_out)
    self.shortcut = nn.Identity()
    if stride != 1 or c_in != c_out:
      self.shortcut = nn.Sequential(
        nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
      )

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    return torch.relu(self.shortcut(x) + self.bn2(self.conv2(y)))


def network(width, head_dims, num_rotations):
  """CIFAR ResNet-18 + MLP head (+ rotation classifier)."""
  layers = [
    nn.Conv2d(3, width, 3, 1, 1, bias=False),
    nn.BatchNorm2d(width),
    nn.ReLU(),
  ]
  c = width
  for stage in range(4):
    for block in range(2):
      out = width * 2**stage
      layers.append(BasicBlock(c, out, 2 if stage and not block else 1))
      c = out
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
  for dim in head_dims[:-1]:
    layers += [nn.Linear(c, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU()]
    c = dim
  layers.append(nn.Linear(c, head_dims[-1], bias=num_rotations > 0))
  if num_rotations:
    layers.append(nn.Linear(head_dims[-1], num_rotations))
  return nn.Sequential(*layers)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--method", choices=["disaug", "rotnet"], default="disaug"
  )
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--head_dims", default=",".join(["512"] * 8 + ["128"]))
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  head = [int(d) for d in args.head_dims.split(",")]
  views = 4 if args.method == "rotnet" else 2
  model = network(args.width, head, 4 if args.method == "rotnet" else 0)
  model = model.to(memory_format=torch.channels_last)
  optimizer = torch.optim.SGD(
    model.parameters(), lr=0.01, momentum=0.9, weight_decay=3e-4
  )
  n = args.batch_size * views
  images = torch.rand(n, 3, args.image_size, args.image_size).contiguous(
    memory_format=torch.channels_last
  )
  labels = torch.arange(views).repeat_interleave(args.batch_size)
  losses = []

  def loss_fn(out):
    if args.method == "rotnet":
      return nn.functional.cross_entropy(out, labels)
    z = nn.functional.normalize(out, dim=-1)
    a, b = z[: args.batch_size], z[args.batch_size :]
    target = torch.arange(args.batch_size)
    logits = a @ b.T / 0.2
    return 0.5 * (
      nn.functional.cross_entropy(logits, target)
      + nn.functional.cross_entropy(logits.T, target)
    )

  def step():
    optimizer.zero_grad()
    loss = loss_fn(model(images))
    loss.backward()
    optimizer.step()
    losses.append(loss.item())

  timing = measure.time_steps(step, args.steps, args.warmup, n, "images")
  measure.emit(
    {
      "benchmark": f"torch_{args.method}_step",
      **timing,
      "images_per_step": n,
      "final_loss": losses[-1],
      "peak_rss_mb": measure.rss_mb(),
      "torch_version": torch.__version__,
      "threads": torch.get_num_threads(),
    }
  )


if __name__ == "__main__":
  main()
