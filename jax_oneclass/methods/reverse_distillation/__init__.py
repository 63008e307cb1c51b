"""Reverse distillation (Deng & Li 2022): teacher, one-class bottleneck,
student decoder."""
