"""The methods, by the name a config gives in `config.method`.

Each name maps to the module that defines its `Method` class (see
`jax_oneclass.methods.interface`). Adding a method is one module, one line
here and one config file.
"""

import importlib

from jax_oneclass.errors import ConfigError

_MODULES = {
    "rotnet": "jax_oneclass.methods.two_stage.rotnet",
    "clr": "jax_oneclass.methods.two_stage.clr",
    "disaug": "jax_oneclass.methods.two_stage.disaug",
    "ganomaly": "jax_oneclass.methods.gan.ganomaly",
    "dgad": "jax_oneclass.methods.gan.dgad",
    "reverse_distillation": "jax_oneclass.methods.reverse_distillation.method",
    "gradient_preference": "jax_oneclass.methods.gradient_preference.method",
}


def available_methods() -> list[str]:
  """The registered method names, sorted."""
  return sorted(_MODULES)


def family(name: str) -> str:
  """The family (package) a method belongs to, e.g. 'two_stage'."""
  method_module(name)  # Fails clearly for an unknown name.
  return _MODULES[name].split(".")[2]


def method_module(name: str):
  """The module that defines method `name`."""
  if name not in _MODULES:
    raise ConfigError(
        f"Unknown method {name!r}. Available methods: "
        f"{', '.join(available_methods())}.")
  return importlib.import_module(_MODULES[name])


def get_method(config, info):
  """Builds the method named by `config.method` for the data set `info`
  (its networks compute as `config.dtype` and `config.conv_weight_grad`
  say, through `conv.settings(config)`); ConfigError if those are unknown."""
  # Here, not at the top: configs/ import method defaults from this package
  # and must load without JAX (the CLI checks them before importing it).
  from jax_oneclass.components import conv  # pylint: disable=g-import-not-at-top
  conv.settings(config)  # Checked for every method, whether it convolves.
  return method_module(config.method).Method(config, info)
