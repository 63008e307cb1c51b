"""The convolution with a custom weight gradient, and the bf16 policy."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import lax

from jax_oneclass import config as config_lib
from jax_oneclass import data, methods
from jax_oneclass import run as run_lib
from jax_oneclass.components import conv, precision
from jax_oneclass.errors import ConfigError
from tests.conftest import tiny_config

_DN = ("NHWC", "HWIO", "NHWC")


def _reference(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)


@pytest.mark.parametrize(
  "mode,strides,padding,kernel",
  [
    ("taps", (1, 1), "SAME", 3),
    ("im2col", (2, 2), "SAME", 3),
    ("taps", (2, 2), ((1, 1), (1, 1)), 3),
    ("im2col", (1, 1), "VALID", 3),
    ("taps", (2, 1), ((0, 2), (1, 0)), 3),
    ("im2col", (2, 2), "VALID", 1),
    ("im2col", (1, 2), ((0, 2), (1, 0)), 3),
  ],
)
def test_custom_vjp_matches_xla(mode, strides, padding, kernel):
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 3, 5))
  probe = jax.random.normal(
    jax.random.key(2), _reference(x, w, strides, padding).shape
  )

  def loss(fn):
    return lambda x, w: jnp.sum(fn(x, w, strides, padding) * probe)

  def ours(x, w, strides, padding):
    return conv.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=_DN, weight_grad=mode
    )

  got = jax.jit(jax.value_and_grad(loss(ours), (0, 1)))(x, w)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss(ours), 1))(x, w))
  want = jax.value_and_grad(loss(_reference), (0, 1))(x, w)
  assert "custom_vjp" in jaxpr  # The custom path really ran.
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_xla_mode_and_unsupported_convs_take_lax_path():
  x = jnp.ones((1, 5, 5, 2))
  w = jnp.ones((3, 3, 2, 4))
  taps = conv.ConvSettings(weight_grad="taps").conv_general_dilated
  grouped = jax.make_jaxpr(
    lambda w: taps(
      x, w, (1, 1), "SAME", dimension_numbers=_DN, feature_group_count=2
    )
  )(jnp.ones((3, 3, 1, 4)))
  dilated = jax.make_jaxpr(
    lambda w: taps(
      x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=_DN
    )
  )(w)
  plain = jax.make_jaxpr(
    lambda w: conv.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=_DN, weight_grad="xla"
    )
  )(w)
  for jaxpr in (grouped, dilated, plain):
    assert "custom_vjp" not in str(jaxpr)


def test_default_mode_is_im2col_on_the_cpu_and_xla_for_symbolic_shapes():
  assert config_lib.base_config("rotnet").conv_weight_grad == "im2col_cpu"
  w = jnp.ones((3, 3, 2, 4))
  grad_jaxpr = lambda x: str(
    jax.make_jaxpr(
      jax.grad(
        lambda w: conv.conv_general_dilated(
          x, w, (1, 1), "SAME", dimension_numbers=_DN
        ).sum()
      )
    )(w)
  )
  assert conv.ConvSettings().weight_grad == "im2col_cpu"
  assert ("custom_vjp" in grad_jaxpr(jnp.ones((2, 5, 5, 2)))) == (
    jax.default_backend() == "cpu"
  )
  symbolic = jax.ShapeDtypeStruct(
    jax.export.symbolic_shape("b, 5, 5, 2"), jnp.float32
  )
  pads = ((1, 1), (1, 1))
  assert conv._resolve("im2col_cpu", symbolic, w, (1, 1), pads) == "xla"  # pylint: disable=protected-access


def test_auto_is_xla_for_small_convs_and_tunes_large_ones(monkeypatch):
  small = jax.make_jaxpr(
    lambda w: conv.conv_general_dilated(
      jnp.ones((2, 8, 8, 4)),
      w,
      (1, 1),
      "SAME",
      dimension_numbers=_DN,
      weight_grad="auto",
    )
  )
  assert "custom_vjp" not in str(small(jnp.ones((3, 3, 4, 4))))
  monkeypatch.setattr(conv, "AUTO_MIN_FLOPS", 0.0)
  timing = conv.tune(
    (2, 8, 8, 4), (3, 3, 4, 4), "float32", (1, 1), ((1, 1), (1, 1)), repeats=1
  )
  assert set(timing["seconds"]) == {"xla", "taps", "im2col"}
  assert timing["best"] == min(timing["seconds"], key=timing["seconds"].get)


def test_settings_come_from_the_config_and_are_checked():
  config = tiny_config("rotnet")
  config.dtype, config.conv_weight_grad = "bfloat16", "taps"
  assert conv.settings(config) == conv.ConvSettings("bfloat16", "taps")
  assert conv.settings(config).compute_dtype == jnp.bfloat16
  assert conv.ConvSettings().compute_dtype is None
  with pytest.raises(ConfigError, match="conv_weight_grad"):
    conv.ConvSettings(weight_grad="fast")
  with pytest.raises(ConfigError, match="conv_weight_grad"):
    conv.conv_general_dilated(
      jnp.ones((1, 4, 4, 2)),
      jnp.ones((3, 3, 2, 3)),
      (1, 1),
      "SAME",
      dimension_numbers=_DN,
      weight_grad="fast",
    )
  with pytest.raises(ConfigError, match="float32, bfloat16"):
    conv.ConvSettings(dtype="float16")
  with pytest.raises(ConfigError, match="float32, bfloat16"):
    precision.parse_dtype("float16")


def test_bf16_policy_computes_in_bf16_and_keeps_f32_outside():
  x = jnp.ones((1, 4, 4, 2))
  w = jnp.ones((3, 3, 2, 3))
  bf16 = conv.ConvSettings("bfloat16").conv_general_dilated
  y = bf16(x, w, (1, 1), "SAME", dimension_numbers=_DN)
  g = jax.grad(
    lambda w: (
      bf16(x, w, (1, 1), "SAME", dimension_numbers=_DN)
      .astype(jnp.float32)
      .sum()
    )
  )(w)
  assert y.dtype == jnp.bfloat16 and g.dtype == jnp.float32
  assert (
    conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN).dtype
    == jnp.float32
  )


@pytest.mark.parametrize("method_name", ["rotnet"])
def test_bf16_step_is_close_to_f32(method_name):
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config(method_name)
    config.dtype = dtype
    info = data.dataset_info(config)
    method = methods.get_method(config, info)
    state = jax.jit(method.init_state, static_argnums=1)(
      jax.random.key(0), info.image_shape
    )
    batch = next(data.train_batches(config))
    new_state, metrics = jax.jit(method.train_step)(
      state, batch, jax.random.key(1)
    )
    leaves = jax.tree.leaves(new_state.params)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    losses[dtype] = float(metrics["loss"])
  assert np.isfinite(losses["bfloat16"])
  assert losses["bfloat16"] != losses["float32"]  # The dtype reached it.
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.05)


def test_runs_saved_without_the_new_keys_are_unchanged():
  config = tiny_config("rotnet")
  saved = config.to_dict()
  del saved["dtype"], saved["conv_weight_grad"]
  saved = ml_collections.ConfigDict(saved)
  # They ran with XLA's weight gradient; the new default differs only in a
  # key a resumed run may change freely (run._FREE_KEYS).
  moved = {"conv_weight_grad": ("xla", "im2col_cpu")}
  assert run_lib.config_changes(saved, config) == moved
  assert "conv_weight_grad" in run_lib._FREE_KEYS  # pylint: disable=protected-access
  config.dtype = "bfloat16"
  assert run_lib.config_changes(saved, config) == {
    **moved,
    "dtype": ("float32", "bfloat16"),
  }


def test_get_method_checks_the_conv_settings_of_every_method():
  config = tiny_config("ganomaly")
  info = data.dataset_info(config)
  config.dtype = "float16"
  with pytest.raises(ConfigError, match="float32, bfloat16"):
    methods.get_method(config, info)
  config.dtype, config.conv_weight_grad = "float32", "fast"
  with pytest.raises(ConfigError, match="conv_weight_grad"):
    methods.get_method(config, info)
