"""Shared parts of the GAN family: state of two networks, pixel scaling.

A GAN method's state holds a generator and a discriminator side by side,
each with its own parameters, BatchNorm statistics and optimiser state, so
one jitted `train_step` updates both and one checkpoint holds both.
"""

from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jax_oneclass import optim


@flax.struct.dataclass
class Network:
  """Parameters, BatchNorm statistics and optimiser state of one network."""

  params: Any
  batch_stats: Any
  opt_state: Any


@flax.struct.dataclass
class GANState:
  """The step counter and the two networks."""

  step: jax.Array
  generator: Network
  discriminator: Network


def to_tanh_range(images: jax.Array) -> jax.Array:
  """[0, 1] pixels from the input pipeline -> [-1, 1], the decoder's range.

  Equals the reference's Normalize(0.5, 0.5) per channel.
  """
  return 2.0 * images - 1.0


def init_network(module: nn.Module, tx, rng, example) -> Network:
  """Initial variables of `module` for an example input, plus `tx` state."""
  variables = module.init(rng, example, train=False)
  params = variables["params"]
  return Network(
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
  )


def init_gan_state(
  generator: nn.Module, discriminator: nn.Module, tx, rng, image_shape
) -> GANState:
  """Step 0 and both networks' variables and optimiser states."""
  example = jnp.zeros((2,) + tuple(image_shape))
  g_rng, d_rng = jax.random.split(rng)
  return GANState(
    step=jnp.zeros((), jnp.int32),
    generator=init_network(generator, tx, g_rng, example),
    discriminator=init_network(discriminator, tx, d_rng, example),
  )


def apply_train(module: nn.Module, params, batch_stats, images):
  """Train-mode forward pass; returns (outputs, new batch_stats)."""
  outputs, updates = module.apply(
    {"params": params, "batch_stats": batch_stats},
    images,
    train=True,
    mutable=["batch_stats"],
  )
  return outputs, updates["batch_stats"]


def _float32(outputs):
  """Floating outputs as float32: under dtype=bfloat16 the codes leave the
  network in bfloat16, and scores are float32 (NumPy and scikit-learn
  cannot read bfloat16)."""
  return jax.tree.map(
    lambda v: (
      v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v
    ),
    outputs,
  )


def apply_eval(
  module: nn.Module, network: Network, images, batch_norm: str = "running"
):
  """Test-time forward pass.

  `batch_norm='running'` uses the BatchNorm running averages, so an image's
  output never depends on the rest of its batch. 'batch' normalises with
  the test batch's own statistics, as the GANomaly reference code does by
  never calling eval(); results then depend on batch composition and order.
  """
  variables = {"params": network.params, "batch_stats": network.batch_stats}
  if batch_norm == "running":
    return _float32(module.apply(variables, images, train=False))
  if batch_norm == "batch":
    outputs, _ = module.apply(
      variables, images, train=True, mutable=["batch_stats"]
    )
    return _float32(outputs)
  raise ValueError(
    f"batch_norm must be 'running' or 'batch', got {batch_norm!r}."
  )


def apply_updates(tx, network: Network, grads, batch_stats) -> Network:
  """One optimiser step of `network`, with its new BatchNorm statistics."""
  params, opt_state = optim.apply_gradients(
    tx, network.params, network.opt_state, grads
  )
  return Network(params=params, batch_stats=batch_stats, opt_state=opt_state)


def reinitialise_if(
  condition, network: Network, make_params, tx, reset_optimizer: bool
) -> Network:
  """Swaps in fresh parameters `make_params()` where `condition` holds.

  `condition` is a traced bool; the fresh draw only runs when it is true.
  BatchNorm running statistics are kept; the optimiser state is reset only
  with `reset_optimizer`.
  """

  def swap(net):
    params = make_params()
    opt_state = tx.init(params) if reset_optimizer else net.opt_state
    return net.replace(params=params, opt_state=opt_state)

  return jax.lax.cond(condition, swap, lambda net: net, network)


class Gradients(NamedTuple):
  """One network's loss, metrics, gradients and new BatchNorm statistics."""

  loss: jax.Array
  metrics: dict
  grads: Any
  batch_stats: Any


def gan_gradients(
  generator: nn.Module,
  discriminator: nn.Module,
  g: Network,
  d: Network,
  images,
  generator_loss,
  discriminator_loss,
) -> tuple[Gradients, Gradients]:
  """Both networks' losses and gradients for one alternating GAN step.

  The generator's loss is `generator_loss(g_outputs, d(images), d(fake))`,
  differentiated through G(images) (including through D(fake) into fake)
  but never into D's parameters. The discriminator's loss is
  `discriminator_loss(d(images), d(fake))`, differentiated into D's
  parameters only, with the same fake. Both return (loss, metrics dict).

  In the reference code each loss runs its own D forward passes (four in
  all). With D's parameters unchanged between them (the generator step never
  touches them) and each pass normalising over its own batch, D(x) and D(fake)
  are the same values in both losses, so each is computed once here and
  pulled back once per loss; the gradients equal the reference's.
  """
  disc = lambda params, stats, x: apply_train(discriminator, params, stats, x)
  d_real, real_pullback, stats = jax.vjp(
    lambda p: disc(p, d.batch_stats, images), d.params, has_aux=True
  )
  outputs, g_pullback, g_stats = jax.vjp(
    lambda p: apply_train(generator, p, g.batch_stats, images),
    g.params,
    has_aux=True,
  )
  d_fake, fake_pullback, d_stats = jax.vjp(
    lambda p, x: disc(p, stats, x), d.params, outputs["fake"], has_aux=True
  )

  (g_loss, g_metrics), (ct_outputs, ct_d_fake) = jax.value_and_grad(
    lambda out, fake: generator_loss(out, d_real, fake),
    argnums=(0, 1),
    has_aux=True,
  )(outputs, d_fake)
  _, ct_fake = fake_pullback(ct_d_fake)
  ct_outputs = dict(ct_outputs, fake=ct_outputs["fake"] + ct_fake)
  (g_grads,) = g_pullback(ct_outputs)

  (d_loss, d_metrics), (ct_real, ct_fake_out) = jax.value_and_grad(
    discriminator_loss, argnums=(0, 1), has_aux=True
  )(d_real, d_fake)
  d_grads = jax.tree.map(
    jnp.add, real_pullback(ct_real)[0], fake_pullback(ct_fake_out)[0]
  )
  return (
    Gradients(g_loss, g_metrics, g_grads, g_stats),
    Gradients(d_loss, d_metrics, d_grads, d_stats),
  )


def real_fake_loss(logits_real, logits_fake):
  """Discriminator BCE: 0.5 * (BCE(D(x), 1) + BCE(D(G(x)), 0)), from logits."""
  real = optax.sigmoid_binary_cross_entropy(
    logits_real, jnp.ones_like(logits_real)
  ).mean()
  fake = optax.sigmoid_binary_cross_entropy(
    logits_fake, jnp.zeros_like(logits_fake)
  ).mean()
  return 0.5 * (real + fake)


def first_view(batch) -> jax.Array:
  """Training batches are [B, V, H, W, C]; GANs train on view 0 only."""
  return batch["image"][:, 0]
