"""Errors that tell the user what went wrong and what to do about it."""


class OneClassError(Exception):
  """Base class for every error jax_oneclass raises on purpose."""


class ConfigError(OneClassError, ValueError):
  """A config value is unknown, missing or inconsistent."""


class DataError(OneClassError, ValueError):
  """A data set cannot be found, read, or does not fit the model."""


class CheckpointError(OneClassError, RuntimeError):
  """A checkpoint cannot be restored."""


class NonFiniteLossError(OneClassError, FloatingPointError):
  """Training produced a NaN or infinite loss."""


class Interrupted(OneClassError):
  """Training was stopped by SIGTERM or Ctrl-C (after saving what it could)."""


class WorkdirBusy(OneClassError, RuntimeError):
  """Another process is writing to the workdir."""
