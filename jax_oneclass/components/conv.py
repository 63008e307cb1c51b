"""The convolution every network of the library calls, with a choice of how
its weight gradient is computed and a compute dtype (`config.dtype`, see
`components.precision`).

XLA:CPU computes the weight gradient of a 3x3 convolution far below its
forward rate on some CPUs (2 GFLOP/s against 58 forward on an AMD EPYC;
`git show 037b9c0:experiments/conv_grad_repro.py` reproduces it).
`conv_general_dilated` here has the signature of `lax.conv_general_dilated`
plus the keywords `weight_grad` and `compute_dtype`
(`ConvSettings.conv_general_dilated` binds them, for `nn.Conv`'s
`conv_general_dilated=`) and, for 2-D NHWC/HWIO convolutions without
dilation or groups, can compute the weight gradient another way:

  'im2col_cpu' (default) 'im2col' on the CPU backend, 'xla' elsewhere and
            for symbolic shapes (an export).
  'xla'     XLA's own gradient (no custom VJP at all).
  'taps'    one GEMM per kernel tap over a strided view of the padded input.
  'im2col'  the taps side by side in one [N*H*W, kh*kw*C] matrix, one GEMM.
  'auto'    'xla' off the CPU and for small convolutions; on the CPU, per
            shape, whichever of the three runs fastest there alone, timed
            once per process in the first backward pass.

On a quiet 2-core Intel Xeon (AVX512-BF16, AMX) whole float32 train steps
ran faster with 'im2col' than with 'xla' in every row of
`experiments/speed.py steps --conv_weight_grad=MODE`, one run per mode
(DisAug 1855 against 2425 ms, RotNet 3686 against 5009, RD WRN-50-2 1893
against 2771, GANomaly 307 against 376, RD ResNet-18 339 against 350;
experiments/RESULTS.md), hence the default. Under heavy load (7x
oversubscribed) the same comparison was mixed, and 'auto''s per-shape timing
misled there. Runs saved before this key existed ran with 'xla'; the key may
change on resume, so pass --config.conv_weight_grad=xla to continue one with
its exact computation.

The input gradient is always XLA's. Networks take a `ConvSettings` (the
mode and the compute dtype, built from a run's config by `settings`) as an
attribute and call its `conv_general_dilated` and `matmul`.
"""

import concurrent.futures
import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_oneclass.components import precision as precision_lib
from jax_oneclass.errors import ConfigError

MODES = ("im2col_cpu", "auto", "xla", "taps", "im2col")
# 'auto' tunes only convolutions of at least this many FLOPs (forward):
# below it the weight gradient costs too little to be worth a custom VJP.
AUTO_MIN_FLOPS = 2e8
_NHWC = ("NHWC", "HWIO", "NHWC")
_tuned: dict = {}


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
  'bfloat16', see `components.precision`) and the `weight_grad` mode (one
  of MODES). Hashable, so a Flax module can hold it as an attribute."""

  dtype: str = "float32"
  weight_grad: str = "im2col_cpu"

  def __post_init__(self):
    precision_lib.parse_dtype(self.dtype)
    check_mode(self.weight_grad)

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


def settings(config) -> ConvSettings:
  """The ConvSettings of a run's config (`dtype`, `conv_weight_grad`)."""
  return ConvSettings(
    config.get("dtype", "float32"), config.get("conv_weight_grad", "im2col_cpu")
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
  weight_grad: str = "im2col_cpu",
  compute_dtype=None,
):
  """`lax.conv_general_dilated`, floating inputs cast to `compute_dtype`
  (None: as the inputs), with the weight gradient of mode `weight_grad`
  (see the module docstring)."""
  dtype = _compute_dtype(lhs, rhs, compute_dtype)
  lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
  kwargs = dict(
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  plain = functools.partial(
    lax.conv_general_dilated, lhs, rhs, window_strides, padding, **kwargs
  )
  if not _supported(lhs, rhs, padding, kwargs):
    return plain()
  strides = tuple(int(s) for s in window_strides)
  pads = _explicit_pads(lhs, rhs, strides, padding)
  mode = _resolve(check_mode(weight_grad), lhs, rhs, strides, pads)
  if mode == "xla":
    return plain()
  return _conv(lhs, rhs, strides, pads, mode)


def matmul(x, kernel, compute_dtype=None):
  """x @ kernel (a 1x1 convolution written as a product), floating inputs
  cast to `compute_dtype` (None: as the inputs)."""
  dtype = _compute_dtype(x, kernel, compute_dtype)
  return jnp.dot(x.astype(dtype), kernel.astype(dtype))


def _compute_dtype(lhs, rhs, compute_dtype):
  if compute_dtype is None or not jnp.issubdtype(lhs.dtype, jnp.floating):
    return jnp.result_type(lhs, rhs)
  return compute_dtype


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
# The custom VJP.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(lhs, rhs, strides, pads, mode):
  return lax.conv_general_dilated(
    lhs, rhs, strides, pads, dimension_numbers=_NHWC
  )


def _conv_fwd(lhs, rhs, strides, pads, mode):
  return _conv(lhs, rhs, strides, pads, mode), (lhs, rhs)


def _conv_bwd(strides, pads, mode, residuals, dy):
  lhs, rhs = residuals
  if mode == "auto":  # Tuned here, so a forward-only use never times.
    mode = _tuned_mode(lhs, rhs, strides, pads)
  plain = lambda x, w: lax.conv_general_dilated(
    x, w, strides, pads, dimension_numbers=_NHWC
  )
  if mode == "xla":
    return jax.vjp(plain, lhs, rhs)[1](dy)
  (dx,) = jax.vjp(lambda x: plain(x, rhs), lhs)[1](dy)
  return dx, weight_grad(lhs, dy, rhs.shape, strides, pads, mode)


_conv.defvjp(_conv_fwd, _conv_bwd)


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


def weight_grad(lhs, dy, rhs_shape, strides, pads, mode: str):
  """The gradient of sum(conv(lhs, w) * dy) with respect to w [kh, kw, I, O],
  computed by `mode` ('taps' or 'im2col'); float32 accumulation."""
  kh, kw, c_in, c_out = rhs_shape
  out_hw = dy.shape[1:3]
  views = _tap_views(lhs, (kh, kw), out_hw, strides, pads)
  acc = dict(preferred_element_type=jnp.float32)
  if mode == "taps":
    taps = [jnp.einsum("nhwi,nhwo->io", v, dy, **acc) for v in views]
    grad = jnp.stack(taps).reshape(rhs_shape)
  elif mode == "im2col":
    patches = jnp.concatenate(views, axis=-1).reshape(-1, kh * kw * c_in)
    grad = lax.dot_general(
      patches, dy.reshape(-1, c_out), (((0,), (0,)), ((), ())), **acc
    )
    grad = grad.reshape(rhs_shape)
  else:
    raise ConfigError(f"No custom weight gradient {mode!r}.")
  return grad.astype(dy.dtype)


# ---------------------------------------------------------------------------
# 'auto': by backend and shape, timed once per process.


def _resolve(mode, lhs, rhs, strides, pads) -> str:
  """'auto' becomes 'xla' off the CPU, for symbolic shapes (an export) and
  for small convolutions; it stays 'auto' (tuned in the backward pass) for
  the rest."""
  static = all(isinstance(d, int) for d in lhs.shape)
  if mode == "im2col_cpu":
    return "im2col" if jax.default_backend() == "cpu" and static else "xla"
  if mode != "auto":
    return mode
  if jax.default_backend() != "cpu":
    return "xla"
  if not all(isinstance(d, int) for d in lhs.shape):
    return "xla"
  if conv_flops(lhs.shape, rhs.shape, strides, pads) < AUTO_MIN_FLOPS:
    return "xla"
  return "auto"


def _tuned_mode(lhs, rhs, strides, pads) -> str:
  key = (
    tuple(lhs.shape),
    tuple(rhs.shape),
    jnp.dtype(lhs.dtype).name,
    strides,
    pads,
  )
  if key not in _tuned:
    # A fresh thread has no trace in progress, so the timing runs for real
    # even when this call is being traced.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      _tuned[key] = pool.submit(tune, *key).result()
    logging.info("conv weight gradient for %s: %s", key, _tuned[key])
  return _tuned[key]["best"]


def tune(lhs_shape, rhs_shape, dtype, strides, pads, repeats: int = 3) -> dict:
  """Seconds of each mode's weight gradient for one convolution (the best
  of `repeats` after a compiling call) and the fastest, as 'best'."""
  key = jax.random.key(0)
  lhs = jax.random.normal(key, lhs_shape, dtype)
  out_hw = _out_size(lhs_shape, rhs_shape, strides, pads)
  dy = jax.random.normal(key, (lhs_shape[0], *out_hw, rhs_shape[3]), dtype)
  rhs = jnp.zeros(rhs_shape, dtype)

  def xla(lhs, dy):
    _, vjp = jax.vjp(
      lambda w: lax.conv_general_dilated(
        lhs, w, strides, pads, dimension_numbers=_NHWC
      ),
      rhs,
    )
    return vjp(dy)[0]

  candidates = dict(
    xla=xla,
    taps=lambda x, d: weight_grad(x, d, rhs_shape, strides, pads, "taps"),
    im2col=lambda x, d: weight_grad(x, d, rhs_shape, strides, pads, "im2col"),
  )
  seconds = {}
  for name, fn in candidates.items():
    fn = jax.jit(fn)
    fn(lhs, dy).block_until_ready()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn(lhs, dy).block_until_ready()
      times.append(time.perf_counter() - start)
    seconds[name] = min(times)
  return dict(seconds=seconds, best=min(seconds, key=seconds.get))


def tuned_choices() -> dict:
  """What 'auto' chose in this process, per convolution key."""
  return dict(_tuned)
