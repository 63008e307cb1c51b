"""Pictures of anomaly maps: heat-map overlays with ground-truth outlines."""

import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from jax_oneclass.errors import DataError


def jet_colormap(values: np.ndarray) -> np.ndarray:
  """Blue-cyan-yellow-red ramp of values in [0, 1]: [...] -> [..., 3]."""
  values = np.clip(values, 0.0, 1.0)[..., None]
  centres = np.array([0.75, 0.5, 0.25])  # Where red, green, blue peak.
  return np.clip(1.5 - np.abs(4.0 * (values - centres)), 0.0, 1.0)


def mask_contour(masks: np.ndarray) -> np.ndarray:
  """Mask pixels with a 4-neighbour outside the mask: [..., H, W] bool."""
  padded = np.pad(masks, [(0, 0)] * (masks.ndim - 2) + [(1, 1), (1, 1)],
                  mode='edge')
  inner = (padded[..., :-2, 1:-1] & padded[..., 2:, 1:-1]
           & padded[..., 1:-1, :-2] & padded[..., 1:-1, 2:])
  return masks & ~inner


def save_overlays(images: Any, maps: Any, masks: Any, directory: Any,
                  names: Sequence[str] | None = None, alpha: float = 0.5,
                  contour_color: Sequence[float] = (1.0, 1.0, 1.0)
                  ) -> list[str]:
  """Writes heat-map overlays as PNG files.

  The maps are min-max normalised over the whole set (so colours compare
  across images), coloured with `jet_colormap` and alpha-blended onto the
  images; the ground-truth outline is drawn on top when masks are given.

  Args:
    images: [N, H, W, C] images in [0, 1], C = 1 or 3.
    maps: [N, H, W] anomaly maps at the image resolution.
    masks: [N, H, W] ground truth, or None.
    directory: Output folder (str or path), created if missing.
    names: N file names without extension (may contain subfolders);
      default '0000', '0001', ...
    alpha: Weight of the heat map in the blend.
    contour_color: RGB in [0, 1] of the mask outline.

  Returns:
    The paths written, in order.
  """
  images, maps = np.asarray(images, np.float64), np.asarray(maps, np.float64)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise DataError(f'save_overlays: images must be [N, H, W, 1 or 3], got '
                    f'{images.shape}.')
  if maps.shape != images.shape[:3]:
    raise DataError(f'save_overlays: maps {maps.shape} must be [N, H, W] of '
                    f'images {images.shape}.')
  if masks is not None and np.shape(masks) != maps.shape:
    raise DataError(f'save_overlays: masks {np.shape(masks)} must match maps '
                    f'{maps.shape}.')
  if names is None:
    names = [f'{i:04d}' for i in range(len(maps))]
  if len(names) != len(maps):
    raise DataError(f'save_overlays: {len(names)} names for {len(maps)} maps.')
  span = maps.max() - maps.min()
  normalised = (maps - maps.min()) / span if span > 0 else np.zeros_like(maps)
  rgb = np.broadcast_to(images, images.shape[:3] + (3,))
  blended = (1.0 - alpha) * np.clip(rgb, 0.0, 1.0) + alpha * jet_colormap(
      normalised)
  if masks is not None:
    blended[mask_contour(np.asarray(masks, bool))] = contour_color
  pixels = np.round(blended * 255.0).astype(np.uint8)
  paths = []
  for name, image in zip(names, pixels):
    path = os.path.join(directory, f'{name}.png')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path)
    paths.append(path)
  return paths
