"""Where a jitted step's time goes on XLA:CPU, by kind of operation.

XLA:CPU records each operation it runs (a thunk named after its HLO
instruction) in jax.profiler's trace. `profile` sums those times over a
few calls of a step and groups them by a category read from the compiled
HLO text (`categories`): convolutions by kind, other matrix products,
BatchNorm, the optimiser (everything outside the differentiated function),
copies and transposes, and the rest. Operations of several threads
overlap, so the categories add up to more than the wall time when XLA
runs them concurrently.
"""

import math
import re
import tempfile
from pathlib import Path

CATEGORIES = (
  "conv forward",
  "conv input grad",
  "conv weight grad",
  "conv grad (GEMM path)",
  "matmul",
  "batchnorm",
  "optimiser",
  "copy/transpose",
  "other",
)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = .+? ([a-z][\w\-]*)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_BATCHNORM = re.compile(r"(^|/)(\w*_)?bn\d*/|batchnorm", re.IGNORECASE)
_CONV_SCOPE = re.compile(r"(^|/)\w*conv\w*/", re.IGNORECASE)


def parse_hlo(text: str) -> tuple[dict, dict]:
  """({instruction: (opcode, line)}, {computation: [instruction lines]})."""
  instructions, computations, current = {}, {}, None
  for line in text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      current = line.split()[1 if line.startswith("ENTRY") else 0]
      computations[current.lstrip("%")] = []
      continue
    found = _INSTRUCTION.match(line)
    if found:
      instructions[found.group(1)] = (found.group(2), line)
      if current:
        computations[current.lstrip("%")].append(line)
  return instructions, computations


def _is_weight_grad(line: str) -> bool:
  """A convolution whose window is larger than its output's spatial extent:
  the kernel's gradient (the window spans the whole image)."""
  window = re.search(r"window=\{size=([\dx]+)", line)
  labels = re.search(r"dim_labels=\w+_\w+->(\w+)", line)
  shape = re.search(r"= \w+\[([\d,]+)\]", line)
  if not (window and labels and shape):
    return False
  dims = [int(d) for d in shape.group(1).split(",")]
  spatial = [dims[i] for i, c in enumerate(labels.group(1)) if c.isdigit()]
  sizes = [int(s) for s in window.group(1).split("x")]
  return math.prod(sizes) > math.prod(spatial)


def _forward(names: list[str]) -> bool:
  return any("jvp(" in n and "transpose(" not in n for n in names)


def category(name: str, instructions: dict, computations: dict) -> str:
  """The category of one HLO instruction (a fusion by what it fuses)."""
  if name not in instructions:
    return "other"
  opcode, line = instructions[name]
  lines = [line]
  called = _CALLS.search(line)
  if opcode == "fusion" and called:
    lines += computations.get(called.group(1), [])
  names = [n for text in lines for n in _OP_NAME.findall(text)]
  opcodes = [_INSTRUCTION.match(text).group(2) for text in lines]
  if "convolution" in opcodes:
    conv = lines[opcodes.index("convolution")]
    if _is_weight_grad(conv):
      return "conv weight grad"
    return (
      "conv forward" if _forward(_OP_NAME.findall(conv)) else "conv input grad"
    )
  if "dot" in opcodes:
    if any(_CONV_SCOPE.search(n) for n in names):
      return "conv forward" if _forward(names) else "conv grad (GEMM path)"
    return "matmul"
  if opcode in ("copy", "transpose") or name.startswith(("copy", "transpose")):
    return "copy/transpose"
  if any(_BATCHNORM.search(n) for n in names):
    return "batchnorm"
  if names and not any("jvp(" in n for n in names):
    return "optimiser"
  return "other"


def operation_seconds(xplane: Path) -> dict:
  """{operation name: seconds} of the XLA:CPU thunks in one trace."""
  import jax  # pylint: disable=g-import-not-at-top

  seconds = {}
  for plane in jax.profiler.ProfileData.from_file(str(xplane)).planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for event in line.events:
        if "::" in event.name or event.name.startswith("end: "):
          continue
        seconds[event.name] = seconds.get(event.name, 0.0) + (
          event.duration_ns / 1e9
        )
  return seconds


def by_category(seconds: dict, hlo_text: str, calls: int) -> dict:
  """{category: seconds per call}, largest first, of `operation_seconds`."""
  instructions, computations = parse_hlo(hlo_text)
  totals = dict.fromkeys(CATEGORIES, 0.0)
  for name, value in seconds.items():
    totals[category(name, instructions, computations)] += value / calls
  return {
    k: round(v, 4)
    for k, v in sorted(totals.items(), key=lambda kv: -kv[1])
    if v
  }


def profile(step, hlo_text: str, calls: int = 2) -> dict:
  """Traces `calls` calls of the blocking, warmed-up `step()`."""
  import jax  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as folder:
    jax.profiler.start_trace(folder)
    try:
      for _ in range(calls):
        step()
    finally:
      jax.profiler.stop_trace()
    traces = sorted(Path(folder).rglob("*.xplane.pb"))
    seconds = operation_seconds(traces[-1])
  return by_category(seconds, hlo_text, calls)
