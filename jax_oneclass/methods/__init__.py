"""Methods: one module per method, each exposing `Method(config, info)`.

See `jax_oneclass.methods.base` for the interface. Adding a method is adding
a module here plus a config file; nothing else changes.
"""

import importlib
import pkgutil

from jax_oneclass.errors import ConfigError

_NOT_METHODS = {"base", "gan", "two_stage"}


def available_methods() -> list[str]:
  """Names of the method modules in this package."""
  return sorted(
      m.name for m in pkgutil.iter_modules(__path__)
      if m.name not in _NOT_METHODS and not m.name.startswith("_"))


def get_method(config, info):
  """Builds the method named by `config.method` for the data set `info`."""
  name = config.method
  if name not in available_methods():
    raise ConfigError(
        f"Unknown method {name!r}. Available methods: "
        f"{', '.join(available_methods())}.")
  module = importlib.import_module(f"jax_oneclass.methods.{name}")
  return module.Method(config, info)
