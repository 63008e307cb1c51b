"""The gradient-preference selector: which patch points of each normal image
enter the feature repository, decided before (and independently of) the
centre-constrained MLP.

The criterion ('feature_gradient') is the spatial gradient of the frozen
backbone's patch-feature map: for the point at (i, j) of an image,
sqrt(||F[i, j+1] - F[i, j-1]||^2 + ||F[i+1, j] - F[i-1, j]||^2) / 2
(central differences, edges replicated), optionally divided by ||F[i, j]||
(`bank.normalize`) so that large-norm features are not preferred for their
norm alone. Points where the representation changes (object contours,
texture transitions) carry the structure an anomaly disturbs; flat regions
are redundant with their neighbours. 'random' gives every grid position one
seeded uniform number (the same for every image), for the uniform baseline.

Per image, `bank.fraction` of its h*w points are kept: the
`bank.preferred_fraction` of them ranked first by the criterion
(`bank.prefer`: 'largest' or 'smallest'), the rest a seeded uniform sample
of the other positions. Selecting per image, not over all images' points at
once, keeps every training image in the repository (see
`git show 225ab88:experiments/gp_selector_study.py`). The selection depends
only on the image and the config, so the points the MLP trains on and the
repository it maps are the same ones.

The defaults (smallest gradients, the whole repository by the criterion)
come from that study: on the synthetic MVTec-shaped set the points inside
smooth regions made the best repository for localisation, because a
defect's local discontinuity is then far from every entry, while a
repository of contour points also lies close to the discontinuities that
defects create.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np

from jax_oneclass.errors import ConfigError

CRITERIA = ("feature_gradient", "random")
PREFER = ("largest", "smallest")


# What a config written before the selector's own keys existed means.
_DEFAULTS = {
  "criterion": "feature_gradient",
  "prefer": "largest",
  "normalize": False,
  "max_size": 0,
}


def bank_settings(bank) -> types.SimpleNamespace:
  """`config.bank` with defaults for keys older configs lack, checked."""
  settings = types.SimpleNamespace(**{**_DEFAULTS, **dict(bank)})
  check_bank(settings)
  return settings


def check_bank(bank) -> None:
  """Refuses a bank config the selector cannot use, in one line."""
  if not (0 < bank.fraction <= 1 and 0 <= bank.preferred_fraction <= 1):
    raise ConfigError(
      "bank.fraction must be in (0, 1] and bank.preferred_fraction in [0, 1]."
    )
  if bank.criterion not in CRITERIA:
    raise ConfigError(
      f"bank.criterion={bank.criterion!r} is not one of {', '.join(CRITERIA)}."
    )
  if bank.prefer not in PREFER:
    raise ConfigError(
      f"bank.prefer={bank.prefer!r} must be 'largest' or 'smallest'."
    )


def feature_gradient(points: jax.Array, normalize: bool) -> jax.Array:
  """[B, h, w, D] patch features -> [B, h, w] spatial gradient magnitude."""
  padded = jnp.pad(points, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  d_x = padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]
  d_y = padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]
  magnitude = 0.5 * jnp.sqrt(jnp.sum(d_x**2 + d_y**2, axis=-1))
  if normalize:
    magnitude = magnitude / (jnp.linalg.norm(points, axis=-1) + 1e-6)
  return magnitude


def _position_noise(grid_size: int, seed: int) -> jax.Array:
  """[h*w] one fixed uniform number per grid position."""
  return jax.random.uniform(jax.random.key(seed), (grid_size,))


def selection_scores(points: jax.Array, bank, seed: int) -> jax.Array:
  """[B, h, w, D] -> [B, h*w], higher = preferred first."""
  batch, height, width = points.shape[:3]
  if bank.criterion == "random":
    scores = jnp.broadcast_to(
      _position_noise(height * width, seed + 1), (batch, height * width)
    )
  else:
    scores = feature_gradient(points, bank.normalize).reshape(batch, -1)
  return scores if bank.prefer == "largest" else -scores


def sizes(grid_size: int, bank) -> tuple[int, int]:
  """(points kept per image, how many of them by the criterion)."""
  kept = min(max(int(round(bank.fraction * grid_size)), 1), grid_size)
  return kept, int(round(bank.preferred_fraction * kept))


def select_indices(points: jax.Array, bank, seed: int) -> jax.Array:
  """[B, h, w, D] -> int32 [B, m] flat grid positions, preferred first."""
  grid_size = points.shape[1] * points.shape[2]
  kept, preferred = sizes(grid_size, bank)
  scores = selection_scores(points, bank, seed)
  first = jax.lax.top_k(scores, preferred)[1]
  taken = (
    jnp.zeros(scores.shape, bool)
    .at[jnp.arange(scores.shape[0])[:, None], first]
    .set(True)
  )
  noise = jnp.broadcast_to(_position_noise(grid_size, seed), scores.shape)
  rest = jax.lax.top_k(jnp.where(taken, -1.0, noise), kept - preferred)[1]
  return jnp.concatenate([first, rest], axis=1)


def select_points(points: jax.Array, bank, seed: int) -> jax.Array:
  """[B, h, w, D] -> [B, m, D] the points the selector keeps per image."""
  flat = points.reshape(points.shape[0], -1, points.shape[-1])
  index = select_indices(points, bank, seed)
  return jnp.take_along_axis(flat, index[..., None], axis=1)


def cap(num_points: int, max_size: int, seed: int) -> np.ndarray:
  """Indices of at most `max_size` (> 0; 0 = no cap) of `num_points`
  repository entries, a seeded uniform sample in their order."""
  if max_size <= 0 or num_points <= max_size:
    return np.arange(num_points)
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_points, int(max_size), replace=False))
