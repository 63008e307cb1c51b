"""Transposed convolutions without lhs_dilation, against Flax and XLA."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jax_oneclass.components import conv as conv_lib
from jax_oneclass.components import transposed_conv as tc
from jax_oneclass.methods.gan import dcgan
from jax_oneclass.methods.reverse_distillation import network as rd

_NHWC = ("NHWC", "HWIO", "NHWC")
# (kernel, stride, lax padding) of the decoders' transposed convolutions:
# torch ConvTranspose2d(4, 2, 1) (DCGAN), (2, 2, 0) (reverse distillation),
# (4, 1, 0) on a 1x1 code (DCGAN's first layer), and an odd kernel.
_CASES = [
  (4, 2, ((2, 2), (2, 2))),
  (2, 2, ((1, 1), (1, 1))),
  (4, 1, "VALID"),
  (3, 2, ((1, 2), (0, 1))),
]
_TOL = {jnp.float32: 2e-5, jnp.float64: 1e-12}


def _value_and_grads(fn, x, kernel, dy):
  y, vjp = jax.vjp(fn, x, kernel)
  return (y, *vjp(dy))


def _check_against_flax(dtype):
  rng = np.random.default_rng(0)
  for k, s, padding in _CASES:
    size = 1 if s == 1 else 3
    x = jnp.asarray(rng.normal(size=(2, size, size + 1, 3)), dtype)
    kernel = jnp.asarray(rng.normal(size=(k, k, 3, 5)), dtype)
    layer = nn.ConvTranspose(5, (k, k), (s, s), padding, use_bias=False)
    flax_fn = lambda x, w, layer=layer: layer.apply(
      {"params": {"kernel": w}}, x
    )
    dy = jnp.asarray(
      rng.normal(size=jax.eval_shape(flax_fn, x, kernel).shape), dtype
    )

    @jax.jit  # One compilation per case: eager ops compile one by one.
    def results(x, kernel, dy, s=s, padding=padding, flax_fn=flax_fn):
      out = {"flax": _value_and_grads(flax_fn, x, kernel, dy)}
      for method in ("subpixel", "zeros"):
        fn = lambda x, w, m=method: tc.conv_transpose(
          x, w, (s, s), padding, method=m
        )
        out[method] = _value_and_grads(fn, x, kernel, dy)
      return out

    out = results(x, kernel, dy)
    for method in ("subpixel", "zeros"):
      names = ("value", "d_input", "d_kernel")
      for name, got, want in zip(names, out[method], out["flax"]):
        assert got.dtype == dtype
        np.testing.assert_allclose(
          got, want, rtol=_TOL[dtype], atol=_TOL[dtype], err_msg=method + name
        )


def test_conv_transpose_equals_flax_in_value_and_both_gradients():
  _check_against_flax(jnp.float32)
  with jax.enable_x64(True):
    _check_against_flax(jnp.float64)


def _check_input_grad(dtype):
  rng = np.random.default_rng(1)
  # DCGAN's 4x4 stride 2, ResNets' 3x3 and 1x1 stride 2 (odd input too).
  for k, p, size in [(4, 1, 8), (3, 1, 7), (1, 0, 8)]:
    x = jnp.asarray(rng.normal(size=(2, size, size, 3)), dtype)
    kernel = jnp.asarray(rng.normal(size=(k, k, 3, 4)), dtype)
    pads = ((p, p), (p, p))
    conv = lambda x, kernel, pads=pads: lax.conv_general_dilated(
      x, kernel, (2, 2), pads, dimension_numbers=_NHWC
    )
    dy = jnp.asarray(
      rng.normal(size=jax.eval_shape(conv, x, kernel).shape), dtype
    )

    @jax.jit
    def results(x, kernel, dy, pads=pads, conv=conv):
      out = {"jax": jax.vjp(lambda x: conv(x, kernel), x)[1](dy)[0]}
      for method in tc.METHODS:
        out[method] = tc.input_grad(
          dy,
          kernel,
          x.shape[1:3],
          (2, 2),
          pads,
          method=method,
          conv=lax.conv_general_dilated,
        )
      return out

    out = results(x, kernel, dy)
    for method in tc.METHODS:
      np.testing.assert_allclose(
        out[method], out["jax"], rtol=_TOL[dtype], atol=_TOL[dtype]
      )


def test_input_grad_of_a_strided_conv_equals_jax_grad():
  _check_input_grad(jnp.float32)
  with jax.enable_x64(True):
    _check_input_grad(jnp.float64)


@pytest.mark.parametrize("method", ["subpixel", "zeros"])
def test_no_lhs_dilation_in_the_value_or_the_gradients(method):
  x, kernel = jnp.ones((1, 3, 3, 2)), jnp.ones((4, 4, 2, 3))

  def loss(x, kernel):
    y = tc.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)), method=method)
    return (y**2).sum()

  text = str(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, kernel))
  dilations = re.findall(r"lhs_dilation=\((\d+), (\d+)\)", text)
  assert len(dilations) == 3  # The forward and its two gradients.
  assert set(dilations) == {("1", "1")}


def test_decoder_layers_agree_across_methods():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  for make in (
    lambda s: dcgan.UpConv(5, "reflect", conv_settings=s),
    lambda s: rd.ConvTranspose2x2(5, s),
  ):
    variables = make(conv_lib.ConvSettings()).init(jax.random.key(1), x)

    @jax.jit
    def outputs(variables, x, make=make):
      return {
        m: make(conv_lib.ConvSettings(transposed_conv=m)).apply(variables, x)
        for m in ("subpixel", "xla", "zeros")
      }

    out = outputs(variables, x)
    for method in ("xla", "zeros"):
      np.testing.assert_allclose(
        out[method], out["subpixel"], atol=1e-5, err_msg=method
      )


def test_unknown_method_is_a_config_error():
  with pytest.raises(Exception, match="transposed_conv"):
    conv_lib.ConvSettings(transposed_conv="fft")
