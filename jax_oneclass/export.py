"""`python -m jax_oneclass.export ...`: the CLI's --mode=export.

  python -m jax_oneclass.export --workdir=/tmp/run --format=onnx --output=/tmp/x

The exporter itself (formats, `export`, `load`) is `jax_oneclass.exporting`;
its names are reached from here too (`jax_oneclass.export.load(folder)`),
imported on first use so that the command checks its input before JAX loads.
"""


def __getattr__(name):
  if name.startswith("__"):  # Probes (e.g. __path__) need no JAX.
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  from jax_oneclass import exporting  # pylint: disable=g-import-not-at-top

  return getattr(exporting, name)


def main():
  """Runs `python -m jax_oneclass.main --mode=export` with these flags."""
  from jax_oneclass import main as main_lib  # pylint: disable=g-import-not-at-top

  main_lib.run(["--mode=export"])


if __name__ == "__main__":
  main()
