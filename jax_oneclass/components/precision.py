"""The mixed-precision policy: `config.dtype` 'float32' or 'bfloat16'.

With 'bfloat16', convolutions (`components.conv`) take bfloat16 inputs and
kernels and give bfloat16 activations, while parameters, optimizer state,
BatchNorm statistics and losses stay float32, as flax's examples/imagenet
does with `half_precision`: a BatchNorm has float32 parameters, so it
normalises and outputs float32, and the next convolution casts again.

The policy is read while a function is traced. `apply_to_method` binds a
method's dtype to every public function of that method, so whatever jits
them traces under the right policy.
"""

import contextlib
import contextvars
import functools

import jax.numpy as jnp

from jax_oneclass.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_COMPUTE = contextvars.ContextVar("jax_oneclass_compute_dtype", default=None)


def parse_dtype(name: str):
  """The jnp dtype named by `config.dtype`; ConfigError if unknown."""
  if name not in DTYPES:
    raise ConfigError(f"Unknown config.dtype {name!r}; use one of "
                      f"{', '.join(DTYPES)}.")
  return DTYPES[name]


def compute_dtype():
  """The compute dtype of the policy in force; None means 'as the inputs'."""
  return _COMPUTE.get()


@contextlib.contextmanager
def policy(name: str):
  """Within the block, convolutions compute in the dtype `name` (float32
  means no cast: the inputs' own dtype)."""
  dtype = parse_dtype(name)
  token = _COMPUTE.set(None if dtype == jnp.float32 else dtype)
  try:
    yield
  finally:
    _COMPUTE.reset(token)


def apply_to_method(method, name: str):
  """Wraps every public function of `method` (in place) to run under
  `policy(name)`; returns the method. float32 leaves it untouched."""
  parse_dtype(name)
  if name == "float32":
    return method
  for attr in dir(type(method)):
    if attr.startswith("_") or not callable(getattr(type(method), attr)):
      continue
    fn = getattr(method, attr)
    setattr(method, attr, _under_policy(fn, name))
  return method


def _under_policy(fn, name):
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with policy(name):
      return fn(*args, **kwargs)
  return wrapped
