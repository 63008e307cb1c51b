"""Conv weights drawn from a seed in NumPy, the same in the golden script
(with torch) and in the tests (without): the fixtures then store only the
small tensors (BatchNorm) and the outputs, not millions of weights.

`seeded_weights(keys_shapes, seed)` gives every tensor of rank >= 2, in the
order given, He-scaled uniform values from one `default_rng(seed)` stream
(float32 `random`, which NumPy keeps stable across versions). A checksum
stored beside the outputs catches a change of stream all the same.
"""

import json

import numpy as np


def seeded_weights(keys_shapes, seed: int) -> dict[str, np.ndarray]:
  """{key: float32 array} for the rank >= 2 entries of [(key, shape)]."""
  rng = np.random.default_rng(seed)
  weights = {}
  for key, shape in keys_shapes:
    if len(shape) < 2:
      continue
    fan_in = int(np.prod(shape[1:]))
    bound = np.float32(np.sqrt(6.0 / fan_in))  # Uniform with var 2 / fan_in.
    weights[key] = (2 * rng.random(tuple(shape), np.float32) - 1) * bound
  return weights


def checksum(weights: dict[str, np.ndarray]) -> float:
  """A number that changes when any seeded value does."""
  return float(sum(np.sum(w.astype(np.float64) * (i + 1))
                   for i, w in enumerate(weights.values())))


def pack_state(prefix: str, state: dict[str, np.ndarray], seed: int,
               arrays: dict) -> None:
  """Puts a state dict into `arrays` (an npz's contents): its key order and
  shapes, its small tensors as they are, and the seed and checksum of the
  seeded ones."""
  keys_shapes = [(k, list(np.shape(v))) for k, v in state.items()]
  seeded = seeded_weights(keys_shapes, seed)
  for key, value in state.items():
    if key in seeded:
      np.testing.assert_array_equal(value, seeded[key], err_msg=key)
    else:
      arrays[f"{prefix}/{key}"] = np.asarray(value)
  arrays[f"{prefix}.keys"] = np.array(json.dumps(keys_shapes))
  arrays[f"{prefix}.seed"] = np.array(seed)
  arrays[f"{prefix}.checksum"] = np.array(checksum(seeded))


def unpack_state(prefix: str, golden) -> dict[str, np.ndarray]:
  """The state dict `pack_state` stored, in its key order; raises
  AssertionError when the seeded stream no longer matches."""
  keys_shapes = json.loads(str(golden[f"{prefix}.keys"]))
  seeded = seeded_weights(keys_shapes, int(golden[f"{prefix}.seed"]))
  np.testing.assert_allclose(
      checksum(seeded), float(golden[f"{prefix}.checksum"]), rtol=1e-12,
      err_msg="NumPy's random stream changed: rerun tests/golden/"
      "make_goldens.py")
  return {key: seeded[key] if key in seeded else golden[f"{prefix}/{key}"]
          for key, _ in keys_shapes}
