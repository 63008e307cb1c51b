"""The sweep's command line: its flags and input checks, without JAX.

`python -m jax_oneclass.sweep` hands over to `run()` before importing JAX
or TensorFlow (this module never imports them, nor jax_oneclass.sweep), so that bad input (an unknown class or grid key, a bad
--seeds, --classes or --shard, a missing or broken config file) fails in
about a second as one 'error:' line with exit code 2, like
`jax_oneclass.main`. Only then does `jax_oneclass.sweep` (and JAX) load.
"""

import functools
import json
import re
import sys
from typing import Sequence

import ml_collections

from jax_oneclass import cli_checks
from jax_oneclass import config as config_lib
from jax_oneclass.errors import ConfigError

COMBINES = ("auto", "vmap", "unrolled")
# Keys that name a member; a grid may not set them.
MEMBER_KEYS = ("data.normal_class", "seed")


def parse_ints(text: str, what: str) -> list[int]:
  """'0,3,5' -> [0, 3, 5]; ConfigError naming `what` otherwise."""
  parts = [p.strip() for p in str(text).split(",") if p.strip()]
  if not parts or not all(re.fullmatch(r"-?\d+", p) for p in parts):
    raise ConfigError(
      f"--{what}={text!r} must be integers separated by "
      "commas, e.g. --{what}=0,1,2.".replace("{what}", what)
    )
  values = [int(p) for p in parts]
  if len(set(values)) != len(values):
    raise ConfigError(f"--{what}={text!r} names a value twice.")
  return values


def _split_values(text: str) -> list[str]:
  """'1e-3,(16, 8),x' -> ['1e-3', '(16, 8)', 'x']: commas inside brackets
  belong to the value."""
  values, depth, current = [], 0, ""
  for char in text:
    if char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    if char == "," and depth == 0:
      values.append(current.strip())
      current = ""
    else:
      current += char
  values.append(current.strip())
  return [v for v in values if v]


def parse_grid(specs: Sequence[str], config) -> list[tuple[str, list]]:
  """--grid flags ('key=v1,v2') -> [(key, [typed values])], checked against
  `config`: the key exists, is not a member key, has values, none twice."""
  grid, seen = [], set()
  for spec in specs:
    key, sep, text = spec.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ConfigError(
        f"--grid={spec!r} must be key=value1,value2,... "
        "e.g. --grid=optimizer.learning_rate=1e-3,3e-4."
      )
    if key in MEMBER_KEYS:
      raise ConfigError(
        f"--grid={spec!r}: sweep {key} with --classes / --seeds instead."
      )
    if key in seen:
      raise ConfigError(
        f"--grid names {key!r} twice; give its values in one --grid flag."
      )
    seen.add(key)
    config_lib.current_value(config, key)  # Unknown keys fail here.
    texts = _split_values(text)
    if not texts:
      raise ConfigError(
        f"--grid={spec!r} gives {key} no values; list "
        "them: --grid={key}=v1,v2.".replace("{key}", key)
      )
    values = []
    for value_text in texts:
      probe = ml_collections.ConfigDict(config.to_dict())
      try:
        config_lib.override(probe, {key: value_text})
      except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(
          f"--grid={spec!r}: {key} cannot take {value_text!r} ({e})."
        ) from e
      values.append(config_lib.current_value(probe, key))
    if len({json.dumps(v, default=str) for v in values}) != len(values):
      raise ConfigError(f"--grid={spec!r} names a value twice.")
    grid.append((key, values))
  return grid


def parse_shard(text: str | None) -> tuple[int, int]:
  """'i/n' -> (i, n) with 0 <= i < n; None -> (0, 1)."""
  if not text:
    return 0, 1
  match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
  if not match or not 0 <= int(match[1]) < int(match[2]):
    raise ConfigError(
      f"--shard={text!r} must be i/n with 0 <= i < n, e.g. "
      "--shard=0/4 for the first of 4 jobs."
    )
  return int(match[1]), int(match[2])


def resolve_classes(config, classes) -> list[int]:
  """'all', a list of ints, '0,3,5' or None (the config's class) ->
  checked class indices."""
  count = cli_checks.num_classes(config)
  if classes is None:
    return [config.data.normal_class]
  if isinstance(classes, str):
    if classes.strip() == "all":
      if config.data.name == "mvtec":
        raise ConfigError(
          "--classes=all: MVTec's classes are good / defect; sweep the "
          "categories with --grid=data.category=bottle,cable,... instead."
        )
      return list(range(count))
    classes = parse_ints(classes, "classes")
  unknown = [c for c in classes if not 0 <= c < count]
  if unknown:
    raise ConfigError(
      f"--classes: {unknown[0]} is not a class of "
      f"{config.data.name} ({_class_listing(config, count)})."
    )
  return list(classes)


def _class_listing(config, count: int) -> str:
  """'0=cat, 1=dog' where the names are known without reading data, else
  'classes 0..9'."""
  if config.data.name == "folder":
    names = config_lib.folder_class_names(config.data.folder)
    return ", ".join(f"{i}={n}" for i, n in enumerate(names))
  return f"classes 0..{count - 1}"


def resolve_seeds(config, seeds) -> list[int]:
  """'0,1', a list of ints or None (the config's seed) -> the seeds."""
  if isinstance(seeds, str):
    seeds = parse_ints(seeds, "seeds")
  seeds = [config.seed] if seeds is None else list(seeds)
  if not seeds:
    raise ConfigError("--seeds lists no seed.")
  return seeds


def check_stack(stack_limit) -> None:
  """--stack is None (no bound) or at least 1."""
  if stack_limit is not None and stack_limit < 1:
    raise ConfigError(
      f"--stack={stack_limit} must be at least 1 (members per program)."
    )


def default_classes(config, classes):
  """--classes, or 'all' when not given (MVTec: the config's class)."""
  if classes is None and config.data.name != "mvtec":
    return "all"
  return classes


def check_sweep(config, workdir, classes, seeds, grid, stack_limit, shard):
  """Everything a sweep's command line can get wrong, checked without JAX:
  the config (method, duration, data), the workdir, the classes, seeds,
  grid, --stack and --shard. Returns the parsed shard (i, n)."""
  cli_checks.check_train_args(config, f"the sweep in {workdir}")
  cli_checks.check_output_dir(workdir, "--workdir")
  resolve_classes(config, classes)
  resolve_seeds(config, seeds)
  parse_grid(grid, config)
  check_stack(stack_limit)
  return parse_shard(shard)


# --- Command line -------------------------------------------------------------


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from jax_oneclass import main as main_cli  # pylint: disable=g-import-not-at-top

  if "classes" in flags.FLAGS:
    return main_cli
  flags.DEFINE_string(
    "classes",
    None,
    "Normal classes: 'all' or '0,3,5' "
    "(default: all; MVTec: the config's, sweep its "
    "categories with --grid=data.category=...).",
  )
  flags.DEFINE_string(
    "seeds", None, "Seeds, e.g. 0,1,2 (default: the config's seed)."
  )
  flags.DEFINE_multi_string(
    "grid", [], "key=v1,v2: also sweep this config key (repeatable)."
  )
  flags.DEFINE_integer(
    "stack", None, "At most this many members per program (default: no bound)."
  )
  flags.DEFINE_enum(
    "combine",
    "auto",
    list(COMBINES),
    "How a program combines its members (see jax_oneclass/sweep.py).",
  )
  flags.DEFINE_string(
    "shard",
    None,
    "i/n: run every n-th member from the i-th (independent jobs).",
  )
  flags.DEFINE_bool(
    "report_only",
    False,
    "Only redraw the sweep tables from the members' results.json.",
  )
  return main_cli


# Flags of jax_oneclass.main that mean nothing to a sweep.
_SINGLE_RUN_FLAGS = (
  "mode",
  "refit",
  "results_path",
  "input",
  "output",
  "visualize",
)


def checked_args(values, config):
  """(config, classes, shard) of the parsed flags once they pass every
  check that needs neither JAX nor TensorFlow; a OneClassError otherwise."""
  given = [f for f in _SINGLE_RUN_FLAGS if values[f].present]
  if given:
    raise ConfigError(
      f"--{given[0]} is not a sweep flag; after the sweep "
      "run jax_oneclass.main on a member folder, e.g. "
      "--workdir=W/class_0/seed_0."
    )
  if config is None:
    raise ConfigError(
      "A sweep needs --config, e.g. --config=configs/disaug.py:digits."
    )
  config = ml_collections.ConfigDict(config.to_dict())
  classes = default_classes(config, values.classes)
  shard = check_sweep(
    config,
    values.workdir,
    classes,
    values.seeds,
    list(values.grid),
    values.stack,
    values.shard,
  )
  return config, classes, shard


def _fail(error, debug: bool):
  if debug:
    raise error
  print(f"error: {error}", file=sys.stderr)
  sys.exit(2)


def _main(argv, then):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  from jax_oneclass.errors import OneClassError  # pylint: disable=g-import-not-at-top

  main_cli = _define_flags()
  values = flags.FLAGS
  try:
    config, classes, shard = checked_args(
      values,
      main_cli._CONFIG.value,  # pylint: disable=protected-access
    )
  except OneClassError as e:
    _fail(e, values.debug)
  then(values, config, classes, shard)


def run(then):
  """The command line: parses and checks it, then calls
  `then(flag values, config, classes, shard)` (sweep.run_checked, which
  imports JAX)."""
  from absl import app  # pylint: disable=g-import-not-at-top

  main_cli = _define_flags()
  app.run(
    functools.partial(_main, then=then), flags_parser=main_cli.parse_flags
  )
