"""The methods, by the name a config gives in `config.method`.

Each name maps to the module that defines its `Method` class (see
`jax_oneclass.methods.interface`). Adding a method is one module, one line
here and one config file. Code outside the package registers a name with
`register`, or gives `config.method` as an import path ("my_lab.deep_svdd");
see docs/extending.md.
"""

from jax_oneclass import plugins
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


def register(name: str, module_path: str, replace: bool = False) -> None:
  """Registers method `name` as the module `module_path` (which defines
  `Method`), imported when a run needs it. Registering a taken name is an
  error unless `replace`."""
  if not isinstance(name, str) or not name.isidentifier():
    raise ConfigError(
      f"A method name must be an identifier (no dots, which "
      f"mean an import path), got {name!r}."
    )
  if name in _MODULES and not replace:
    raise ConfigError(
      f"Method {name!r} is already registered (module "
      f"{_MODULES[name]!r}); pass replace=True to replace it."
    )
  plugins.check_findable(module_path, f"method {name!r}", "registering it")
  _MODULES[name] = module_path


def _module_path(name: str) -> str:
  """The module of a registered name or an import path; ConfigError for an
  unknown name."""
  if name in _MODULES:
    return _MODULES[name]
  if isinstance(name, str) and "." in name:
    return name
  raise ConfigError(
    f"Unknown method {name!r}. Available methods: "
    f"{', '.join(available_methods())}; or an import path of a module "
    "defining Method, or a name that a module in config.plugins registers "
    "(docs/extending.md)."
  )


def family(name: str) -> str:
  """The family (package) a method belongs to, e.g. 'two_stage'; for a
  module outside jax_oneclass.methods, its package."""
  method_module(name)  # Fails clearly for an unknown name.
  path = _module_path(name)
  if path.startswith(__name__ + "."):
    return path.split(".")[2]
  return path.rpartition(".")[0]


def method_module(name: str, needed_by: str = "the run"):
  """The module that defines method `name` (a registered name or an import
  path); `needed_by` says who needs it in the error for a missing one."""
  path = _module_path(name)
  module = plugins.import_module(
    path, "config.method" if path == name else f"method {name!r}", needed_by
  )
  if not hasattr(module, "Method"):
    raise ConfigError(
      f"Module {path!r} (method {name!r}) defines no Method "
      "class; see jax_oneclass/methods/interface.py."
    )
  return module


def get_method(config, info):
  """Builds the method named by `config.method` for the data set `info`
  (its networks compute as `config.dtype` and `config.conv_weight_grad`
  say, through `conv.settings(config)`); ConfigError if those are unknown."""
  # Here, not at the top: configs/ import method defaults from this package
  # and must load without JAX (the CLI checks them before importing it).
  from jax_oneclass.components import conv  # pylint: disable=g-import-not-at-top

  conv.settings(config)  # Checked for every method, whether it convolves.
  return method_module(config.method).Method(config, info)
