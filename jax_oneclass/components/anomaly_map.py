"""Anomaly maps: upsampling, Gaussian smoothing and image scores (jnp).

Shared by the localisation methods. The post-processing follows RD4AD's
evaluation: upsample each map with align-corners bilinear interpolation,
smooth it with a Gaussian (sigma 4, truncated at 4 sigma, SciPy's default
boundary), and take the maximum as the image score. Every function is jnp
and jit-able. Convention: higher score = more anomalous.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np

from jax_oneclass.errors import ConfigError

# Boundary modes by numpy.pad's names: 'symmetric' is SciPy's 'reflect' (its
# default), 'reflect' is SciPy's 'mirror' (torch's reflect padding).
BOUNDARY_MODES = ("symmetric", "reflect")


def _size_pair(size) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  height, width = size
  return int(height), int(width)


def _align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] linear-interpolation weights with corners mapped to corners."""
  weights = np.zeros((out_size, in_size))
  if in_size == 1:
    weights[:, 0] = 1.0
    return weights
  scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  source = np.arange(out_size) * scale
  # Clip so the last output row interpolates (in-2, in-1) with fraction 1.
  low = np.minimum(np.floor(source).astype(int), in_size - 2)
  frac = source - low
  rows = np.arange(out_size)
  weights[rows, low] = 1.0 - frac
  weights[rows, low + 1] = frac
  return weights


@functools.partial(jax.jit, static_argnames=("size",))
def resize_bilinear_align_corners(maps: jax.Array, size) -> jax.Array:
  """Bilinear resize with `align_corners=True` (PyTorch's convention).

  Output pixel i samples the input at i * (in - 1) / (out - 1), so corner
  pixels are copied exactly. `jax.image.resize` uses half-pixel centres
  instead, which is why this exists.

  Args:
    maps: [..., h, w] maps, e.g. [B, h, w].
    size: Output side (int) or (H, W); static under jit.

  Returns:
    [..., H, W] maps in the dtype of `maps`.
  """
  height, width = _size_pair(size)
  rows = jnp.asarray(_align_corners_matrix(maps.shape[-2], height), maps.dtype)
  cols = jnp.asarray(_align_corners_matrix(maps.shape[-1], width), maps.dtype)
  # HIGHEST keeps the weights exact on accelerators that default to TF32.
  return _rows_and_columns(rows, maps, cols)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
  """SciPy's normalised 1-D Gaussian: radius int(truncate * sigma + 0.5)."""
  radius = int(truncate * sigma + 0.5)
  taps = np.arange(-radius, radius + 1)
  kernel = np.exp(-0.5 * taps**2 / sigma**2)
  return kernel / kernel.sum()


def _padded_indices(size: int, radius: int, mode: str) -> np.ndarray:
  """Source index of each of the size + 2 * radius padded positions.

  Folding indices (rather than calling jnp.pad) keeps SciPy's periodic
  extension when the kernel is wider than the map.
  """
  index = np.arange(-radius, size + radius)
  if mode == "symmetric":  # d c b a | a b c d | d c b a: period 2 * size.
    period = 2 * size
    index = index % period
    return np.where(index < size, index, period - 1 - index)
  if size == 1:
    return np.zeros_like(index)
  period = 2 * size - 2  # d c b | a b c d | c b a: edge pixel not repeated.
  index = index % period
  return np.where(index < size, index, period - index)


def blur_matrix(size: int, kernel: np.ndarray, mode: str) -> np.ndarray:
  """[size, size] matrix of the 1-D correlation with `kernel` (boundary
  `mode`): row i holds the weight of every input pixel in output pixel i."""
  radius = len(kernel) // 2
  source = _padded_indices(size, radius, mode)  # Of each padded position.
  matrix = np.zeros((size, size))
  for tap, weight in enumerate(kernel):
    np.add.at(matrix, (np.arange(size), source[tap : tap + size]), weight)
  return matrix


@functools.partial(jax.jit, static_argnames=("sigma", "truncate", "mode"))
def gaussian_blur(
  maps: jax.Array,
  sigma: float = 4.0,
  truncate: float = 4.0,
  mode: str = "symmetric",
) -> jax.Array:
  """Separable Gaussian smoothing over the last two axes.

  Equals `scipy.ndimage.gaussian_filter(m, sigma, truncate=truncate,
  mode=...)` applied to each [H, W] map. Boundary modes use numpy.pad's
  names:
  - 'symmetric' (d c b a | a b c d, edge pixel repeated) is SciPy's
    'reflect', SciPy's default and the official RD4AD evaluation;
  - 'reflect' (d c b | a b c d, edge pixel not repeated) is SciPy's
    'mirror' and torch's 'reflect' padding, as in anomalib's GaussianBlur2d.

  Args:
    maps: [..., H, W] maps, e.g. [B, H, W].
    sigma: Standard deviation in pixels; static under jit.
    truncate: The kernel radius is int(truncate * sigma + 0.5).
    mode: 'symmetric' or 'reflect' (see above).

  Returns:
    The smoothed maps, same shape and dtype.
  """
  if mode not in BOUNDARY_MODES:
    raise ConfigError(
      f"gaussian_blur: mode must be one of {BOUNDARY_MODES}, got {mode!r}."
    )
  kernel = gaussian_kernel(sigma, truncate)
  rows = jnp.asarray(blur_matrix(maps.shape[-2], kernel, mode), maps.dtype)
  cols = jnp.asarray(blur_matrix(maps.shape[-1], kernel, mode), maps.dtype)
  # Two small matmuls; HIGHEST keeps them float32-exact on accelerators
  # that default to TF32.
  return _rows_and_columns(rows, maps, cols)


def _rows_and_columns(rows, maps, cols):
  """rows [H, h] @ maps [..., h, w] @ cols[W, w].T -> [..., H, W].

  Two broadcasting matmuls rather than one three-operand einsum: ONNX
  converters pad the einsum's constant operands to a batch of 1, and
  onnxruntime then infers (and warns about) a batch of 1 for every map.
  """
  highest = jax.lax.Precision.HIGHEST
  return jnp.matmul(
    jnp.matmul(rows, maps, precision=highest), cols.T, precision=highest
  )


# How the upsampled maps of several scales become one: fn(list of
# [..., H, W]) -> [..., H, W]. RD4AD sums them.
MAP_FUSIONS = {
  "sum": sum,
  "mean": lambda maps: sum(maps) / len(maps),
  "product": lambda maps: functools.reduce(jnp.multiply, maps),
}


def register_map_fusion(name: str, fn, replace: bool = False) -> None:
  """Makes `fn(list of [..., H, W] maps) -> [..., H, W]` (jnp, jit-able)
  the fusion `model.map_fusion=name`; an existing name needs `replace`."""
  if name in MAP_FUSIONS and not replace:
    raise ConfigError(
      f"A map fusion {name!r} is registered already; pass "
      "replace=True to replace it, or choose another name."
    )
  MAP_FUSIONS[name] = fn


def map_fusion(name: str):
  """The fusion named `name`: a registered name, or an import path
  'package.module.function' (imported here). Never a silent default."""
  if name in MAP_FUSIONS:
    return MAP_FUSIONS[name]
  module, _, attr = name.rpartition(".")
  if module:
    try:
      return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
      raise ConfigError(
        f"model.map_fusion={name!r} cannot be imported ({e}); add its "
        "folder to PYTHONPATH or list its module in config.plugins."
      ) from e
  raise ConfigError(
    f"Unknown model.map_fusion {name!r}; choose one of "
    f"{sorted(MAP_FUSIONS)}, an import path "
    "'package.module.function', or register one with "
    "anomaly_map.register_map_fusion."
  )


def anomaly_map(
  maps,
  size,
  sigma: float = 4.0,
  mode: str = "symmetric",
  truncate: float = 4.0,
  fusion="sum",
) -> jax.Array:
  """Upsamples [..., h, w] maps to `size` (align corners), then smooths them.

  `maps` is one array, or a sequence of arrays at several scales that are
  fused after upsampling by `fusion` (a name for `map_fusion`, or a
  function; RD4AD sums them). With the defaults this is RD4AD's
  post-processing of its multi-scale maps; `mode='reflect'` gives
  anomalib's boundary instead.
  """
  if isinstance(maps, (list, tuple)):
    fuse = map_fusion(fusion) if isinstance(fusion, str) else fusion
    resized = fuse([resize_bilinear_align_corners(m, size) for m in maps])
  else:
    resized = resize_bilinear_align_corners(maps, size)
  return gaussian_blur(resized, sigma=sigma, truncate=truncate, mode=mode)


def image_scores(maps: jax.Array) -> jax.Array:
  """Image-level anomaly score: the maximum of each [..., H, W] map."""
  return jnp.max(maps, axis=(-2, -1))
