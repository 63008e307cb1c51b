"""Losses, network shapes, BatchNorm behaviour and the method registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_oneclass import config as config_lib
from jax_oneclass import data, methods
from jax_oneclass.errors import ConfigError
from jax_oneclass.methods.two_stage import clr, network
from jax_oneclass.methods.two_stage.network import SelfSupervisedNet
from tests.conftest import METHODS, load_config, tiny_config

E = np.e


def test_cross_view_loss_hand_computed():
  z = jnp.eye(2)
  loss, accuracy = clr.cross_view_loss(z, z, temperature=1.0)
  # Each row: positive logit 1, one negative logit 0.
  assert loss == pytest.approx(np.log(1 + 1 / E), rel=1e-6)
  assert accuracy == 1.0
  loss, _ = clr.cross_view_loss(z, z, temperature=0.5)
  assert loss == pytest.approx(np.log(1 + np.exp(-2.0)), rel=1e-6)


def test_nt_xent_loss_hand_computed():
  z = jnp.eye(2)
  loss, _ = clr.nt_xent_loss(z, z, temperature=1.0)
  # Row 0 of [e1, e2, e1, e2]: self masked, logits 0 (e2), 1 (positive), 0.
  assert loss == pytest.approx(np.log(E + 2) - 1, rel=1e-6)


def test_nt_xent_loss_matches_numpy_loop():
  rng = np.random.default_rng(0)
  z1, z2 = (rng.normal(size=(5, 3)) for _ in range(2))
  z1 /= np.linalg.norm(z1, axis=1, keepdims=True)
  z2 /= np.linalg.norm(z2, axis=1, keepdims=True)
  z, t, n = np.concatenate([z1, z2]), 0.2, 5
  expected = []
  for i in range(2 * n):
    positive = (i + n) % (2 * n)
    others = [j for j in range(2 * n) if j != i]
    logits = np.array([z[i] @ z[j] / t for j in others])
    expected.append(-(z[i] @ z[positive] / t) + np.log(np.exp(logits).sum()))
  loss, _ = jax.jit(clr.nt_xent_loss, static_argnums=2)(z1, z2, t)
  assert loss == pytest.approx(np.mean(expected), rel=1e-5)


def test_resnet18_shapes_and_size():
  net = SelfSupervisedNet(head_dims=(512,) * 8 + (128,))
  variables = jax.eval_shape(
    net.init, jax.random.key(0), jnp.zeros((2, 32, 32, 3))
  )
  out = jax.eval_shape(net.apply, variables, jnp.zeros((2, 32, 32, 3)))
  assert out["pool"].shape == (2, 512) and out["embed"].shape == (2, 128)
  backbone = sum(
    x.size for x in jax.tree.leaves(variables["params"]["backbone"])
  )
  # CIFAR ResNet-18 without its classifier: 11.17M parameters.
  assert 11.1e6 < backbone < 11.2e6


def _reference_block(x, params, stats, eps=1e-5):
  """The reference's basic block in TF: ZeroPadding2D(k // 2) + VALID conv."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def conv(x, name, stride):
    kernel = np.asarray(params[name]["kernel"])
    pad = kernel.shape[0] // 2
    x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    return tf.nn.conv2d(x, kernel, stride, "VALID")

  def bn(x, name):
    p, s = params[name], stats[name]
    return (x - np.asarray(s["mean"])) / np.sqrt(
      np.asarray(s["var"]) + eps
    ) * np.asarray(p["scale"]) + np.asarray(p["bias"])

  y = tf.nn.relu(bn(conv(x, "conv1", 2), "bn1"))
  y = bn(conv(y, "conv2", 1), "bn2")
  shortcut = bn(conv(x, "shortcut_conv", 2), "shortcut_bn")
  return tf.nn.relu(shortcut + y).numpy()


def test_stride2_block_pads_symmetrically_like_the_reference():
  block = network.BasicBlock(features=8, strides=2)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  variables = block.init(jax.random.key(1), x, train=False)
  # Non-trivial running statistics, so the BatchNorms are not identities.
  variables = jax.tree.map(
    lambda v: v + 0.1 * jax.random.uniform(jax.random.key(2), v.shape),
    variables,
  )
  ours = block.apply(variables, x, train=False)
  expected = _reference_block(
    np.asarray(x), variables["params"], variables["batch_stats"]
  )
  assert ours.shape == (2, 4, 4, 8)
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_batchnorm_train_updates_stats_and_eval_is_batch_independent():
  net = SelfSupervisedNet(stage_sizes=(1, 1), width=4, head_dims=(8, 4))
  images = jax.random.uniform(jax.random.key(1), (6, 8, 8, 1))
  variables = net.init(jax.random.key(0), images)
  _, updates = net.apply(variables, images, train=True, mutable=["batch_stats"])
  changed = jax.tree.map(
    lambda a, b: not np.allclose(a, b),
    variables["batch_stats"],
    updates["batch_stats"],
  )
  assert all(jax.tree.leaves(changed))
  alone = net.apply(variables, images[:1])["pool"]
  in_batch = net.apply(variables, images)["pool"][:1]
  np.testing.assert_allclose(alone, in_batch, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method_name", METHODS)
def test_scores_do_not_depend_on_batch_composition(method_name):
  config = tiny_config(method_name)
  info = data.dataset_info(config)
  method = methods.get_method(config, info)
  state = jax.jit(method.init_state, static_argnums=1)(
    jax.random.key(0), info.image_shape
  )
  images = jax.random.uniform(jax.random.key(1), (8,) + info.image_shape)
  embed, score = jax.jit(method.embed), jax.jit(method.score)
  fitted = method.fit(jax.device_get(embed(state, {"image": images})))
  full = score(state, fitted, {"image": images})
  part = score(state, fitted, {"image": images[3:5]})
  for name in full.image:
    np.testing.assert_allclose(
      full.image[name][3:5],
      part.image[name],
      rtol=1e-4,
      atol=1e-5,
      err_msg=name,
    )
  for name in full.maps:
    np.testing.assert_allclose(
      full.maps[name][3:5], part.maps[name], rtol=1e-4, atol=1e-5, err_msg=name
    )


def test_unknown_method_and_bad_views():
  config = tiny_config("clr")
  info = data.dataset_info(config)
  config.method = "ganomalyy"
  with pytest.raises(
    ConfigError,
    match="Available methods: clr, dgad, disaug, ganomaly, gradient_preference, reverse_distillation, rotnet",
  ):
    methods.get_method(config, info)
  config = tiny_config("rotnet")
  config.data.num_views = 2
  with pytest.raises(ConfigError, match="num_views=4"):
    methods.get_method(config, info)
  config = tiny_config("disaug")
  config.data.rotation_distaug = False
  with pytest.raises(ConfigError, match="rotation_distaug"):
    methods.get_method(config, info)


def test_config_arg_parsing():
  config = load_config("disaug", "cifar10,normal_class=3,batch_size=64")
  assert (config.data.name, config.data.normal_class) == ("cifar10", 3)
  assert config.batch_size == 64 and config.data.rotation_distaug
  config = load_config("rotnet", "batch_size=8,digits")  # Order-independent.
  assert config.batch_size == 8 and config.data.image_size == 16
  assert load_config("clr", None).data.name == "cifar10"
  with pytest.raises(ConfigError, match="Unknown data set 'imagenet'"):
    load_config("clr", "imagenet")
  with pytest.raises(ConfigError, match="Unknown config key 'model.depth'"):
    load_config("clr", "digits,model.depth=3")
  with pytest.raises(ConfigError, match="boolean"):
    config_lib.apply_arg(load_config("clr"), "data.rotation_distaug=maybe")


@pytest.mark.parametrize("method_name", METHODS)
def test_each_config_offers_a_test_preset_and_its_headline_scorer(method_name):
  config = load_config(method_name, "digits,test")
  assert config.model.width == 4  # Networks shrink; the rest is digits'.
  assert config.data.name == "digits"
  names = methods.method_module(method_name).Method.scorer_names(config)
  assert list(names) == sorted(set(names)) and config.eval.scorer in names


def test_the_test_word_needs_a_preset():
  with pytest.raises(ConfigError, match="Unknown data set 'test'"):
    config_lib.apply_arg(config_lib.base_config("clr"), "test")
