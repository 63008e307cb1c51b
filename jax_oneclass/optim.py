"""Optimisers and learning-rate schedules, built from `config.optimizer`."""

import optax

from jax_oneclass.errors import ConfigError


def steps_per_epoch(config, info) -> int:
  """Optimiser steps per epoch (`info.epoch_size` training examples)."""
  return max(info.epoch_size // config.batch_size, 1)


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """The schedule named by `config.optimizer.schedule`.

  'cosine' decays from `learning_rate` to 0 over the run after an optional
  linear warm-up; 'cosine_epoch' holds the rate constant within an epoch as
  the two-stage reference code does; 'constant' never changes it.
  """
  opt = config.optimizer
  total = max(int(config.num_train_steps), 1)
  warmup = int(opt.get("warmup_steps", 0))
  if opt.schedule == "constant":
    return optax.constant_schedule(opt.learning_rate)
  if opt.schedule == "cosine":
    cosine = optax.cosine_decay_schedule(
      opt.learning_rate, max(total - warmup, 1)
    )
    if not warmup:
      return cosine
    ramp = optax.linear_schedule(0.0, opt.learning_rate, warmup)
    return optax.join_schedules([ramp, cosine], [warmup])
  if opt.schedule == "cosine_epoch":
    num_epochs = max(-(-total // max(steps_per_epoch, 1)), 1)
    per_epoch = optax.cosine_decay_schedule(opt.learning_rate, num_epochs)
    return lambda step: per_epoch(step // max(steps_per_epoch, 1))
  raise ConfigError(
    f"Unknown optimizer.schedule {opt.schedule!r}; use 'cosine', "
    "'cosine_epoch' or 'constant'."
  )


def make_optimizer(config, info) -> optax.GradientTransformation:
  """The optimiser named by `config.optimizer.name`, with L2 weight decay.

  Weight decay is added to the gradient (wd * w) for every parameter, which
  equals a `wd * sum(w**2) / 2` term in the loss, as the reference has.
  """
  opt = config.optimizer
  schedule = learning_rate_schedule(config, steps_per_epoch(config, info))
  if opt.name == "sgd":
    base = optax.sgd(
      schedule,
      momentum=opt.momentum or None,
      nesterov=bool(opt.get("nesterov", False)),
    )
  elif opt.name == "adam":
    base = optax.adam(schedule, b1=opt.get("b1", 0.9), b2=opt.get("b2", 0.999))
  else:
    raise ConfigError(
      f"Unknown optimizer.name {opt.name!r}; use 'sgd' or 'adam'."
    )
  chain = []
  if opt.get("grad_clip_norm", 0):
    chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.weight_decay:
    chain.append(optax.add_decayed_weights(opt.weight_decay))
  return optax.chain(*chain, base)


def apply_gradients(tx: optax.GradientTransformation, params, opt_state, grads):
  """Applies `tx` to `grads`; returns (new params, new optimiser state)."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def global_norm(tree):
  """L2 norm over all leaves of a pytree."""
  return optax.tree.norm(tree)
