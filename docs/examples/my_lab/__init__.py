"""An example of research code kept outside jax_oneclass (docs/extending.md)."""
