"""Process-level measurements shared by both sides of the benchmarks.

Standard library only at import time, so the JAX scripts and the PyTorch
reference scripts (run in anomalib's virtualenv) time steps, read memory and
measure the machine's dense-kernel rates the same way. The framework is
imported inside the function that needs it.
"""

import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

# The dense kernels that bound what a convolutional training step can reach:
# a square float32 matrix product and a ResNet-style 3x3 convolution
# (NHWC batch, height, width, channels in and out).
GEMM_SIZE = 2048
CONV_SHAPE = (32, 32, 32, 128, 128)


def rss_mb(field: str = "VmHWM"):
  """Peak ('VmHWM') or current ('VmRSS') RSS of this process in MiB.

  Not ru_maxrss where /proc exists: Linux carries ru_maxrss over from the
  parent across fork + exec, so a child would report its parent's peak.
  """
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux clear_refs '5'); True if done."""
  try:
    Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False


def cpu_ticks() -> tuple[int, int]:
  """(steal, total) jiffies of all CPUs from /proc/stat (zeros elsewhere)."""
  try:
    fields = [int(v) for v in Path("/proc/stat").read_text().split()[1:9]]
  except OSError:
    return 0, 0
  return fields[7], sum(fields)


def median(values):
  """The middle value (the upper one of an even count)."""
  return sorted(values)[len(values) // 2]


def machine() -> dict:
  """The CPU model (lscpu's 'Model name'), cores, load and `uptime`."""

  def run(command):
    try:
      return subprocess.run(
        command, capture_output=True, text=True, check=False
      ).stdout
    except OSError:
      return ""

  model = next(
    (
      line.split(":", 1)[1].strip()
      for line in run(["lscpu"]).splitlines()
      if line.startswith("Model name")
    ),
    platform.processor() or "unknown",
  )
  return {
    "cpu": model,
    "cores": os.cpu_count(),
    "load_average": list(os.getloadavg()),
    "uptime": run(["uptime"]).strip(),
  }


def time_steps(step, steps: int, warmup: int, items: int, unit: str) -> dict:
  """Times the blocking `step()` `steps` times after `warmup` untimed calls.

  Returns the mean / median / min step time, `unit`s per second from the mean
  (`items` per step), every step's wall and CPU seconds (this process's
  threads together, `time.process_time`), the warm-up time (compilation
  included) and the % of CPU time the VM's host stole while timing.
  """
  start = time.perf_counter()
  for _ in range(warmup):
    step()
  warmup_s = time.perf_counter() - start
  steal, total = cpu_ticks()
  times, cpu_times = [], []
  for _ in range(steps):
    cpu = time.process_time()
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu)
  steal_end, total_end = cpu_ticks()
  mean = sum(times) / len(times)
  return {
    f"{unit}_per_sec": items / mean,
    "step_ms": 1000 * mean,
    "step_ms_median": 1000 * median(times),
    "step_ms_min": 1000 * min(times),
    "step_s_each": [round(t, 4) for t in times],
    "step_cpu_s_each": [round(t, 4) for t in cpu_times],
    "warmup_s_incl_compile": warmup_s,
    "cpu_steal_pct": 100 * (steal_end - steal) / max(1, total_end - total),
  }


def time_latency_and_throughput(run, images, repeats: int, warmup: int) -> dict:
  """Times an inference callable `run(images[:n])` that returns host arrays.

  After `warmup` untimed calls of both sizes: the median ms of `repeats`
  batch-1 calls (each on another image) and images/s from the median of
  `repeats` calls on the whole batch `images`.
  """
  for _ in range(warmup):
    run(images[:1])
    run(images)
  single, batched = [], []
  for i in range(repeats):
    start = time.perf_counter()
    run(images[i % len(images) :][:1])
    single.append(time.perf_counter() - start)
  for _ in range(repeats):
    start = time.perf_counter()
    run(images)
    batched.append(time.perf_counter() - start)
  return {
    "latency_ms_median": 1000 * median(single),
    "latency_ms_each": [round(1000 * t, 2) for t in single],
    "images_per_sec": len(images) / median(batched),
    "batch_ms_each": [round(1000 * t, 2) for t in batched],
  }


def _gflops_rate(run, flops: float, repeats: int) -> float:
  """GFLOP/s of the blocking `run()`, best of `repeats` after one warm-up."""
  run()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - start)
  return flops / best / 1e9


def _kernel_flops() -> tuple[float, float]:
  n = GEMM_SIZE
  batch, height, width, c_in, c_out = CONV_SHAPE
  return 2.0 * n**3, 2.0 * batch * height * width * c_in * c_out * 9


def jax_kernel_rates(repeats: int = 5) -> dict:
  """float32 GFLOP/s of JAX's (XLA:CPU here) GEMM and 3x3 convolution."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  gemm_flops, conv_flops = _kernel_flops()
  a = jnp.ones((GEMM_SIZE, GEMM_SIZE), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  batch, height, width, c_in, c_out = CONV_SHAPE
  x = jnp.ones((batch, height, width, c_in), jnp.float32)
  w = jnp.ones((3, 3, c_in, c_out), jnp.float32)
  conv = jax.jit(
    lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  )
  return {
    "gemm_gflops": _gflops_rate(
      lambda: matmul(a, a).block_until_ready(), gemm_flops, repeats
    ),
    "conv3x3_gflops": _gflops_rate(
      lambda: conv(x, w).block_until_ready(), conv_flops, repeats
    ),
  }


def torch_kernel_rates(repeats: int = 5) -> dict:
  """float32 GFLOP/s of PyTorch's CPU GEMM and 3x3 convolution."""
  import torch  # pylint: disable=g-import-not-at-top

  gemm_flops, conv_flops = _kernel_flops()
  a = torch.ones(GEMM_SIZE, GEMM_SIZE)
  batch, height, width, c_in, c_out = CONV_SHAPE
  x = torch.ones(batch, c_in, height, width)
  conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
  with torch.no_grad():
    return {
      "gemm_gflops": _gflops_rate(lambda: a @ a, gemm_flops, repeats),
      "conv3x3_gflops": _gflops_rate(lambda: conv(x), conv_flops, repeats),
    }


def torch_step_flops(step) -> float:
  """FLOPs of one call of `step()` as torch's FlopCounterMode counts them
  (matrix products and convolutions, forward and backward, 2 per MAC)."""
  from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top

  with flop_counter.FlopCounterMode(display=False) as counter:
    step()
  return float(counter.get_total_flops())


def emit(result: dict, out: str = "") -> None:
  """Prints `result` as JSON and writes it to `out` when given."""
  text = json.dumps(result, indent=2, sort_keys=True)
  print(text, flush=True)
  if out:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
