"""The mixed-precision policy: `config.dtype` 'float32' or 'bfloat16'.

With 'bfloat16', convolutions (`components.conv`) take bfloat16 inputs and
kernels and give bfloat16 activations, while parameters, optimizer state,
BatchNorm statistics and losses stay float32, as flax's examples/imagenet
does with `half_precision`: a BatchNorm has float32 parameters, so it
normalises and outputs float32, and the next convolution casts again.

A network receives the dtype as part of its `conv.ConvSettings`.
"""

import jax.numpy as jnp

from jax_oneclass.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_dtype(name: str):
  """The jnp dtype named by `config.dtype`; ConfigError if unknown."""
  if name not in DTYPES:
    raise ConfigError(
      f"Unknown config.dtype {name!r}; use one of {', '.join(DTYPES)}."
    )
  return DTYPES[name]


def compute_dtype(name: str):
  """The dtype convolutions compute in under `config.dtype` `name`; None
  for float32 (no cast: the inputs' own dtype)."""
  dtype = parse_dtype(name)
  return None if dtype == jnp.float32 else dtype
