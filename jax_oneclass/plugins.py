"""Research code from outside the package: `config.plugins` and import paths.

`config.plugins` lists modules (e.g. "my_lab.classifiers") that are imported
before a run's method is built, so that what they register (methods,
one-class classifiers) exists in every process that reads the run: training,
evaluation, prediction, export. `config.method` may name a module too
("my_lab.deep_svdd"). See docs/extending.md.

This module imports neither JAX nor TensorFlow: the CLI checks plugins
before those load.
"""

import importlib
import importlib.util
import os

from jax_oneclass.errors import ConfigError


def _pythonpath() -> str:
  value = os.environ.get("PYTHONPATH")
  return f"PYTHONPATH={value!r}" if value else "PYTHONPATH is unset"


def import_error(name: str, key: str, needed_by: str, why: str) -> ConfigError:
  """The one-line error for module `name` (from config `key`) that cannot be
  imported."""
  return ConfigError(
    f"Cannot import module {name!r} ({key}), which {needed_by} needs "
    f"({why}). Add the folder that holds it to PYTHONPATH "
    f"({_pythonpath()}), or install it."
  )


def findable(name: str) -> bool:
  """Whether module `name` can be found, without importing it (its parent
  packages are imported)."""
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False


def check_findable(name: str, key: str, needed_by: str = "the run") -> None:
  """Module `name` (from config `key`) can be found; ConfigError otherwise."""
  if not isinstance(name, str) or not name:
    raise ConfigError(
      f"{key} must name modules (e.g. 'my_lab.classifiers'), got {name!r}."
    )
  if not findable(name):
    raise import_error(name, key, needed_by, "no such module")


def import_module(name: str, key: str, needed_by: str = "the run"):
  """Imports module `name` (from config `key`); an ImportError (the module
  or one it imports is missing) becomes a one-line ConfigError."""
  check_findable(name, key, needed_by)
  try:
    return importlib.import_module(name)
  except ImportError as e:
    raise import_error(name, key, needed_by, str(e)) from e


def plugin_names(config) -> tuple[str, ...]:
  """config.plugins as a tuple (() for configs saved before the key)."""
  names = config.get("plugins", ()) or ()
  if isinstance(names, str):
    raise ConfigError(
      f"config.plugins must be a tuple of module names, got "
      f"the string {names!r}; write ({names!r},)."
    )
  return tuple(names)


def check_plugins(config, needed_by: str = "the run") -> None:
  """Every module of config.plugins can be found (imports none of them)."""
  for name in plugin_names(config):
    check_findable(name, "config.plugins", needed_by)


def import_plugins(config, needed_by: str = "the run") -> None:
  """Imports every module of config.plugins, in order."""
  for name in plugin_names(config):
    import_module(name, "config.plugins", needed_by)
