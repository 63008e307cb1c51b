"""Dense patches of an image and the pixel map of their scores.

The two-stage family's patch mode (`data.patch_size` > 0) scores every
`patch_size` square of a test image whose top-left corner lies on a grid of
step `eval.patch_stride`, plus the last row and column of corners flush
with the image's edge when the grid does not reach it, so every pixel is
covered. A pixel's map value is the mean score of the patches covering it.
The grid, the edge patches and the plain (unweighted, unsmoothed) mean are
our choices: Sohn et al. 2021 report MVTec AD pixel AUROC for this family
but their patch protocol was not available to us.

Everything here is shape-static (positions are NumPy), so `extract` and
`score_map` jit into one computation over all patches of a batch.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def positions(size: int, patch: int, stride: int) -> np.ndarray:
  """Start offsets of the patches along one side of `size` pixels: every
  `stride`-th offset, plus `size - patch` if the grid stops short of it."""
  starts = list(range(0, size - patch + 1, stride))
  if starts[-1] != size - patch:
    starts.append(size - patch)
  return np.asarray(starts, np.int32)


def grid_shape(height: int, width: int, patch: int, stride: int):
  """(rows, columns) of patches `extract` takes from a [height, width]
  image."""
  return (
    len(positions(height, patch, stride)),
    len(positions(width, patch, stride)),
  )


def extract(images: jax.Array, patch: int, stride: int) -> jax.Array:
  """The dense patches of images [B, H, W, C]: [B, rows, cols, p, p, C]."""
  _, height, width, _ = images.shape
  rows = positions(height, patch, stride)[:, None] + np.arange(patch)
  cols = positions(width, patch, stride)[:, None] + np.arange(patch)
  x = images[:, rows]  # [B, rows, p, W, C]
  x = x[:, :, :, cols]  # [B, rows, p, cols, p, C]
  return jnp.transpose(x, (0, 1, 3, 2, 4, 5))


def _coverage(size: int, patch: int, stride: int) -> np.ndarray:
  """[size, n] float32: 1 where pixel y lies in the n-th patch's span."""
  starts = positions(size, patch, stride)
  pixel = np.arange(size)[:, None]
  return ((pixel >= starts) & (pixel < starts + patch)).astype(np.float32)


def score_map(
  scores: jax.Array, height: int, width: int, patch: int, stride: int
) -> jax.Array:
  """Per pixel, the mean score of the patches covering it.

  Args:
    scores: [B, rows, cols] patch scores on `extract`'s grid.
    height, width: the image's size.
    patch, stride: as given to `extract`.

  Returns:
    [B, height, width] maps.
  """
  # Coverage is separable: the sum over covering patches is A_y S A_x^T and
  # the count the outer product of the row and column counts.
  cover_y = _coverage(height, patch, stride)
  cover_x = _coverage(width, patch, stride)
  total = jnp.einsum(
    "yi,bij,xj->byx",
    cover_y,
    scores,
    cover_x,
    precision=jax.lax.Precision.HIGHEST,  # No TF32 on GPUs.
  )
  count = np.outer(cover_y.sum(1), cover_x.sum(1))
  return total / count


@functools.lru_cache(maxsize=None)
def _resize_matrix(size: int, out: int) -> np.ndarray:
  """[out, size]: `jax.image.resize`'s antialiased linear weights along one
  axis (resizing is separable)."""
  with jax.ensure_compile_time_eval():
    return np.asarray(jax.image.resize(jnp.eye(size), (out, size), "linear"))


def resize(images: jax.Array, out: int) -> jax.Array:
  """Images [B, H, W, C] resized to [B, out, out, C] as `jax.image.resize`
  ('linear') does, written as two products with constant matrices so that
  the batch size may stay symbolic (ONNX export)."""
  _, height, width, _ = images.shape
  return jnp.einsum(
    "yh,bhwc,xw->byxc",
    _resize_matrix(height, out),
    images,
    _resize_matrix(width, out),
    precision=jax.lax.Precision.HIGHEST,
  )
