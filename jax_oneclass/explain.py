"""Visual explanations: which pixels make an image's anomaly score.

Both explanations attribute one scorer's score of one image (the headline
scorer by default) to the model input's pixels, through the network and the
fitted one-class stage: every scorer is jitted JAX, so `jax.grad` reaches
the pixels.

- Integrated gradients (Sundararajan et al. 2017): (x - x') times the mean
  gradient along the straight path from a baseline x' (the mean normal
  training image, or black) to x, by the midpoint rule over `steps` points,
  vmapped over `chunk` points at a time. The attributions sum to
  score(x) - score(x') up to the rule's error, from the kinks of ReLUs and
  maxima along the path: measured at 64 steps on every method's tiny test
  run (tests/test_explain.py), within 3% of the largest |score(x) -
  score(x')| of four test images, 8.8-12% for reverse distillation's map
  maximum (5.5% at 128 steps, so its test takes 160); the test allows 10%.
- GradCAM (Selvaraju et al. 2017): relu(sum_c mean_hw(dS/dA_c) A_c) of the
  feature map A [h, w, C] of a named layer (`Method.gradcam_layer` by
  default), resized bilinearly to the image.

The activation is reached without changing the networks: a Flax method
interceptor sees every module call; GradCAM adds a zero perturbation to
the layer's output and differentiates with respect to it.

Where the score is not smooth: minima and maxima (1-NN, the k-NN search's
ranking, an anomaly map's maximum, `center_max`) pass the gradient to the
winning element only, and are differentiable almost everywhere; the k-NN
distance's square root has no gradient at distance 0 (an image equal to a
repository point). Nothing fitted on the host (NumPy) is on the scoring
path: it enters as constants. A scorer whose gradient cannot be taken or
is not finite is named in one ConfigError line.
"""

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_oneclass.cli_checks import EXPLANATIONS
from jax_oneclass.errors import ConfigError

_CHECKED_ERRORS = (TypeError, ValueError, NotImplementedError)


@dataclasses.dataclass
class Explanation:
  """One explanation of N images (NumPy).

  `maps` [N, H, W] at the model's resolution: integrated gradients summed
  over channels (signed; positive raises the score), or GradCAM (>= 0).
  `score` [N] is the explained score; `baseline_score` [N] the baseline's
  (integrated gradients) and `layer` the layer (GradCAM), else None.
  """

  names: list[str]
  method: str
  scorer: str
  score: np.ndarray
  maps: np.ndarray
  baseline_score: np.ndarray | None = None
  layer: str | None = None


def image_score(method, state, fitted, scorer: str) -> Callable:
  """`image [H, W, C] -> scalar`: the scorer's score of one image, scored
  alone (a batch of one)."""

  def score(image):
    return method.score(state, fitted, {"image": image[None]}).image[scorer][0]

  return score


def integrated_gradients(
  score: Callable, image, baseline, steps: int = 64, chunk: int = 16
) -> jax.Array:
  """Attributions [H, W, C] of `score(image)` against `baseline`.

  The path integral by the midpoint rule over `steps` points, `chunk` of
  them vmapped at once (memory grows with `chunk`).
  """
  chunk = max(1, min(chunk, steps))
  pad = -steps % chunk
  alphas = jnp.pad((jnp.arange(steps) + 0.5) / steps, (0, pad))
  weights = jnp.pad(jnp.ones((steps,)), (0, pad))
  grad = jax.vmap(jax.grad(score))
  diff = image - baseline

  def chunk_sum(args):
    alpha, weight = args
    path = baseline + alpha[:, None, None, None] * diff
    return jnp.tensordot(weight, grad(path), axes=1)

  per_chunk = jax.lax.map(
    chunk_sum, (alphas.reshape(-1, chunk), weights.reshape(-1, chunk))
  )
  return diff * jnp.sum(per_chunk, axis=0) / steps


def _path(context) -> str:
  return "/".join(context.module.path)


def _is_feature_map(value) -> bool:
  shape = getattr(value, "shape", ())
  return len(shape) == 4 and shape[1] * shape[2] > 1


def module_calls(score: Callable, image) -> list[tuple]:
  """Every module call of `score(image)` in the order they return:
  (path, output ShapeDtypeStruct or None when not a feature map
  [B, h, w, C], index of the first call that returned inside it)."""
  calls = []

  def record(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    start = len(calls)
    out = next_fun(*args, **kwargs)
    shape = None
    if _is_feature_map(out):
      shape = jax.ShapeDtypeStruct(out.shape, out.dtype)
    calls.append((_path(context), shape, start))
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(score, image)
  return calls


def resolve_layer(calls: list[tuple], layer: str) -> str:
  """The module path whose feature map GradCAM uses for `layer`: `layer`
  itself when its first call returns a feature map, else the last feature
  map returned inside that call (e.g. 'backbone' -> its last block)."""
  for i, (path, shape, start) in enumerate(calls):
    if path != layer:
      continue
    if shape is not None:
      return path
    inside = [p for p, s, _ in calls[start:i] if s is not None]
    if inside:
      return inside[-1]
    raise ConfigError(
      f"Layer {layer!r} produces no feature map [B, h, w, C] with h * w > "
      "1; name a convolutional layer (e.g. the backbone's last block)."
    )
  paths = list(dict.fromkeys(p for p, s, _ in calls if s is not None))
  shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
  raise ConfigError(
    f"No layer {layer!r} in the network; layers with feature maps: {shown}."
  )


def gradcam(score: Callable, image, path: str, shapes: list) -> jax.Array:
  """GradCAM map [H, W] of `score(image)` at the module `path`, whose calls
  return `shapes` (see `module_calls`).

  Every call of `path` is perturbed; the map is that of the first call the
  score depends on, at its first image (a scorer that averages over
  transformed copies, like the two-stage `rot_avg`, is explained through
  the untransformed copy).
  """

  def perturbed(deltas):
    activations = []

    def add(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name != "__call__" or _path(context) != path:
        return out
      activations.append(out)
      return out + deltas[len(activations) - 1]

    with nn.intercept_methods(add):
      value = score(image)
    return value, activations

  zeros = [jnp.zeros(s.shape, s.dtype) for s in shapes]
  grads, activations = jax.grad(perturbed, has_aux=True)(zeros)
  maps, used = [], []
  for grad, act in zip(grads, activations):
    grad, act = grad[0].astype(jnp.float32), act[0].astype(jnp.float32)
    weights = jnp.mean(grad, axis=(0, 1))
    cam = jax.nn.relu(jnp.tensordot(act, weights, axes=1))
    maps.append(jax.image.resize(cam, image.shape[:2], "bilinear"))
    used.append(jnp.any(grad != 0))
  return jnp.stack(maps)[jnp.argmax(jnp.stack(used))]


def _not_differentiable(scorer: str, method_name: str, why: str):
  return ConfigError(
    f"Scorer {scorer!r} of {method_name} is not differentiable ({why}); "
    "explain another one (--explain_scorer, or scorer=)."
  )


@functools.lru_cache(maxsize=16)
def _ig_program(method, scorer: str, steps: int, chunk: int):
  """Jitted `(state, fitted, image, baseline) -> (map [H, W], score,
  baseline's score)`, kept so that another state reuses the compilation."""

  def one(state, fitted, image, baseline):
    score = image_score(method, state, fitted, scorer)
    attributions = integrated_gradients(score, image, baseline, steps, chunk)
    return jnp.sum(attributions, -1), score(image), score(baseline)

  return jax.jit(one)


@functools.lru_cache(maxsize=16)
def _gradcam_program(method, scorer: str, path: str, shapes: tuple):
  """Jitted `(state, fitted, image) -> (map [H, W], score)`."""

  def one(state, fitted, image):
    score = image_score(method, state, fitted, scorer)
    return gradcam(score, image, path, list(shapes)), score(image)

  return jax.jit(one)


def explain_images(
  method,
  state,
  fitted,
  images: np.ndarray,
  kind: str,
  scorer: str,
  method_name: str = "the method",
  baseline: np.ndarray | None = None,
  steps: int = 64,
  chunk: int = 16,
  layer: str | None = None,
) -> dict:
  """Maps [N, H, W] of float32 `images` [N, H, W, C] by `kind` (one of
  `EXPLANATIONS`).

  Integrated gradients need `baseline` [H, W, C]; GradCAM uses `layer`
  (default `method.gradcam_layer`). Returns {'maps', 'score' [N]} and
  'baseline_score' [N] or 'layer'.
  """
  if kind not in EXPLANATIONS:
    raise ConfigError(
      f"Unknown explanation {kind!r}; choose from {', '.join(EXPLANATIONS)}."
    )
  if steps < 1:
    raise ConfigError(f"steps must be >= 1, got {steps}.")
  images = jnp.asarray(images, jnp.float32)
  out = {}
  try:
    if kind == "integrated_gradients":
      program = _ig_program(method, scorer, steps, chunk)
      base = jnp.asarray(baseline, jnp.float32)
      results = [program(state, fitted, image, base) for image in images]
      out["baseline_score"] = np.array([float(r[2]) for r in results])
    else:
      layer = layer or getattr(method, "gradcam_layer", None)
      if not layer:
        raise ConfigError(
          f"{method_name} names no default GradCAM layer "
          "(Method.gradcam_layer): pass --gradcam_layer or layer=."
        )
      calls = module_calls(
        image_score(method, state, fitted, scorer), images[0]
      )
      path = resolve_layer(calls, layer)
      shapes = tuple(s for p, s, _ in calls if p == path)
      program = _gradcam_program(method, scorer, path, shapes)
      results = [program(state, fitted, image) for image in images]
      out["layer"] = path
  except _CHECKED_ERRORS as e:
    if isinstance(e, ConfigError):
      raise
    raise _not_differentiable(
      scorer, method_name, f"{type(e).__name__}: {str(e).splitlines()[0]}"
    ) from e
  maps = np.stack([np.asarray(r[0], np.float32) for r in results])
  if not np.all(np.isfinite(maps)):
    raise _not_differentiable(scorer, method_name, "its gradient is not finite")
  out["maps"] = maps
  out["score"] = np.array([float(r[1]) for r in results])
  return out


def display_map(values: np.ndarray) -> np.ndarray:
  """A map's positive part (what raises the score) scaled to [0, 1] by its
  99th percentile, for pictures."""
  positive = np.maximum(np.asarray(values, np.float64), 0.0)
  scale = np.percentile(positive, 99) if positive.any() else 0.0
  if scale <= 0:
    scale = positive.max() or 1.0
  return np.clip(positive / scale, 0.0, 1.0)
