"""The interface every method implements, and the parts methods share.

A method is a module in `jax_oneclass.methods` with a `Method` class built
as `Method(config, info)` (config: the run's ConfigDict, info: the data set's
`DatasetInfo`). The trainer and evaluator only ever call these members, so
they never branch on method names:

- `init_state(rng, image_shape) -> state`: a pytree holding everything that
  training changes (parameters, BatchNorm statistics, optimiser states,
  step). Several networks (e.g. a GAN's) simply live side by side in it.
- `train_step(state, batch, rng) -> (state, metrics)`: pure and jit-able;
  `batch` holds global arrays, `rng` is the run's base key (the step folds
  in `state.step`, so randomness is the same after a resume). `metrics` is
  a dict of scalars and must contain 'loss'. A method that stops early
  (and has frozen itself in its state) reports 'stop_training' > 0; the
  trainer then saves and ends the run.
- `embed(state, batch) -> dict[str, Array]`: per-example arrays needed by
  the non-gradient stage, computed in eval mode (may be empty).
- `fit(embeddings) -> fitted`: the non-gradient stage on host, from the
  concatenated `embed` outputs of the normal training images; returns a
  pytree of arrays (may be empty).
- `score(state, fitted, batch) -> dict[str, Array [B]]`: pure and jit-able
  anomaly scores, higher meaning more anomalous, one entry per scorer.
- optionally `score_with_maps(state, fitted, batch) -> (scores, dict[str,
  Array [B, H, W]])`, the scores plus maps at the input's resolution, for
  methods that localise; the evaluator then reports pixel metrics against
  the data's ground-truth masks.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jax_oneclass.errors import ConfigError


@flax.struct.dataclass
class TrainState:
  """Parameters, BatchNorm statistics and optimiser state of one network."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


class NoFittedStage:
  """Mixin for methods without a non-gradient stage: nothing to embed or fit.

  The evaluator sees the empty `embed` and skips the pass over the
  training images.
  """

  def embed(self, state, batch):
    del state, batch
    return {}

  def fit(self, embeddings):
    del embeddings
    return {}


def steps_per_epoch(config, info) -> int:
  """Optimiser steps per pass over the normal training set.

  With `data.rotation_distaug` the set holds 4 rotated copies of each image.
  """
  copies = 4 if config.data.get("rotation_distaug") else 1
  return max(info.num_train * copies // config.batch_size, 1)


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """The schedule named by `config.optimizer.schedule`.

  'cosine' decays from `learning_rate` to 0 over the run after an optional
  linear warm-up; 'cosine_epoch' holds the rate constant within an epoch as
  the reference code does (util/scheduler.py); 'constant' never changes it.
  """
  opt = config.optimizer
  total = max(int(config.num_train_steps), 1)
  warmup = int(opt.get("warmup_steps", 0))
  if opt.schedule == "constant":
    return optax.constant_schedule(opt.learning_rate)
  if opt.schedule == "cosine":
    cosine = optax.cosine_decay_schedule(opt.learning_rate,
                                         max(total - warmup, 1))
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
      "'cosine_epoch' or 'constant'.")


def make_optimizer(config, steps_per_epoch: int
                   ) -> optax.GradientTransformation:
  """The optimiser named by `config.optimizer.name`, with L2 weight decay.

  Weight decay is added to the gradient (wd * w) for every parameter, which
  equals the reference's `wd * sum(w**2) / 2` term in the loss.
  """
  opt = config.optimizer
  schedule = learning_rate_schedule(config, steps_per_epoch)
  if opt.name == "sgd":
    base = optax.sgd(schedule, momentum=opt.momentum or None,
                     nesterov=bool(opt.get("nesterov", False)))
  elif opt.name == "adam":
    base = optax.adam(schedule, b1=opt.get("b1", 0.9), b2=opt.get("b2", 0.999))
  else:
    raise ConfigError(
        f"Unknown optimizer.name {opt.name!r}; use 'sgd' or 'adam'.")
  chain = []
  if opt.get("grad_clip_norm", 0):
    chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.weight_decay:
    chain.append(optax.add_decayed_weights(opt.weight_decay))
  return optax.chain(*chain, base)


def optimizer_step(tx: optax.GradientTransformation, params, opt_state,
                   grads):
  """Applies `tx` to `grads`; returns (new params, new optimiser state)."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def step_key(rng: jax.Array, step: jax.Array) -> jax.Array:
  """The key for one training step: the base key folded with the step."""
  return jax.random.fold_in(rng, step)


def global_norm(tree) -> jax.Array:
  """L2 norm over all leaves of a pytree."""
  return optax.tree.norm(tree)


def merge_views(images: jax.Array) -> jax.Array:
  """[B, V, H, W, C] -> [V * B, H, W, C], view-major (all of view 0 first)."""
  return jnp.swapaxes(images, 0, 1).reshape((-1,) + images.shape[2:])
