"""The convolution every network of the library calls, with a choice of how
it is computed and a compute dtype (`config.dtype`, see
`components.precision`).

`conv_general_dilated` here has the signature of `lax.conv_general_dilated`
plus the keywords `weight_grad` (the mode, `config.conv_weight_grad`) and
`compute_dtype` (`ConvSettings.conv_general_dilated` binds them, for
`nn.Conv`'s `conv_general_dilated=`). A 2-D NHWC/HWIO convolution without
dilation or groups has three operations (forward, input gradient, weight
gradient), each computed by one of three paths:

  'xla'     XLA's own convolution.
  'taps'    one GEMM per kernel tap over a strided view of the padded input.
  'im2col'  the taps side by side in one [N*H*W, kh*kw*C] matrix, one GEMM.

The modes:

  'auto' (default) on the CPU, per operation and shape, the path measured
            fastest (`choose`): another path replaces XLA's only when it
            beat XLA's by more than `MARGIN` in every timing round. Each
            choice is cached per jaxlib version, CPU model, core count and
            XLA_FLAGS in `<cache dir>/conv_paths.json` (`$JAX_ONECLASS_CACHE`,
            default ~/.cache/jax_oneclass), so it is timed once per machine,
            and logged (logging.info) once per process. Off the CPU, for
            symbolic shapes (an export) and below `AUTO_MIN_FLOPS`: XLA's.
  'xla'     XLA's everywhere (no custom VJP at all).
  'taps', 'im2col'  that path for the weight gradient, XLA's for the rest.
  'im2col_cpu'  'im2col' weight gradients on the CPU for static shapes, XLA's
            otherwise (the default of earlier versions).

XLA:CPU's own convolution kernels (YNNPACK or Eigen) are a process-wide
XLA flag (`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=...`), not a
path here; the flags are part of the cache key, so each setting gets its
own choices. Runs saved before the key existed ran with 'xla'; pass
--config.conv_weight_grad=xla to continue one with its exact computation.

Networks take a `ConvSettings` (the mode and the compute dtype, built from a
run's config by `settings`) as an attribute and call its
`conv_general_dilated` and `matmul`.
"""

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax

from jax_oneclass.components import precision as precision_lib
from jax_oneclass.components import weights_cache
from jax_oneclass.components import transposed_conv as transposed_conv_lib
from jax_oneclass.errors import ConfigError

MODES = ("auto", "xla", "taps", "im2col", "im2col_cpu")
PATHS = ("xla", "taps", "im2col")
OPS = ("forward", "input_grad", "weight_grad")
# 'auto' times only convolutions of at least this many FLOPs (forward):
# below it the timing costs more than any path could save.
AUTO_MIN_FLOPS = 2e8
# A path replaces XLA's only when faster than it by this fraction in every
# round: a smaller lead is within the noise of a shared machine.
MARGIN = 0.1
ROUNDS = 5
CACHE_FILE = "conv_paths.json"
_XLA_PLAN = ("xla", "xla", "xla")
_NHWC = ("NHWC", "HWIO", "NHWC")
_log = logging.getLogger(__name__)
_chosen: dict = {}  # (machine, entry) -> path, this process's choices.


def check_mode(mode: str) -> str:
  """`mode` if it is one of MODES; ConfigError otherwise."""
  if mode not in MODES:
    raise ConfigError(
      f"Unknown conv weight-gradient mode {mode!r}; use one "
      f"of {', '.join(MODES)} (config.conv_weight_grad)."
    )
  return mode


@dataclasses.dataclass(frozen=True)
class ConvSettings:
  """How a network's convolutions compute: `dtype` ('float32' or
  'bfloat16', see `components.precision`), the `weight_grad` mode (one
  of MODES) and how transposed convolutions run (`transposed_conv`, see
  `components.transposed_conv`). Hashable, so a Flax module can hold it as
  an attribute."""

  dtype: str = "float32"
  weight_grad: str = "auto"
  transposed_conv: str = "subpixel"

  def __post_init__(self):
    precision_lib.parse_dtype(self.dtype)
    check_mode(self.weight_grad)
    transposed_conv_lib.check_method(self.transposed_conv)

  @property
  def compute_dtype(self):
    """The dtype convolutions cast to; None for float32 (the inputs')."""
    return precision_lib.compute_dtype(self.dtype)

  def conv_general_dilated(self, *args, **kwargs):
    """`conv_general_dilated` with these settings (for `nn.Conv`)."""
    return conv_general_dilated(
      *args,
      weight_grad=self.weight_grad,
      compute_dtype=self.compute_dtype,
      **kwargs,
    )

  def matmul(self, x, kernel):
    """`matmul` in these settings' compute dtype."""
    return matmul(x, kernel, self.compute_dtype)

  def conv_transpose(self, x, kernel, strides, padding):
    """`lax.conv_transpose` (NHWC, HWIO, kernel not flipped), computed by
    these settings' `transposed_conv` method and convolution."""
    method = transposed_conv_lib.resolve(
      self.transposed_conv, jax.default_backend()
    )
    return transposed_conv_lib.conv_transpose(
      x, kernel, strides, padding, method=method, conv=self.conv_general_dilated
    )


def settings(config) -> ConvSettings:
  """The ConvSettings of a run's config (`dtype`, `conv_weight_grad`,
  `transposed_conv`)."""
  return ConvSettings(
    config.get("dtype", "float32"),
    config.get("conv_weight_grad", "auto"),
    config.get("transposed_conv", "subpixel"),
  )


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  batch_group_count=1,
  precision=None,
  preferred_element_type=None,
  *,
  weight_grad: str = "auto",
  compute_dtype=None,
):
  """`lax.conv_general_dilated`, floating inputs cast to `compute_dtype`
  (None: as the inputs), computed as mode `weight_grad` says (see the
  module docstring)."""
  dtype = _compute_dtype(lhs, rhs, compute_dtype)
  lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
  kwargs = {
    "lhs_dilation": lhs_dilation,
    "rhs_dilation": rhs_dilation,
    "dimension_numbers": dimension_numbers,
    "feature_group_count": feature_group_count,
    "batch_group_count": batch_group_count,
    "precision": precision,
    "preferred_element_type": preferred_element_type,
  }
  plain = functools.partial(
    lax.conv_general_dilated, lhs, rhs, window_strides, padding, **kwargs
  )
  if not _supported(lhs, rhs, padding, kwargs):
    return plain()
  strides = tuple(int(s) for s in window_strides)
  pads = _explicit_pads(lhs, rhs, strides, padding)
  paths = plan(check_mode(weight_grad), lhs, rhs, strides, pads)
  # On the CPU, bfloat16 takes the custom VJP even on XLA's paths, whose
  # gradients there accumulate in float32 too (see `input_grad`).
  low_cpu = _accumulation(dtype) and jax.default_backend() == "cpu"
  if paths == _XLA_PLAN and not low_cpu:
    return plain()
  return _conv(lhs, rhs, strides, pads, paths)


def matmul(x, kernel, compute_dtype=None):
  """x @ kernel (a 1x1 convolution written as a product), floating inputs
  cast to `compute_dtype` (None: as the inputs); bfloat16 products
  accumulate in float32, forward and backward."""
  dtype = _compute_dtype(x, kernel, compute_dtype)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if _accumulation(dtype):
    return _accumulating_matmul(x, kernel)
  return jnp.dot(x, kernel)


def _compute_dtype(lhs, rhs, compute_dtype):
  if compute_dtype is None or not jnp.issubdtype(lhs.dtype, jnp.floating):
    return jnp.result_type(lhs, rhs)
  return compute_dtype


def _accumulation(dtype) -> dict:
  """The `preferred_element_type` keyword that makes a bfloat16 product
  accumulate in float32 (the fast path of AVX512-BF16 and AMX); {} for
  other dtypes."""
  if jnp.dtype(dtype) == jnp.bfloat16:
    return {"preferred_element_type": jnp.float32}
  return {}


# JAX's own gradient of a product with preferred_element_type casts the
# bfloat16 operands up and multiplies in float32; this one stays bfloat16.
@jax.custom_vjp
def _accumulating_matmul(x, kernel):
  return jnp.dot(x, kernel, **_accumulation(x.dtype)).astype(x.dtype)


def _accumulating_matmul_fwd(x, kernel):
  return _accumulating_matmul(x, kernel), (x, kernel)


def _accumulating_matmul_bwd(residuals, dy):
  x, kernel = residuals
  acc = _accumulation(x.dtype)
  dx = jnp.dot(dy.astype(x.dtype), kernel.T, **acc).astype(x.dtype)
  flat_x = x.reshape(-1, x.shape[-1])
  flat_dy = dy.astype(x.dtype).reshape(-1, dy.shape[-1])
  dkernel = jnp.dot(flat_x.T, flat_dy, **acc).astype(kernel.dtype)
  return dx, dkernel


_accumulating_matmul.defvjp(_accumulating_matmul_fwd, _accumulating_matmul_bwd)


def _supported(lhs, rhs, padding, kwargs) -> bool:
  dn = kwargs["dimension_numbers"]
  if dn is None or lhs.ndim != 4:
    return False
  if not isinstance(dn, lax.ConvDimensionNumbers):
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn)
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  dilations = (kwargs["lhs_dilation"], kwargs["rhs_dilation"])
  return (
    dn == nhwc
    and all(d is None or all(v == 1 for v in d) for d in dilations)
    and kwargs["feature_group_count"] == 1
    and kwargs["batch_group_count"] == 1
    and kwargs["preferred_element_type"] is None
    and kwargs["precision"] is None
  )


def _explicit_pads(lhs, rhs, strides, padding):
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(
      lhs.shape[1:3], rhs.shape[:2], strides, padding
    )
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_flops(lhs_shape, rhs_shape, strides, pads) -> float:
  """Forward multiply-adds x 2 of a NHWC/HWIO convolution."""
  out_hw = _out_size(lhs_shape, rhs_shape, strides, pads)
  return 2.0 * lhs_shape[0] * out_hw[0] * out_hw[1] * np.prod(rhs_shape)


def _out_size(lhs_shape, rhs_shape, strides, pads):
  return tuple(
    (lhs_shape[1 + d] + sum(pads[d]) - rhs_shape[d]) // strides[d] + 1
    for d in range(2)
  )


# ---------------------------------------------------------------------------
# The paths and the custom VJP.


def _accumulator(dtype):
  """The dtype GEMMs accumulate in: float32 for narrower floats, else the
  inputs' own (float64 stays float64 under x64)."""
  return jnp.promote_types(dtype, jnp.float32)


def _tap_views(lhs, kernel_hw, out_hw, strides, pads):
  """The input pixels each kernel tap (i, j) meets: [N, OH, OW, C] views,
  in row-major tap order."""
  padded = jnp.pad(lhs, ((0, 0), pads[0], pads[1], (0, 0)))
  views = []
  for i in range(kernel_hw[0]):
    for j in range(kernel_hw[1]):
      views.append(
        lax.slice(
          padded,
          (0, i, j, 0),
          (
            lhs.shape[0],
            i + (out_hw[0] - 1) * strides[0] + 1,
            j + (out_hw[1] - 1) * strides[1] + 1,
            lhs.shape[3],
          ),
          (1, strides[0], strides[1], 1),
        )
      )
  return views


def forward(lhs, rhs, strides, pads, path: str):
  """The convolution of lhs [N, H, W, I] with rhs [kh, kw, I, O] by
  `path` (one of PATHS)."""
  if path == "xla":
    return lax.conv_general_dilated(
      lhs,
      rhs,
      strides,
      pads,
      dimension_numbers=_NHWC,
      **_accumulation(lhs.dtype),
    ).astype(lhs.dtype)
  kh, kw, c_in, c_out = rhs.shape
  out_hw = _out_size(lhs.shape, rhs.shape, strides, pads)
  views = _tap_views(lhs, (kh, kw), out_hw, strides, pads)
  acc = {"preferred_element_type": _accumulator(lhs.dtype)}
  if path == "taps":
    taps = rhs.reshape(kh * kw, c_in, c_out)
    out = jnp.einsum("nhwi,io->nhwo", views[0], taps[0], **acc)
    for view, tap in zip(views[1:], taps[1:]):
      out = out + jnp.einsum("nhwi,io->nhwo", view, tap, **acc)
  elif path == "im2col":
    out = lax.dot_general(
      jnp.concatenate(views, axis=-1),
      rhs.reshape(kh * kw * c_in, c_out),
      (((3,), (0,)), ((), ())),
      **acc,
    )
  else:
    raise ConfigError(f"No convolution path {path!r}; use one of {PATHS}.")
  return out.astype(lhs.dtype)


def input_grad(rhs, dy, lhs_shape, strides, pads, path: str):
  """The gradient of sum(conv(x, rhs) * dy) with respect to x [N, H, W, I]:
  the transpose of `forward` by `path`."""
  if path == "xla" and _accumulation(dy.dtype):
    # XLA's own, written out: JAX's transpose of a convolution with
    # preferred_element_type would multiply in float32.
    conv = functools.partial(
      lax.conv_general_dilated, **_accumulation(dy.dtype)
    )
    return transposed_conv_lib.input_grad(
      dy, rhs, lhs_shape[1:3], strides, pads, method="xla", conv=conv
    ).astype(dy.dtype)
  zeros = jnp.zeros(lhs_shape, dy.dtype)
  _, vjp = jax.vjp(lambda x: forward(x, rhs, strides, pads, path), zeros)
  return vjp(dy)[0]


def weight_grad(lhs, dy, rhs_shape, strides, pads, path: str):
  """The gradient of sum(conv(lhs, w) * dy) with respect to w [kh, kw, I, O]
  by `path`; the custom paths accumulate in `_accumulator`'s dtype."""
  if path == "xla":
    zeros = jnp.zeros(rhs_shape, dy.dtype)
    _, vjp = jax.vjp(lambda w: forward(lhs, w, strides, pads, path), zeros)
    return vjp(dy)[0]
  kh, kw, c_in, c_out = rhs_shape
  views = _tap_views(lhs, (kh, kw), dy.shape[1:3], strides, pads)
  acc = {"preferred_element_type": _accumulator(dy.dtype)}
  if path == "taps":
    taps = [jnp.einsum("nhwi,nhwo->io", v, dy, **acc) for v in views]
    grad = jnp.stack(taps).reshape(rhs_shape)
  elif path == "im2col":
    patches = jnp.concatenate(views, axis=-1).reshape(-1, kh * kw * c_in)
    grad = lax.dot_general(
      patches, dy.reshape(-1, c_out), (((0,), (0,)), ((), ())), **acc
    )
    grad = grad.reshape(rhs_shape)
  else:
    raise ConfigError(f"No convolution path {path!r}; use one of {PATHS}.")
  return grad.astype(dy.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(lhs, rhs, strides, pads, paths):
  return forward(lhs, rhs, strides, pads, paths[0])


def _conv_fwd(lhs, rhs, strides, pads, paths):
  return _conv(lhs, rhs, strides, pads, paths), (lhs, rhs)


def _conv_bwd(strides, pads, paths, residuals, dy):
  lhs, rhs = residuals
  # 'auto' left by `plan` is chosen here, so a forward-only use never
  # times the gradients.
  key = shape_key(lhs, rhs, strides, pads)
  dx_path, dw_path = (
    _auto_path(op, key) if path == "auto" else path
    for op, path in zip(OPS[1:], paths[1:])
  )
  return (
    input_grad(rhs, dy, lhs.shape, strides, pads, dx_path),
    weight_grad(lhs, dy, rhs.shape, strides, pads, dw_path),
  )


_conv.defvjp(_conv_fwd, _conv_bwd)


# ---------------------------------------------------------------------------
# Choosing the paths: by mode, backend and shape; 'auto' by measurement.


def plan(mode: str, lhs, rhs, strides, pads) -> tuple:
  """(forward, input gradient, weight gradient) paths of one convolution
  under `mode`. 'auto' gradients stay 'auto' and are chosen in the backward
  pass, so a forward-only use never times them, and the traced program is
  the same whether or not they were measured before (a sweep groups
  members by their traced programs)."""
  cpu = jax.default_backend() == "cpu"
  static = all(isinstance(d, int) for d in lhs.shape)
  if mode == "im2col_cpu":
    return ("xla", "xla", "im2col" if cpu and static else "xla")
  if mode in ("taps", "im2col"):
    return ("xla", "xla", mode)
  if mode == "xla" or not (cpu and static):
    return _XLA_PLAN
  if conv_flops(lhs.shape, rhs.shape, strides, pads) < AUTO_MIN_FLOPS:
    return _XLA_PLAN
  key = shape_key(lhs, rhs, strides, pads)
  return (_auto_path("forward", key), "auto", "auto")


def shape_key(lhs, rhs, strides, pads) -> tuple:
  """What a choice depends on besides the machine: shapes, dtype, strides
  and pads."""
  return (
    tuple(lhs.shape),
    tuple(rhs.shape),
    jnp.dtype(lhs.dtype).name,
    tuple(strides),
    tuple(tuple(p) for p in pads),
  )


def entry_name(op: str, key: tuple) -> str:
  """The cache entry of operation `op` (one of OPS) of convolution `key`."""
  lhs, rhs, dtype, strides, pads = key
  return f"{op} lhs={lhs} rhs={rhs} {dtype} strides={strides} pads={pads}"


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), else what `platform` says."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_key() -> str:
  """What every timing depends on: jaxlib, the CPU, its cores, XLA_FLAGS."""
  flags = os.environ.get("XLA_FLAGS", "")
  return (
    f"jaxlib {jaxlib.__version__} | {cpu_model()} | {os.cpu_count()} cores"
    f" | XLA_FLAGS={flags}"
  )


def cache_path() -> Path:
  """The JSON file of measured choices, in the library's cache directory."""
  return weights_cache.cache_dir() / CACHE_FILE


def load_choices(path: Path) -> dict:
  """{machine key: {entry name: {'path', 'seconds'}}}; {} when the file is
  missing or unreadable."""
  try:
    return json.loads(Path(path).read_text())
  except (OSError, ValueError):
    return {}


def save_choice(path: Path, machine: str, entry: str, record: dict) -> None:
  """Adds one choice to the file (read, merge, atomic replace); a cache
  that cannot be written is logged and skipped."""
  path = Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    choices = load_choices(path)
    choices.setdefault(machine, {})[entry] = record
    with tempfile.NamedTemporaryFile(
      "w", dir=path.parent, prefix=path.name, delete=False
    ) as f:
      json.dump(choices, f, indent=1, sort_keys=True)
    os.replace(f.name, path)
  except OSError as e:
    _log.warning("Cannot write the convolution cache %s: %s", path, e)


def pick(seconds: dict, margin: float = MARGIN) -> str:
  """'xla', unless another path took less than (1 - margin) of XLA's time
  in every round; then the one of those with the least median."""
  xla = seconds["xla"]
  faster = {
    name: float(np.median(times))
    for name, times in seconds.items()
    if name != "xla"
    and all(t < (1 - margin) * x for t, x in zip(times, xla, strict=True))
  }
  return min(faster, key=faster.get) if faster else "xla"


def choose(op: str, key: tuple, path: Path, measure_fn) -> str:
  """The path of operation `op` of convolution `key`: this process's
  choice, else the cache file's, else `pick` of `measure_fn(op, *key)`
  (then saved to the file). Logged once per process."""
  machine, entry = machine_key(), entry_name(op, key)
  if (machine, entry) in _chosen:
    return _chosen[(machine, entry)]
  record = load_choices(path).get(machine, {}).get(entry)
  if record is None or record.get("path") not in PATHS:
    # A fresh thread has no trace in progress, so the timing runs for real
    # even when this call is being traced.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      seconds = pool.submit(measure_fn, op, *key).result()
    record = {"path": pick(seconds), "seconds": seconds}
    save_choice(path, machine, entry, record)
  _chosen[(machine, entry)] = record["path"]
  _log.info("Convolution %s: %s", entry, record["path"])
  return record["path"]


def _auto_path(op: str, key: tuple) -> str:
  return choose(op, key, cache_path(), measure)


def chosen_paths() -> dict:
  """{entry name: path} of what 'auto' chose in this process."""
  return {entry: path for (_, entry), path in _chosen.items()}


def measure(
  op, lhs_shape, rhs_shape, dtype, strides, pads, rounds: int = ROUNDS
) -> dict:
  """{path: seconds per call in each round} of operation `op` (one of OPS)
  of one convolution: compiled first, then `rounds` rounds that take the
  paths in turn, so a change in load hits them all alike."""
  with jax.enable_x64(jnp.dtype(dtype) == jnp.float64):
    fns, args = _op_functions(op, lhs_shape, rhs_shape, dtype, strides, pads)
    calls = {name: _calls_per_sample(fn, args) for name, fn in fns.items()}
    seconds = {name: [] for name in fns}
    for _ in range(rounds):
      for name, fn in fns.items():
        start = time.perf_counter()
        for _ in range(calls[name]):
          out = fn(*args)
        out.block_until_ready()
        seconds[name].append((time.perf_counter() - start) / calls[name])
  return seconds


def _op_functions(op, lhs_shape, rhs_shape, dtype, strides, pads):
  """({path: jitted function}, its arguments) of one operation."""
  keys = jax.random.split(jax.random.key(0), 3)
  out_hw = _out_size(lhs_shape, rhs_shape, strides, pads)
  lhs = jax.random.normal(keys[0], lhs_shape, dtype)
  rhs = jax.random.normal(keys[1], rhs_shape, dtype)
  dy = jax.random.normal(keys[2], (lhs_shape[0], *out_hw, rhs_shape[3]), dtype)
  if op == "forward":
    fn, args = lambda p, x, w: forward(x, w, strides, pads, p), (lhs, rhs)
  elif op == "input_grad":
    fn = lambda p, w, d: input_grad(w, d, lhs_shape, strides, pads, p)
    args = (rhs, dy)
  elif op == "weight_grad":
    fn = lambda p, x, d: weight_grad(x, d, rhs_shape, strides, pads, p)
    args = (lhs, dy)
  else:
    raise ConfigError(f"No convolution operation {op!r}; use one of {OPS}.")
  return {p: jax.jit(functools.partial(fn, p)) for p in PATHS}, args


def _calls_per_sample(fn, args, min_seconds: float = 0.01) -> int:
  """Compiles `fn`, then how many calls make one timing sample last at
  least `min_seconds` (at most 20)."""
  fn(*args).block_until_ready()
  start = time.perf_counter()
  fn(*args).block_until_ready()
  once = time.perf_counter() - start
  return int(np.clip(np.ceil(min_seconds / max(once, 1e-9)), 1, 20))
