"""Flax linen networks shared by the methods."""

from jax_oneclass.models.resnet import ResNet, SelfSupervisedNet, MLPHead

__all__ = ["ResNet", "SelfSupervisedNet", "MLPHead"]
