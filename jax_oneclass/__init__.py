"""jax_oneclass: one-class anomaly detection methods in JAX/Flax.

`jax_oneclass.Detector.load(workdir)` gives a trained run's detector.
"""

__version__ = "0.1.0"


def __getattr__(name):
  # Lazily, so that `python -m jax_oneclass.main --help` stays fast.
  if name in ("Detector", "Prediction"):
    from jax_oneclass import detector  # pylint: disable=g-import-not-at-top

    return getattr(detector, name)
  raise AttributeError(f"module 'jax_oneclass' has no attribute {name!r}")
