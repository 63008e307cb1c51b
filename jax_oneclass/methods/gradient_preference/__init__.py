"""Discriminative feature learning with gradient preference (Xu et al.
2022): feature repository plus a centre-constrained MLP."""
