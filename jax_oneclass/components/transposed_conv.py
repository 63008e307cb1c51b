"""Transposed convolutions without `lhs_dilation`.

XLA:CPU runs a convolution over a dilated input (a transposed convolution,
and the input gradient of a strided convolution) far below its plain
convolution rate. `conv_transpose` computes `lax.conv_transpose` (NHWC,
HWIO, `transpose_kernel=False`, as `nn.ConvTranspose`) by one of METHODS:

  'xla'       XLA's own: a convolution with `lhs_dilation=strides`.
  'subpixel'  one stride-1 convolution to s_h * s_w phases of the output,
              then an interleave (depth-to-space) and a crop.
  'zeros'     zeros inserted between the input pixels (`lax.pad`), then a
              stride-1 convolution.

The last two are built from stride-1 convolutions, pads and reshapes only,
so their automatic gradients (with respect to the input and the kernel)
hold no `lhs_dilation` either. `input_grad` is the input gradient of a
strided convolution written as such a transposed convolution.
"""

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_oneclass.errors import ConfigError

METHODS = ("xla", "subpixel", "zeros")
# Config names: 'auto' is 'subpixel' on the CPU and 'xla' elsewhere.
CONFIG_METHODS = ("auto",) + METHODS
_NHWC = ("NHWC", "HWIO", "NHWC")


def check_method(method: str) -> str:
  """`method` if it is one of CONFIG_METHODS; ConfigError otherwise."""
  if method not in CONFIG_METHODS:
    raise ConfigError(
      f"Unknown transposed-convolution method {method!r}; use one of "
      f"{', '.join(CONFIG_METHODS)} (config.model.transposed_conv)."
    )
  return method


def resolve(method: str, backend: str) -> str:
  """The METHODS entry that `method` (a CONFIG_METHODS name) means on
  `backend` ('cpu', 'gpu', 'tpu')."""
  if check_method(method) == "auto":
    return "subpixel" if backend == "cpu" else "xla"
  return method


def explicit_padding(padding, kernel_hw, strides):
  """`lax.conv_transpose`'s 'SAME' / 'VALID' as (lo, hi) pairs; explicit
  pairs as given."""
  if not isinstance(padding, str):
    return tuple((int(lo), int(hi)) for lo, hi in padding)
  pads = []
  for k, s in zip(kernel_hw, strides):
    if padding == "VALID":
      total = k + s - 2 + max(k - s, 0)
      lo = k - 1
    elif padding == "SAME":
      total = k + s - 2
      lo = math.ceil(total / 2) if s > k - 1 else k - 1
    else:
      raise ConfigError(f"Unknown padding {padding!r}.")
    pads.append((lo, total - lo))
  return tuple(pads)


def conv_transpose(
  x,
  kernel,
  strides,
  padding,
  *,
  method: str = "subpixel",
  conv=lax.conv_general_dilated,
):
  """`lax.conv_transpose(x, kernel, strides, padding)` for NHWC x and HWIO
  kernel, computed by `method` (one of METHODS). `conv` is the convolution
  it calls (signature of `lax.conv_general_dilated`, e.g. a
  `ConvSettings.conv_general_dilated`)."""
  strides = tuple(int(s) for s in strides)
  pads = explicit_padding(padding, kernel.shape[:2], strides)
  if method == "xla":
    return conv(
      x, kernel, (1, 1), pads, lhs_dilation=strides, dimension_numbers=_NHWC
    )
  if method == "zeros":
    zero = jnp.zeros((), x.dtype)
    config = [
      (0, 0, 0),
      *[(lo, hi, s - 1) for (lo, hi), s in zip(pads, strides)],
    ]
    dilated = lax.pad(x, zero, config + [(0, 0, 0)])
    return conv(dilated, kernel, (1, 1), "VALID", dimension_numbers=_NHWC)
  if method == "subpixel":
    return _subpixel(x, kernel, strides, pads, conv)
  raise ConfigError(f"Unknown transposed-convolution method {method!r}.")


def _phases(size, k, s, lo, hi):
  """The sub-pixel plan of one spatial dimension: (taps [W, s] (index k for
  none), input offset a, phase length M, output shift c, output length)."""
  out = (size - 1) * s + 1 + lo + hi - k + 1
  best = None
  for c in range(s):  # The shift of the phase grid with the narrowest window.
    windows = {}
    for r in range(s):
      t0 = (lo + c - r) % s
      if t0 < k:
        d = (r + t0 - lo - c) // s
        windows[r] = (t0, d, -(-(k - t0) // s))
    a = min(d for _, d, _ in windows.values())
    width = max(d + u for _, d, u in windows.values()) - a
    if best is None or width < best[0]:
      best = (width, c, a, windows)
  width, c, a, windows = best
  taps = np.full((width, s), k)
  for r, (t0, d, u) in windows.items():
    for j in range(u):
      taps[d - a + j, r] = t0 + s * j
  return taps, a, -(-(out + c) // s), c, out


def _pad_or_crop(x, pads):
  """x [N, H, W, C] with zeros added (positive) or rows and columns cut
  (negative) on each spatial side; no pad where none is positive
  (jax2onnx's pad cannot take a symbolic batch)."""
  (top, bottom), (left, right) = [(max(-lo, 0), max(-hi, 0)) for lo, hi in pads]
  x = x[:, top : x.shape[1] - bottom, left : x.shape[2] - right]
  grow = [(max(lo, 0), max(hi, 0)) for lo, hi in pads]
  if any(lo or hi for lo, hi in grow):
    x = jnp.pad(x, ((0, 0), *grow, (0, 0)))
  return x


def _subpixel(x, kernel, strides, pads, conv):
  n, h, w, _ = x.shape
  kh, kw, c_in, c_out = kernel.shape
  plan_h = _phases(h, kh, strides[0], *pads[0])
  plan_w = _phases(w, kw, strides[1], *pads[1])
  (taps_h, a_h, m_h, c_h, out_h), (taps_w, a_w, m_w, c_w, out_w) = (
    plan_h,
    plan_w,
  )
  # One zero tap at index k for the window positions a phase does not use.
  padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
  sub = padded[taps_h[:, :, None, None], taps_w[None, None, :, :]]
  # [Wh, sh, Ww, sw, I, O] -> [Wh, Ww, I, sh * sw * O], channels (rh, rw, o).
  sub = sub.transpose(0, 2, 4, 1, 3, 5).reshape(
    taps_h.shape[0], taps_w.shape[0], c_in, -1
  )
  hi_h = m_h + taps_h.shape[0] - 1 - h + a_h
  hi_w = m_w + taps_w.shape[0] - 1 - w + a_w
  x = _pad_or_crop(x, ((-a_h, hi_h), (-a_w, hi_w)))
  y = conv(x, sub, (1, 1), "VALID", dimension_numbers=_NHWC)
  sh, sw = strides
  y = y.reshape(n, m_h, m_w, sh, sw, c_out).transpose(0, 1, 3, 2, 4, 5)
  y = y.reshape(n, m_h * sh, m_w * sw, c_out)
  return y[:, c_h : c_h + out_h, c_w : c_w + out_w]


def input_grad(dy, kernel, lhs_hw, strides, pads, *, method="subpixel", conv):
  """The gradient of sum(conv(x, kernel, strides, pads) * dy) with respect
  to NHWC x of spatial size `lhs_hw` (HWIO kernel, explicit pads), as a
  transposed convolution computed by `method`."""
  flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2)
  transposed_pads = []
  for d in range(2):
    k, s, (lo, _) = kernel.shape[d], strides[d], pads[d]
    before = k - 1 - lo
    after = lhs_hw[d] - (dy.shape[1 + d] - 1) * s - 1 + lo
    transposed_pads.append((before, after))
  return conv_transpose(
    dy, flipped, strides, transposed_pads, method=method, conv=conv
  )
