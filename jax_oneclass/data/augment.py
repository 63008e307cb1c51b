"""Stateless image augmentations and a small spec mini-language.

A spec is a '|'-separated list of ops, each `name` or `name(args)` where the
args are Python literals, e.g.
"random_resized_crop(0.08)|flip_lr|color_jitter(0.4,0.4,0.4,0.1,p=0.8)".
Every op maps (image float32 [H, W, C] in [0, 1], seed int32 [2]) -> image of
the same shape. Only TF stateless random ops are used so that an image's
augmentation is a pure function of its seed (needed for exact resume).
"""

import ast
import functools
import inspect
import math
from typing import Callable

import tensorflow as tf

from jax_oneclass.errors import ConfigError

Op = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def _fold(seed: tf.Tensor, i: int) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(seed, i)


def _uniform(seed, minval=0.0, maxval=1.0, shape=()):
  return tf.random.stateless_uniform(shape, seed, minval, maxval)


def _with_probability(p: float, image, seed, fn):
  """Returns fn(image) with probability p, else image."""
  apply = _uniform(_fold(seed, 0)) < p
  return tf.cond(apply, lambda: fn(image, _fold(seed, 1)), lambda: image)


def random_resized_crop(
  scale_min: float = 0.08, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> Op:
  """Crops a random area fraction in [scale_min, 1] and resizes it back."""
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

  def op(image, seed):
    area = _uniform(_fold(seed, 0), scale_min, 1.0)
    aspect = tf.exp(_uniform(_fold(seed, 1), *log_ratio))
    # Single draw clipped to the image instead of rejection sampling: keeps
    # the op cheap and branch-free.
    h = tf.minimum(tf.sqrt(area / aspect), 1.0)
    w = tf.minimum(tf.sqrt(area * aspect), 1.0)
    y0 = _uniform(_fold(seed, 2)) * (1.0 - h)
    x0 = _uniform(_fold(seed, 3)) * (1.0 - w)
    box = tf.stack([y0, x0, y0 + h, x0 + w])[None]
    size = tf.shape(image)[:2]
    return tf.image.crop_and_resize(image[None], box, [0], size)[0]

  return op


def flip_lr() -> Op:
  """Flips left-right with probability 1/2."""
  return tf.image.stateless_random_flip_left_right


def _jitter(image, seed, brightness, contrast, saturation, hue):
  if brightness:
    factor = _uniform(_fold(seed, 0), 1 - brightness, 1 + brightness)
    image = tf.clip_by_value(image * factor, 0.0, 1.0)
  if contrast:
    image = tf.image.stateless_random_contrast(
      image, 1 - contrast, 1 + contrast, _fold(seed, 1)
    )
    image = tf.clip_by_value(image, 0.0, 1.0)
  if image.shape[-1] == 3:
    if saturation:
      image = tf.image.stateless_random_saturation(
        image, 1 - saturation, 1 + saturation, _fold(seed, 2)
      )
      image = tf.clip_by_value(image, 0.0, 1.0)
    if hue:
      image = tf.image.stateless_random_hue(image, hue, _fold(seed, 3))
  return tf.clip_by_value(image, 0.0, 1.0)


def _reference_jitter_ops(
  seed, brightness, contrast, saturation, hue, channels
):
  """The reference's four jitter ops as fns of the image, unclipped.

  Op i draws from fold(seed, i), whatever its place in the order.
  """
  ops = []
  if brightness:  # tf.image.random_brightness: x + U(-b, b).
    ops.append(
      lambda x: tf.image.stateless_random_brightness(
        x, brightness, _fold(seed, 0)
      )
    )
  if contrast:
    ops.append(
      lambda x: tf.image.stateless_random_contrast(
        x, 1 - contrast, 1 + contrast, _fold(seed, 1)
      )
    )
  if channels == 3 and saturation:
    ops.append(
      lambda x: tf.image.stateless_random_saturation(
        x, 1 - saturation, 1 + saturation, _fold(seed, 2)
      )
    )
  if channels == 3 and hue:  # The reference bounds the hue delta by 0.5.
    ops.append(
      lambda x: tf.image.stateless_random_hue(x, min(hue, 0.5), _fold(seed, 3))
    )
  return ops


def _reference_jitter(image, seed, brightness, contrast, saturation, hue):
  """The ops of `_reference_jitter_ops` in a random order, no clipping."""
  ops = _reference_jitter_ops(
    seed, brightness, contrast, saturation, hue, image.shape[-1]
  )
  if len(ops) < 2:
    return ops[0](image) if ops else image
  order = tf.argsort(_uniform(_fold(seed, 4), shape=(len(ops),)))
  for position in range(len(ops)):
    image = tf.switch_case(
      order[position], [functools.partial(op, image) for op in ops]
    )
  return image


def color_jitter(
  brightness: float,
  contrast: float,
  saturation: float,
  hue: float,
  p: float = 0.8,
  form: str = "multiplicative",
) -> Op:
  """Colour jitter applied with probability p.

  form 'multiplicative': brightness x * U(1 - b, 1 + b), then contrast,
  saturation and hue in that order, clipped to [0, 1] after every op.
  form 'reference': the reference code's ColorJitter (Sohn et al. 2021,
  data/augment_ops.py): tf.image.random_brightness's additive x + U(-b, b),
  the four ops in a random order (drawn per image here), nothing clipped
  (the augment pipeline clips once at its end). Saturation and hue are
  skipped for 1-channel images in both forms.
  """
  forms = {"multiplicative": _jitter, "reference": _reference_jitter}
  if form not in forms:
    raise ConfigError(
      f"color_jitter: form must be one of {sorted(forms)}, got {form!r}."
    )
  jitter = forms[form]

  def op(image, seed):
    return _with_probability(
      p,
      image,
      seed,
      lambda x, s: jitter(x, s, brightness, contrast, saturation, hue),
    )

  return op


def _to_gray(image, seed):
  del seed
  if image.shape[-1] != 3:
    return image
  return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def grayscale(p: float = 0.2) -> Op:
  """Converts to grayscale with probability p, keeping the channel count."""
  return lambda image, seed: _with_probability(p, image, seed, _to_gray)


def _gaussian_blur(image, sigma, kernel_size):
  radius = kernel_size // 2
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-(x**2) / (2.0 * sigma**2))
  kernel /= tf.reduce_sum(kernel)
  channels = image.shape[-1]
  kx = tf.tile(kernel[None, :, None, None], [1, 1, channels, 1])
  ky = tf.tile(kernel[:, None, None, None], [1, 1, channels, 1])
  padded = tf.pad(
    image[None],
    [[0, 0], [radius, radius], [radius, radius], [0, 0]],
    mode="REFLECT",
  )
  out = tf.nn.depthwise_conv2d(padded, kx, [1, 1, 1, 1], "VALID")
  out = tf.nn.depthwise_conv2d(out, ky, [1, 1, 1, 1], "VALID")
  return out[0]


def blur(p: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0)) -> Op:
  """Gaussian blur with probability p; kernel ~10% of the image side."""

  def fn(image, seed):
    side = image.shape[0]
    kernel_size = max(3, int(round(0.1 * side)) // 2 * 2 + 1)
    kernel_size = min(kernel_size, 2 * (side - 1) + 1)  # Reflect-pad limit.
    s = _uniform(seed, sigma[0], sigma[1])
    return _gaussian_blur(image, s, kernel_size)

  return lambda image, seed: _with_probability(p, image, seed, fn)


def rotate90() -> Op:
  """Rotates by a random multiple of 90 degrees (square images)."""

  def op(image, seed):
    k = tf.random.stateless_uniform((), seed, 0, 4, dtype=tf.int32)
    return tf.image.rot90(image, k)

  return op


OPS: dict[str, Callable[..., Op]] = {
  "random_resized_crop": random_resized_crop,
  "flip_lr": flip_lr,
  "color_jitter": color_jitter,
  "grayscale": grayscale,
  "blur": blur,
  "rotate90": rotate90,
}


def _parse_op(token: str) -> Op:
  """Parses one `name` or `name(args)` token into an op."""
  try:
    call = ast.parse(token, mode="eval").body
  except SyntaxError as e:
    raise ConfigError(f"Cannot parse augmentation op {token!r}: {e}.") from e
  if isinstance(call, ast.Name):
    name, args, kwargs = call.id, [], {}
  elif isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
    name = call.func.id
    try:
      args = [ast.literal_eval(a) for a in call.args]
      kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except ValueError as e:
      raise ConfigError(
        f"Augmentation op {token!r}: arguments must be Python literals."
      ) from e
  else:
    raise ConfigError(
      f"Cannot parse augmentation op {token!r}; expected "
      "`name` or `name(args)`."
    )
  if name not in OPS:
    raise ConfigError(
      f"Unknown augmentation op {name!r}; known ops: {', '.join(sorted(OPS))}."
    )
  factory = OPS[name]
  try:
    inspect.signature(factory).bind(*args, **kwargs)
  except TypeError as e:
    raise ConfigError(
      f"Bad arguments for augmentation op {token!r}: {e}; "
      f"signature: {name}{inspect.signature(factory)}."
    ) from e
  return factory(*args, **kwargs)


def parse_augment(spec: str) -> Op:
  """Parses an augmentation spec into fn(image, seed) -> image in [0, 1]."""
  tokens = [t.strip() for t in (spec or "").split("|") if t.strip()]
  ops = [_parse_op(t) for t in tokens]

  def augment(image, seed):
    for i, op in enumerate(ops):
      image = op(image, _fold(seed, i))
    return tf.clip_by_value(image, 0.0, 1.0)

  return augment
