"""The gradient-preference selector: which training patch points enter the
repository."""

import numpy as np


def select_repository(gradient_norms: np.ndarray, bank_config, seed: int
                      ) -> np.ndarray:
  """Indices of the repository's points, preferred ones first.

  `bank_config.fraction` of the points (at most `max_size` when > 0): the
  `preferred_fraction` of them with the largest gradient norms, the rest
  drawn uniformly (seeded) from the remaining points.
  """
  total = len(gradient_norms)
  size = max(int(round(bank_config.fraction * total)), 1)
  if bank_config.max_size > 0:
    size = min(size, int(bank_config.max_size))
  preferred = int(round(bank_config.preferred_fraction * size))
  order = np.argsort(-gradient_norms, kind="stable")
  rng = np.random.default_rng(seed)
  sampled = rng.choice(order[preferred:], size - preferred, replace=False)
  return np.concatenate([order[:preferred], np.sort(sampled)])
