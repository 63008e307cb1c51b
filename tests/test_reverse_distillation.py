"""Reverse distillation networks: shapes, sizes, transposed conv, losses."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_oneclass.components import conv as conv_lib
from jax_oneclass.errors import ConfigError
from jax_oneclass.methods.reverse_distillation import network as rd


def _size(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _shapes(maps):
  return [m.shape for m in maps]


def _abstract_init(arch, side, **kwargs):
  """eval_shape of (teacher maps, code, student maps, OCBE vars, decoder
  vars) for one image; nothing is computed (XLA's convolutions: 'auto'
  would time the full-size ones while tracing)."""
  kwargs.setdefault("conv_settings", conv_lib.ConvSettings(weight_grad="xla"))
  teacher, ocbe, decoder = rd.build(arch, **kwargs)

  def init(images):
    keys = jax.random.split(jax.random.key(0), 3)
    features = rd.teacher_maps(teacher.init_with_output(keys[0], images)[0])
    code, ocbe_vars = ocbe.init_with_output(keys[1], features)
    student, decoder_vars = decoder.init_with_output(keys[2], code)
    return features, code, student, ocbe_vars, decoder_vars

  return jax.eval_shape(
    init, jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  )


def test_wide_resnet50_2_shapes_and_sizes_at_256():
  features, code, student, ocbe_vars, decoder_vars = _abstract_init(
    "wide_resnet50_2", 256
  )
  assert _shapes(features) == [
    (1, 64, 64, 256),
    (1, 32, 32, 512),
    (1, 16, 16, 1024),
  ]
  assert code.shape == (1, 8, 8, 2048)
  assert _shapes(student) == _shapes(features)
  params = ocbe_vars["params"]
  # The OCE stage reads the 3072-channel MFF concatenation (at 16x16; its
  # stride-2 output is 8x8).
  assert params["bn_layer_0"]["conv1"]["kernel"].shape == (1, 1, 3072, 1024)
  assert params["bn_layer_0"]["downsample_0"]["kernel"].shape == (
    1,
    1,
    3072,
    2048,
  )
  # The official OCBE minus its unused conv4/bn4.
  oce = _size({k: v for k, v in params.items() if k.startswith("bn_layer")})
  assert oce == 48_263_168
  assert _size(params) - oce == 10_621_952  # MFF.
  assert _size(params) == 58_885_120
  decoder_params = decoder_vars["params"]
  assert _size(decoder_params) == 24_917_504
  assert [
    _size(
      {k: v for k, v in decoder_params.items() if k.startswith(f"layer{i}_")}
    )
    for i in (1, 2, 3)
  ] == [17_840_128, 5_317_632, 1_759_744]
  # Every BN has running statistics; the teacher's are not counted here.
  assert set(decoder_vars) == {"params", "batch_stats"}


def test_anomalib_width_ocbe_size():
  *_, ocbe_vars, _ = _abstract_init(
    "wide_resnet50_2", 256, ocbe_width_per_group=64
  )
  assert _size(ocbe_vars["params"]) == 30_829_568


def test_resnet18_shapes_at_64():
  features, code, student, ocbe_vars, _ = _abstract_init("resnet18", 64)
  assert _shapes(features) == [(1, 16, 16, 64), (1, 8, 8, 128), (1, 4, 4, 256)]
  assert code.shape == (1, 2, 2, 512)
  assert _shapes(student) == _shapes(features)
  assert ocbe_vars["params"]["bn_layer_0"]["conv1"]["kernel"].shape == (
    3,
    3,
    768,
    512,
  )


def _normal(rng, shape, std=1.0):
  return (std * rng.standard_normal(shape)).astype(np.float32)


def test_student_trains_with_finite_gradients():
  # ResNet-18-style networks cut to one block per stage, on teacher-shaped
  # maps of a 32x32 image. Variables are filled from NumPy: compiling the
  # initialisers would take most of this test's time.
  ocbe, decoder = rd.OCBE("basic", 1), rd.StudentDecoder("basic", (1, 1, 1))
  rng = np.random.default_rng(0)
  features = [
    _normal(rng, (2, 8 // 2**i, 8 // 2**i, 64 * 2**i)) for i in range(3)
  ]
  fill = lambda s: _normal(rng, s.shape, 0.05)
  ocbe_vars = jax.tree.map(
    fill, jax.eval_shape(ocbe.init, jax.random.key(0), features)
  )
  decoder_vars = jax.tree.map(
    fill,
    jax.eval_shape(decoder.init, jax.random.key(0), jnp.zeros((2, 1, 1, 512))),
  )

  @jax.jit
  @jax.value_and_grad
  def loss_and_grads(params):
    code, _ = ocbe.apply(
      {**ocbe_vars, "params": params[0]},
      features,
      train=True,
      mutable=["batch_stats"],
    )
    student, _ = decoder.apply(
      {**decoder_vars, "params": params[1]},
      code,
      train=True,
      mutable=["batch_stats"],
    )
    assert _shapes(student) == _shapes(features)
    return rd.reverse_distillation_loss(features, student)

  loss, grads = loss_and_grads((ocbe_vars["params"], decoder_vars["params"]))
  assert 0.0 <= float(loss) <= 6.0
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_conv_transpose_2x2_is_torchs_conv_transpose():
  x = _normal(np.random.default_rng(0), (2, 3, 4, 5))
  module = rd.ConvTranspose2x2(6)
  variables = module.init(jax.random.key(1), x)
  kernel = variables["params"]["kernel"]  # torch weight [5, 6, 2, 2] as HWIO.
  fast = module.apply(variables, x)
  assert fast.shape == (2, 6, 8, 6)
  # torch ConvTranspose2d(5, 6, 2, 2) is the input-gradient of
  # Conv2d(6, 5, 2, 2) with the same weight tensor.
  forward_kernel = kernel.transpose(0, 1, 3, 2)  # HWIO with I=6, O=5.
  conv = lambda y: jax.lax.conv_general_dilated(
    y,
    forward_kernel,
    (2, 2),
    "VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  _, vjp = jax.vjp(conv, jnp.zeros((2, 6, 8, 6)))
  np.testing.assert_allclose(fast, vjp(x)[0], atol=1e-5)
  reference = jax.lax.conv_transpose(
    x,
    forward_kernel,
    (2, 2),
    "VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    transpose_kernel=True,
  )
  np.testing.assert_allclose(fast, reference, atol=1e-5)
  # Flax's own ConvTranspose takes the spatially flipped kernel (spec C3).
  flax_out = nn.ConvTranspose(6, (2, 2), (2, 2), "VALID", use_bias=False).apply(
    {"params": {"kernel": kernel[::-1, ::-1]}}, x
  )
  np.testing.assert_allclose(fast, flax_out, atol=1e-5)


def test_conv_transpose_2x2_init_is_torchs_default():
  kernel = rd.ConvTranspose2x2(64).init(
    jax.random.key(0), jnp.zeros((1, 1, 1, 32))
  )["params"]["kernel"]
  bound = 1.0 / np.sqrt(4 * 64)  # torch's fan_in of [32, 64, 2, 2] is 256.
  assert np.abs(kernel).max() <= bound
  assert np.abs(kernel).max() > 0.95 * bound


def test_cosine_distance_maps():
  rng = np.random.default_rng(0)
  teacher = [_normal(rng, (2, 4, 4, 8)), _normal(rng, (2, 2, 2, 16))]
  student = [_normal(rng, (2, 4, 4, 8)), _normal(rng, (2, 2, 2, 16))]
  maps = rd.cosine_distance_maps(teacher, student)
  assert _shapes(maps) == [(2, 4, 4), (2, 2, 2)]
  for m, t, s in zip(maps, teacher, student):
    t, s = np.asarray(t), np.asarray(s)
    expected = 1 - (t * s).sum(-1) / (
      np.linalg.norm(t, axis=-1) * np.linalg.norm(s, axis=-1)
    )
    np.testing.assert_allclose(m, expected, atol=1e-6)
    assert np.all(m >= 0) and np.all(m <= 2)
  for m in rd.cosine_distance_maps(teacher, teacher):
    np.testing.assert_allclose(m, 0.0, atol=1e-6)
  for m in rd.cosine_distance_maps(teacher, [-t for t in teacher]):
    np.testing.assert_allclose(m, 2.0, atol=1e-6)
  # Zero vectors: torch's clamped norms give distance 1 and finite grads.
  zeros = [jnp.zeros((1, 1, 1, 3))]
  np.testing.assert_allclose(rd.cosine_distance_maps(zeros, zeros)[0], 1.0)
  grad = jax.grad(lambda t: rd.reverse_distillation_loss(t, zeros))(zeros)
  assert np.isfinite(grad[0]).all()


def _random_maps(seed, spatial):
  rng = np.random.default_rng(seed)
  shapes = [(3, spatial, spatial, 8), (3, spatial, spatial, 4)]
  return ([_normal(rng, s) for s in shapes], [_normal(rng, s) for s in shapes])


def test_loss_modes_agree_on_1x1_maps_only():
  teacher, student = _random_maps(0, 1)
  flat = rd.reverse_distillation_loss(teacher, student, "flattened")
  per_pixel = rd.reverse_distillation_loss(teacher, student, "per_pixel")
  np.testing.assert_allclose(flat, per_pixel, rtol=1e-6)
  teacher, student = _random_maps(1, 4)
  flat = rd.reverse_distillation_loss(teacher, student, "flattened")
  per_pixel = rd.reverse_distillation_loss(teacher, student, "per_pixel")
  assert abs(float(flat) - float(per_pixel)) > 1e-3
  # 'flattened': batch mean of 1 - cos of whole flattened maps, summed.
  expected = 0.0
  for t, s in zip(teacher, student):
    t, s = np.asarray(t).reshape(3, -1), np.asarray(s).reshape(3, -1)
    cos = (
      (t * s).sum(-1) / np.linalg.norm(t, axis=-1) / np.linalg.norm(s, axis=-1)
    )
    expected += np.mean(1 - cos)
  np.testing.assert_allclose(flat, expected, rtol=1e-5)
  np.testing.assert_allclose(
    per_pixel,
    sum(np.mean(m) for m in rd.cosine_distance_maps(teacher, student)),
    rtol=1e-6,
  )
  with pytest.raises(ConfigError, match="per_pixel"):
    rd.reverse_distillation_loss(teacher, student, "flatten")


def test_unknown_arch_is_a_config_error():
  with pytest.raises(ConfigError, match="wide_resnet50_2"):
    rd.build("resnet101")
  with pytest.raises(ConfigError, match="block"):
    rd.OCBE(block="dense").init(
      jax.random.key(0),
      [
        jnp.zeros((1, 8, 8, 4)),
        jnp.zeros((1, 4, 4, 8)),
        jnp.zeros((1, 2, 2, 16)),
      ],
    )
