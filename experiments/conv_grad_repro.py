"""Minimal reproduction: XLA:CPU's 3x3 convolution weight gradient vs its
forward pass (and, run with a torch install, vs torch's).

Standalone (jax, numpy; torch optional), so it can be attached to an
upstream report as is:

  python experiments/conv_grad_repro.py            # the JAX side
  /work/torch_venv/bin/python experiments/conv_grad_repro.py --torch

For three ResNet-18 shapes (NHWC batch, size, size, channels, 3x3,
stride 1, 'same'), it prints GFLOP/s of the forward convolution, of the
input gradient and of the weight gradient (each 2*N*H*W*C*C*9 FLOPs), the
median of `--repeats` calls after a warm-up. On the AMD EPYC machine of
issue 14, XLA's weight gradient ran at 2-55 GFLOP/s against 58 forward and
79-97 for torch; `--per_tap` also times the weight gradient written as 9
GEMMs over shifted views of the padded input.
"""

import argparse
import json
import os
import platform
import statistics
import time

SHAPES = ((64, 32, 32, 64), (64, 16, 16, 128), (64, 8, 8, 256))


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def median_seconds(fn, repeats: int) -> float:
  """Median wall time of the blocking `fn()` over `repeats` calls."""
  fn()
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jax_rates(shape, repeats: int, per_tap: bool) -> dict:
  """Forward, input-grad and weight-grad GFLOP/s of XLA's convolution."""
  import jax
  import jax.numpy as jnp
  n, h, w, c = shape
  flops = 2.0 * n * h * w * c * c * 9
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  k = jax.random.normal(jax.random.key(1), (3, 3, c, c), jnp.float32) * 0.05
  dy = jax.random.normal(jax.random.key(2), shape, jnp.float32)

  def conv(x, k):
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  fwd = jax.jit(conv)
  _, vjp = jax.vjp(conv, x, k)
  grad_x = jax.jit(lambda dy: jax.vjp(conv, x, k)[1](dy)[0])
  grad_k = jax.jit(lambda dy: jax.vjp(conv, x, k)[1](dy)[1])
  del vjp
  out = {}
  for name, fn in (("forward", lambda: fwd(x, k)),
                   ("input_grad", lambda: grad_x(dy)),
                   ("weight_grad", lambda: grad_k(dy))):
    seconds = median_seconds(lambda: fn().block_until_ready(), repeats)
    out[name] = round(flops / seconds / 1e9, 1)
  if per_tap:
    @jax.jit
    def taps(x, dy):
      xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      rows = [[jnp.einsum("nhwi,nhwo->io", xp[:, i:i + h, j:j + w], dy)
               for j in range(3)] for i in range(3)]
      return jnp.stack([jnp.stack(r) for r in rows])
    seconds = median_seconds(lambda: taps(x, dy).block_until_ready(), repeats)
    out["weight_grad_per_tap"] = round(flops / seconds / 1e9, 1)
  return out


def torch_rates(shape, repeats: int) -> dict:
  """The same three rates for torch (channels_last, float32)."""
  import torch
  n, h, w, c = shape
  flops = 2.0 * n * h * w * c * c * 9
  x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
  k = (torch.randn(c, c, 3, 3) * 0.05).contiguous(
      memory_format=torch.channels_last)
  dy = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
  conv = torch.nn.functional.conv2d
  bwd = torch.ops.aten.convolution_backward
  args = (None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1)
  out = {}
  with torch.no_grad():
    for name, fn in (
        ("forward", lambda: conv(x, k, padding=1)),
        ("input_grad", lambda: bwd(dy, x, k, *args, (True, False, False))),
        ("weight_grad", lambda: bwd(dy, x, k, *args, (False, True, False)))):
      seconds = median_seconds(fn, repeats)
      out[name] = round(flops / seconds / 1e9, 1)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--torch", action="store_true",
                      help="time torch instead of JAX")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--per_tap", action="store_true",
                      help="also time the 9-GEMM weight gradient (JAX)")
  args = parser.parse_args()
  print(json.dumps(dict(cpu=cpu_model(), cores=os.cpu_count(),
                        load=os.getloadavg()[0],
                        side="torch" if args.torch else "jax")))
  for shape in SHAPES:
    rates = (torch_rates(shape, args.repeats) if args.torch
             else jax_rates(shape, args.repeats, args.per_tap))
    print(json.dumps(dict(shape=shape, gflops=rates)), flush=True)


if __name__ == "__main__":
  main()
