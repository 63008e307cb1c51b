"""GAN family: DCGAN shapes and sizes, loss terms, step semantics, resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_oneclass import data, methods, train
from jax_oneclass.errors import ConfigError
from jax_oneclass.methods.gan import dcgan, dgad, ganomaly
from jax_oneclass.methods.gan import family as gan
from tests.conftest import tiny_config


def _num_params(module, image_shape, *args):
  shapes = jax.eval_shape(
    lambda: module.init(jax.random.key(0), *args, train=False)
  )
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


# The official GANomaly networks (nz 100, ngf 64): encoder, decoder, G, D.
@pytest.mark.parametrize(
  "size, channels, counts",
  [
    (32, 3, (1_068_800, 1_068_928, 3_206_528, 663_296)),
    (32, 1, (1_066_752, 1_066_880, 3_200_384, 661_248)),
    (64, 3, (3_576_576, 3_576_704, 10_729_856, 2_765_568)),
  ],
)
def test_dcgan_parameter_counts_match_the_reference(size, channels, counts):
  image = jnp.zeros((1, size, size, channels))
  code = jnp.zeros((1, 100))
  got = (
    _num_params(dcgan.DCGANEncoder(100, 64), None, image),
    _num_params(dcgan.DCGANDecoder(size, channels, 64), None, code),
    _num_params(dcgan.GANomalyGenerator(100, 64), None, image),
    _num_params(dcgan.DCGANDiscriminator(64), None, image),
  )
  assert got == counts


@pytest.mark.parametrize("size", [32, 64])
def test_dcgan_shapes(size):
  images = jnp.zeros((2, size, size, 3))
  generator = dcgan.GANomalyGenerator(100, 64)
  outputs = jax.eval_shape(
    lambda: generator.init_with_output(jax.random.key(0), images, train=False)[
      0
    ]
  )
  assert outputs["fake"].shape == (2, size, size, 3)
  assert outputs["latent_in"].shape == outputs["latent_out"].shape == (2, 100)
  logits, features = jax.eval_shape(
    lambda: dcgan.DCGANDiscriminator(64).init_with_output(
      jax.random.key(0), images, train=False
    )[0]
  )
  assert logits.shape == (2,)
  assert features.shape == (2, 4, 4, dcgan.top_width(size, 64))


@pytest.mark.parametrize("size", [8, 24, 48, 100])
def test_sizes_that_are_not_powers_of_two_are_refused(size):
  with pytest.raises(ConfigError, match="power-of-two"):
    dcgan.check_image_size(size)


def test_ganomaly_loss_terms_hand_computed():
  images = jnp.ones((2, 2, 2, 1))
  outputs = {
    "fake": jnp.zeros((2, 2, 2, 1)),
    "latent_in": jnp.array([[1.0, 2.0], [0.0, 0.0]]),
    "latent_out": jnp.zeros((2, 2)),
  }
  real = jnp.full((2, 1, 1, 3), 3.0)
  terms = ganomaly.generator_loss_terms(images, outputs, real, real - 1.0)
  assert float(terms["adversarial"]) == pytest.approx(1.0)
  assert float(terms["contextual"]) == pytest.approx(1.0)
  assert float(terms["encoder"]) == pytest.approx((1 + 4) / 4)
  scores = ganomaly.latent_scores(images, outputs)
  np.testing.assert_allclose(scores["latent_mse"], [2.5, 0.0])
  np.testing.assert_allclose(scores["latent_l1"], [1.5, 0.0])
  np.testing.assert_allclose(scores["reconstruction_l1"], [1.0, 1.0])
  # BCE from logits 0 is log 2 for real and fake alike.
  assert float(gan.real_fake_loss(jnp.zeros(3), jnp.zeros(3))) == (
    pytest.approx(np.log(2))
  )
  assert float(gan.real_fake_loss(jnp.full(3, 30.0), jnp.full(3, -30.0))) < 1e-6


def test_dgad_transforms_and_pretext_score():
  images = jnp.arange(2 * 4 * 4).reshape((2, 4, 4, 1)).astype(jnp.float32)
  stacked, labels = dgad.all_transforms(images, 8)
  assert stacked.shape == (16, 4, 4, 1)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(8), 2))
  np.testing.assert_array_equal(stacked[2:4], np.rot90(images, 1, (1, 2)))
  np.testing.assert_array_equal(
    stacked[10:12], np.rot90(images, 1, (1, 2))[:, :, ::-1]
  )
  assert len({np.asarray(t).tobytes() for t in stacked[::2]}) == 8
  uniform = dgad.pretext_nll(jnp.zeros((8, 4)), jnp.tile(jnp.arange(4), 2), 4)
  np.testing.assert_allclose(uniform, [np.log(4)] * 2, rtol=1e-6)
  sure = jnp.eye(4)[jnp.arange(4)] * 50.0  # Confident and right.
  assert float(dgad.pretext_nll(sure, jnp.arange(4), 4)[0]) < 1e-6


def _step_once(config):
  info = data.dataset_info(config)
  method = methods.get_method(config, info)
  state = jax.jit(method.init_state, static_argnums=1)(
    jax.random.key(0), info.image_shape
  )
  batch = next(data.train_batches(config))
  new_state, metrics = jax.jit(method.train_step)(
    state, batch, jax.random.key(1)
  )
  return state, new_state, metrics


def _same(a, b):
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_ganomaly_step_updates_each_network_only_by_its_own_loss():
  config = tiny_config("ganomaly")
  config.loss_weights = dict(adversarial=0.0, contextual=0.0, encoder=0.0)
  config.discriminator_reinit_threshold = 0.0
  state, new, metrics = _step_once(config)
  # A zero generator loss leaves G's weights alone (Adam of zero grads),
  # though its BatchNorm statistics move; D still learns.
  assert _same(state.generator.params, new.generator.params)
  assert not _same(state.generator.batch_stats, new.generator.batch_stats)
  assert not _same(state.discriminator.params, new.discriminator.params)
  assert float(metrics["discriminator_reinit"]) == 0.0


def test_ganomaly_reinitialises_a_collapsed_discriminator():
  config = tiny_config("ganomaly")
  _, kept, _ = _step_once(config)
  config.discriminator_reinit_threshold = 1e9  # Always "collapsed".
  _, reset, metrics = _step_once(config)
  assert float(metrics["discriminator_reinit"]) == 1.0
  assert _same(kept.generator, reset.generator)
  assert not _same(kept.discriminator.params, reset.discriminator.params)
  # Running statistics and (by default) Adam's moments are kept.
  assert _same(kept.discriminator.batch_stats, reset.discriminator.batch_stats)
  assert _same(kept.discriminator.opt_state, reset.discriminator.opt_state)
  config.reset_discriminator_optimizer = True
  _, fresh_adam, _ = _step_once(config)
  assert not _same(
    kept.discriminator.opt_state, fresh_adam.discriminator.opt_state
  )


def test_reference_batch_mode_depends_on_the_batch_and_running_does_not():
  config = tiny_config("ganomaly")
  config.eval.batch_norm = "batch"
  info = data.dataset_info(config)
  method = methods.get_method(config, info)
  _, state, _ = _step_once(config)
  images = jax.random.uniform(jax.random.key(2), (8,) + info.image_shape)
  score = jax.jit(method.score)
  full = score(state, {}, {"image": images}).image["latent_mse"]
  part = score(state, {}, {"image": images[:4]}).image["latent_mse"]
  assert not np.allclose(full[:4], part)
  config.eval.batch_norm = "sideways"
  with pytest.raises(ConfigError, match="batch_norm"):
    methods.get_method(config, info)


def test_gan_resume_continues_exactly(tmp_path):
  method = "ganomaly"  # Its step draws random numbers (re-initialisation).
  config = tiny_config(method, steps=4)
  _, straight = train.train(config, tmp_path / "straight")
  halted = tiny_config(method, steps=4)
  halted.halt_after_step = 2
  train.train(halted, tmp_path / "resumed")
  _, resumed = train.train(config, tmp_path / "resumed")
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
    jax.device_get(straight),
    jax.device_get(resumed),
  )


def test_up_conv_is_torchs_conv_transpose():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  module = dcgan.UpConv(5)
  variables = module.init(jax.random.key(1), x)
  kernel = variables["params"]["kernel"]  # [4, 4, 3, 5]
  # torch ConvTranspose2d(3, 5, 4, 2, 1) == the input-gradient of
  # Conv2d(5, 3, 4, 2, 1) with the same weight tensor.
  conv = lambda y: jax.lax.conv_general_dilated(
    y,
    kernel.transpose(0, 1, 3, 2),
    (2, 2),
    ((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  _, transpose = jax.vjp(conv, jnp.zeros((2, 8, 8, 5)))
  np.testing.assert_allclose(
    module.apply(variables, x), transpose(x)[0], atol=1e-5
  )


def _reference_gradients(method, state, images):
  """GANomaly's gradients the way the reference computes them: four
  separate discriminator passes, each loss differentiated on its own."""
  g, d = state.generator, state.discriminator

  def discriminate(params, x):
    (logits, features), _ = gan.apply_train(
      method.discriminator, params, d.batch_stats, x
    )
    return logits, features

  def generator_objective(params):
    outputs, _ = gan.apply_train(
      method.generator, params, g.batch_stats, images
    )
    _, real = discriminate(d.params, images)
    _, fake = discriminate(d.params, outputs["fake"])
    terms = ganomaly.generator_loss_terms(images, outputs, real, fake)
    return terms["adversarial"] + 50 * terms["contextual"] + terms[
      "encoder"
    ], outputs["fake"]

  (g_loss, fake), g_grads = jax.value_and_grad(
    generator_objective, has_aux=True
  )(g.params)
  fake = jax.lax.stop_gradient(fake)
  d_loss, d_grads = jax.value_and_grad(
    lambda p: gan.real_fake_loss(
      discriminate(p, images)[0], discriminate(p, fake)[0]
    )
  )(d.params)
  return g_loss, g_grads, d_loss, d_grads


def test_shared_discriminator_passes_give_the_reference_gradients():
  config = tiny_config("ganomaly")
  info = data.dataset_info(config)
  method = methods.get_method(config, info)
  state = jax.jit(method.init_state, static_argnums=1)(
    jax.random.key(0), info.image_shape
  )
  images = jax.random.uniform(jax.random.key(1), (8,) + info.image_shape)
  images = gan.to_tanh_range(images)
  g_out, d_out = jax.jit(method.gradients)(state, images)
  g_loss, g_grads, d_loss, d_grads = jax.jit(
    lambda s, x: _reference_gradients(method, s, x)
  )(state, images)
  assert float(g_out.loss) == pytest.approx(float(g_loss), rel=1e-5)
  assert float(d_out.loss) == pytest.approx(float(d_loss), rel=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  jax.tree.map(close, g_out.grads, g_grads)
  jax.tree.map(close, d_out.grads, d_grads)


def test_padding_modes_keep_the_parameter_tree():
  x = jnp.zeros((2, 16, 16, 1))
  shapes = {}
  for padding in dcgan.PADDING_MODES:
    net = dcgan.EncoderDecoder(8, 4, extra_layers=1, padding=padding)
    variables = jax.eval_shape(
      lambda n=net: n.init(jax.random.key(0), x, train=False)
    )
    shapes[padding] = jax.tree.map(lambda v: v.shape, variables)
  assert shapes["reflect"] == shapes["circular"] == shapes["zeros"]


def test_circular_padding_makes_the_encoder_shift_equivariant():
  # 16 px -> 4x4 features through two stride-2 convs: a circular shift of
  # the input by 4 px shifts the features by 1, when nothing reads the
  # border; zero padding breaks this.
  x = jax.random.normal(jax.random.key(0), (1, 16, 16, 1))
  shifted = jnp.roll(x, 4, axis=2)
  gaps = {}
  for padding in ("circular", "zeros"):
    net = dcgan.DCGANEncoder(3, 4, padding=padding)
    variables = net.init(jax.random.key(1), x, False)
    apply = jax.jit(lambda v, y, n=net: n.apply(v, y, False)[1])
    features, moved = apply(variables, x), apply(variables, shifted)
    gaps[padding] = float(jnp.abs(jnp.roll(features, 1, axis=2) - moved).max())
  assert gaps["circular"] < 1e-5 < 1e-2 < gaps["zeros"]


def test_dgad_pads_circularly_and_ganomaly_with_zeros_by_default():
  # DGAD: the seed's argument against absolute position (configs/dgad.py).
  assert tiny_config("dgad").model.padding == "circular"
  assert tiny_config("ganomaly").model.get("padding", "zeros") == "zeros"


def test_unknown_padding_mode_is_a_config_error():
  config = tiny_config("dgad", steps=1)
  config.model.padding = "replicate"
  with pytest.raises(ConfigError, match="padding"):
    methods.get_method(config, data.dataset_info(config))


def test_bf16_generator_scores_are_float32():
  """Under dtype=bfloat16 the codes leave the network in bfloat16; the
  scores must be float32 (scikit-learn cannot read bfloat16)."""
  config = tiny_config("ganomaly")
  config.dtype = "bfloat16"
  method = methods.get_method(config, data.dataset_info(config))
  state = jax.eval_shape(
    lambda: method.init_state(jax.random.key(0), (16, 16, 1))
  )
  batch = {"image": jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.uint8)}
  scores = jax.eval_shape(method.score, state, None, batch)
  dtypes = {v.dtype for v in jax.tree.leaves(scores)}
  assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
