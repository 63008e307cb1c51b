"""jax_oneclass: one-class anomaly detection methods in JAX/Flax."""

__version__ = "0.1.0"
