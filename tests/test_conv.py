"""The convolution with a custom weight gradient, and the bf16 policy."""

import functools

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
  "path,strides,padding,kernel",
  [
    ("taps", (1, 1), "SAME", 3),
    ("im2col", (2, 2), "SAME", 3),
    ("taps", (2, 2), ((1, 1), (1, 1)), 3),
    ("im2col", (1, 1), "VALID", 3),
    ("taps", (2, 1), ((0, 2), (1, 0)), 3),
    ("im2col", (2, 2), "VALID", 1),
    ("im2col", (1, 2), ((0, 2), (1, 0)), 3),
    ("xla", (2, 1), ((0, 2), (1, 0)), 3),
  ],
)
def test_every_path_matches_xla(path, strides, padding, kernel):
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 3, 5))
  pads = conv._explicit_pads(x, w, strides, padding)  # pylint: disable=protected-access
  _check_against_xla(x, w, strides, pads, path, tol=1e-4)


def _check_against_xla(x, w, strides, pads, path, tol):
  """Forward value, input and weight gradients of `path` (all three
  operations) against lax's, through the custom VJP."""
  probe = jax.random.normal(
    jax.random.key(2), _reference(x, w, strides, pads).shape, x.dtype
  )

  def loss(fn):
    return lambda x, w: jnp.sum(fn(x, w) * probe)

  ours = lambda x, w: conv._conv(x, w, strides, pads, (path,) * 3)  # pylint: disable=protected-access
  got = jax.jit(jax.value_and_grad(loss(ours), (0, 1)))(x, w)
  want = jax.value_and_grad(
    loss(lambda x, w: _reference(x, w, strides, pads)), (0, 1)
  )(x, w)
  assert "custom_vjp" in str(jax.make_jaxpr(jax.grad(loss(ours), 1))(x, w))
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.dtype == r.dtype == x.dtype
    np.testing.assert_allclose(g, r, rtol=tol, atol=tol)


@pytest.mark.parametrize("path", ["taps", "im2col"])
def test_custom_paths_keep_float64_under_x64(path):
  # float32 accumulation would miss by ~1e-6 here.
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3), jnp.float64)
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 5), jnp.float64)
    _check_against_xla(x, w, (2, 1), ((1, 1), (0, 2)), path, tol=1e-12)


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


def _grad_jaxpr(x, w, mode="auto"):
  return str(
    jax.make_jaxpr(
      jax.grad(
        lambda w: conv.conv_general_dilated(
          x, w, (1, 1), "SAME", dimension_numbers=_DN, weight_grad=mode
        ).sum()
      )
    )(w)
  )


def test_auto_is_the_default_and_xla_where_it_cannot_measure(monkeypatch):
  assert config_lib.base_config("rotnet").conv_weight_grad == "auto"
  assert conv.ConvSettings().weight_grad == "auto"
  x, w = jnp.ones((2, 5, 5, 2)), jnp.ones((3, 3, 2, 4))
  pads = ((1, 1), (1, 1))
  # Small: below AUTO_MIN_FLOPS nothing is timed.
  assert "custom_vjp" not in _grad_jaxpr(x, w)
  assert conv.plan("auto", x, w, (1, 1), pads) == ("xla",) * 3
  monkeypatch.setattr(conv, "AUTO_MIN_FLOPS", 0.0)
  monkeypatch.setattr(conv, "measure", _no_measure)
  symbolic = jax.ShapeDtypeStruct(
    jax.export.symbolic_shape("b, 5, 5, 2"), jnp.float32
  )
  for mode in ("auto", "im2col_cpu"):
    assert conv.plan(mode, symbolic, w, (1, 1), pads) == ("xla",) * 3
  monkeypatch.setattr(conv.jax, "default_backend", lambda: "gpu")
  for mode in ("auto", "im2col_cpu"):
    assert conv.plan(mode, x, w, (1, 1), pads) == ("xla",) * 3
  assert conv.plan("taps", x, w, (1, 1), pads) == ("xla", "xla", "taps")


def _no_measure(*args, **kwargs):
  raise AssertionError("measured a convolution the cache holds")


def _fake_measure(winner):
  calls = []

  def measure(op, *key):
    calls.append(op)
    return {p: [1.0 if p == winner else 2.0] * 3 for p in conv.PATHS}

  return measure, calls


def test_pick_replaces_xla_only_by_a_margin_in_every_round():
  assert conv.pick({"xla": [1.0, 1.0], "taps": [0.8, 0.8]}) == "taps"
  assert conv.pick({"xla": [1.0, 1.0], "taps": [0.8, 0.95]}) == "xla"
  assert (
    conv.pick({"xla": [1.0] * 2, "taps": [0.5] * 2, "im2col": [0.4] * 2})
    == "im2col"
  )
  assert conv.pick({"xla": [1.0], "im2col": [0.95]}, margin=0.1) == "xla"


def test_choices_are_cached_per_machine_and_logged_once(
  tmp_path, monkeypatch, caplog
):
  monkeypatch.setattr(conv, "_chosen", {})
  path = tmp_path / "conv_paths.json"
  key = ((2, 5, 5, 2), (3, 3, 2, 4), "float32", (1, 1), ((1, 1), (1, 1)))
  measure, calls = _fake_measure("im2col")
  with caplog.at_level("INFO", logger=conv.__name__):
    assert conv.choose("weight_grad", key, path, measure) == "im2col"
    assert conv.choose("weight_grad", key, path, measure) == "im2col"
  assert calls == ["weight_grad"]
  assert len(caplog.records) == 1 and "im2col" in caplog.text
  saved = conv.load_choices(path)
  assert list(saved) == [conv.machine_key()]
  entry = conv.entry_name("weight_grad", key)
  assert saved[conv.machine_key()][entry]["path"] == "im2col"
  # A later process reads the file and does not measure.
  monkeypatch.setattr(conv, "_chosen", {})
  assert conv.choose("weight_grad", key, path, _no_measure) == "im2col"
  # Another jaxlib, CPU or XLA_FLAGS is another machine: measured again.
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  assert conv.choose("weight_grad", key, path, measure) == "im2col"
  assert calls == ["weight_grad"] * 2 and len(conv.load_choices(path)) == 2
  assert "float32" in entry and "weight_grad" in entry


def test_an_unwritable_cache_still_chooses(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(conv, "_chosen", {})
  (tmp_path / "file").write_text("")
  path = tmp_path / "file" / "conv_paths.json"  # Its folder is a file.
  key = ((2, 5, 5, 2), (3, 3, 2, 4), "float32", (1, 1), ((1, 1), (1, 1)))
  with caplog.at_level("WARNING", logger=conv.__name__):
    assert conv.choose("forward", key, path, _fake_measure("taps")[0]) == "taps"
  assert "Cannot write the convolution cache" in caplog.text


def _cache_all(tmp_path, monkeypatch, key, paths):
  monkeypatch.setenv("JAX_ONECLASS_CACHE", str(tmp_path))
  monkeypatch.setattr(conv, "_chosen", {})
  monkeypatch.setattr(conv, "AUTO_MIN_FLOPS", 0.0)
  monkeypatch.setattr(conv, "measure", _no_measure)
  for op, path in zip(conv.OPS, paths, strict=True):
    conv.save_choice(
      conv.cache_path(),
      conv.machine_key(),
      conv.entry_name(op, key),
      {"path": path},
    )


def _measured_xla_fastest(op, *key, **kwargs):
  return {path: [1.0 if path == "xla" else 2.0] for path in conv.PATHS}


def test_the_traced_program_is_the_same_before_and_after_measuring(
  tmp_path, monkeypatch
):
  # A sweep groups members by their traced programs: the first trace, which
  # measures the gradients, must not differ from the later ones.
  monkeypatch.setenv("JAX_ONECLASS_CACHE", str(tmp_path))
  monkeypatch.setattr(conv, "_chosen", {})
  monkeypatch.setattr(conv, "AUTO_MIN_FLOPS", 0.0)
  monkeypatch.setattr(conv, "measure", _measured_xla_fastest)
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 2))
  w = jax.random.normal(jax.random.key(1), (3, 3, 2, 4))
  first = _grad_jaxpr(x, w)
  assert set(conv.chosen_paths().values()) == {"xla"}
  assert _grad_jaxpr(x, w) == first

  def loss(conv_fn, w):
    return (conv_fn(x, w, (1, 1), "SAME", dimension_numbers=_DN) ** 2).sum()

  np.testing.assert_allclose(
    jax.grad(functools.partial(loss, conv.conv_general_dilated))(w),
    jax.grad(functools.partial(loss, lax.conv_general_dilated))(w),
    rtol=1e-6,
  )


def test_cached_choices_are_taken_in_the_backward_pass(tmp_path, monkeypatch):
  x, w = jnp.ones((2, 5, 5, 2)), jnp.ones((3, 3, 2, 4))
  key = conv.shape_key(x, w, (1, 1), ((1, 1), (1, 1)))
  _cache_all(tmp_path, monkeypatch, key, ("xla", "taps", "im2col"))
  assert "custom_vjp" in _grad_jaxpr(x, w)
  assert set(conv.chosen_paths().values()) == {"xla", "taps", "im2col"}


def test_auto_measures_in_the_trace_and_caches(tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_ONECLASS_CACHE", str(tmp_path))
  monkeypatch.setattr(conv, "_chosen", {})
  monkeypatch.setattr(conv, "AUTO_MIN_FLOPS", 0.0)
  monkeypatch.setattr(
    conv, "measure", functools.partial(conv.measure, rounds=1)
  )
  x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
  jax.jit(
    jax.grad(
      lambda w: conv.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=_DN
      ).sum()
    )
  )(w)
  entries = conv.load_choices(conv.cache_path())[conv.machine_key()]
  assert sorted(e.split()[0] for e in entries) == sorted(conv.OPS)
  for record in entries.values():
    assert record["path"] == conv.pick(record["seconds"])
    assert set(record["seconds"]) == set(conv.PATHS)


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
  moved = {"conv_weight_grad": ("xla", "auto")}
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


def _products(jaxpr):
  """Every conv_general_dilated / dot_general equation, sub-jaxprs too."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
      yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _products(inner)


@pytest.mark.parametrize("method_name", ["ganomaly", "reverse_distillation"])
def test_bf16_products_accumulate_in_float32(method_name):
  """Under dtype=bfloat16 every bfloat16 convolution and product of a whole
  train step (forward and backward) asks for float32 accumulation."""
  config = tiny_config(method_name)
  config.dtype = "bfloat16"
  info = data.dataset_info(config)
  method = methods.get_method(config, info)
  state = jax.eval_shape(
    lambda: method.init_state(jax.random.key(0), info.image_shape)
  )
  batch = jax.eval_shape(lambda: next(data.train_batches(config)))
  jaxpr = jax.make_jaxpr(method.train_step)(state, batch, jax.random.key(1))
  low = [
    eqn
    for eqn in _products(jaxpr.jaxpr)
    if any(v.aval.dtype == jnp.bfloat16 for v in eqn.invars)
  ]
  assert low  # The dtype reached the network.
  for eqn in low:
    assert eqn.params["preferred_element_type"] == jnp.float32, eqn


def test_bf16_matmul_and_conv_stay_close_to_float32():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 8)) / 12.0
  m = jax.random.normal(jax.random.key(2), (8, 32)) / 3.0

  def loss(x, w, m, settings):
    y = settings.conv_general_dilated(
      x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=_DN
    )
    return (settings.matmul(y, m).astype(jnp.float32) ** 2).mean()

  f32, bf16 = conv.ConvSettings(), conv.ConvSettings("bfloat16")
  results = jax.jit(
    lambda x, w, m: [
      jax.value_and_grad(loss, (0, 1, 2))(x, w, m, s) for s in (f32, bf16)
    ]
  )(x, w, m)
  # bfloat16 keeps 8 significant bits: a 2% relative bound, leaf by leaf.
  for want, got in zip(*(jax.tree.leaves(r) for r in results)):
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, atol=0.02 * scale, rtol=0)
