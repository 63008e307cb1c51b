"""DCGAN encoder, decoder and discriminator, as GANomaly builds them, and the
networks the two GAN methods assemble from them.

Layer rules follow the official GANomaly code (its lib/networks.py): 4x4
convolutions without bias, a first layer without
BatchNorm, a pyramid that halves the side and doubles the width down to 4x4,
and a final 4x4 valid convolution to a 1x1 code. The decoder mirrors it with
transposed convolutions and ends in tanh, so images live in [-1, 1].
Stride-2 transposed convolutions (`UpConv`) run as `conv_settings`'
`transposed_conv` says (the sub-pixel form by default). Images are NHWC;
side must be a power of two >= 16.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_oneclass.components import conv as conv_lib
from jax_oneclass.errors import ConfigError

_CONV_INIT = nn.initializers.normal(0.02)  # weights_init: N(0, 0.02).


def _bn_scale_init(key, shape, dtype=jnp.float32):
  """weights_init draws BatchNorm scales from N(1, 0.02)."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _batch_norm(train: bool):
  # PyTorch momentum 0.1 is Flax momentum 0.9.
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    scale_init=_bn_scale_init,
  )


# Padding modes, named as torch's Conv2d padding_mode, as jnp.pad modes.
PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "circular": "wrap"}


def check_padding(padding: str) -> None:
  """Raises ConfigError unless `padding` is one of PADDING_MODES."""
  if padding not in PADDING_MODES:
    raise ConfigError(
      f"Unknown padding mode {padding!r}; set config.model.padding to one "
      f"of {', '.join(PADDING_MODES)}."
    )


def _pad(x, pad: int, padding: str):
  """Pads the two spatial sides of NHWC x by `pad` in the given mode."""
  if pad == 0:
    return x
  return jnp.pad(
    x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=PADDING_MODES[padding]
  )


def _conv(
  features: int,
  kernel: int,
  stride: int,
  pad: int,
  settings: conv_lib.ConvSettings,
  padding: str = "zeros",
  name=None,
):
  """A bias-free conv computed as `settings` say; `pad` pixels each side in
  mode `padding` (zeros, reflect or circular), then a VALID window."""
  conv = nn.Conv(
    features,
    (kernel, kernel),
    (stride, stride),
    padding="VALID",
    use_bias=False,
    kernel_init=_CONV_INIT,
    name=name,
    conv_general_dilated=settings.conv_general_dilated,
  )
  return lambda x: conv(_pad(x, pad, padding))


class UpConv(nn.Module):
  """PyTorch's ConvTranspose2d(k=4, s=2, p=1, bias=False).

  The kernel [4, 4, C_in, C_out] means what torch's weight[c_in, c_out, h,
  w] means. Computed as `conv_settings.transposed_conv` says; its default,
  the sub-pixel form (a 2x2 convolution to 4 * C_out channels,
  depth-to-space and a one-pixel crop), avoids the dilated-input
  convolution XLA:CPU runs far slower, forward and backward.
  """

  features: int
  # The one-pixel border around the input the transposed conv sees: zeros
  # (torch's only mode for ConvTranspose2d), reflect or circular.
  padding: str = "zeros"
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings()

  @nn.compact
  def __call__(self, x):
    c_in = x.shape[-1]
    kernel = self.param("kernel", _CONV_INIT, (4, 4, c_in, self.features))
    # torch's p=1 on the padded input is lax's zero padding; the flip makes
    # lax's correlation torch's adjoint of a convolution.
    return self.conv_settings.conv_transpose(
      _pad(x, 1, self.padding), kernel[::-1, ::-1], (2, 2), ((0, 0), (0, 0))
    )


def _project_up(features: int):
  """ConvTranspose2d(k=4, s=1, p=0): a 1x1 code to a 4x4 map."""
  return nn.ConvTranspose(
    features, (4, 4), padding="VALID", use_bias=False, kernel_init=_CONV_INIT
  )


def check_image_size(image_size: int) -> None:
  """Raises ConfigError unless the side is a power of two >= 16."""
  if image_size < 16 or image_size & (image_size - 1):
    raise ConfigError(
      f"DCGAN networks need a square power-of-two image side >= 16 (the "
      f"pyramid halves it down to 4x4); got {image_size}. Set "
      "config.data.image_size to 16, 32, 64, 128 or 256."
    )


def top_width(image_size: int, width: int) -> int:
  """Channels at the 4x4 end of the pyramid: width * image_size / 8."""
  return width * image_size // 8


class DCGANEncoder(nn.Module):
  """Image [B, S, S, C] -> (code [B, out_features], 4x4 features).

  Attributes:
    out_features: size of the final 1x1 code (the latent size, or 1 for a
      discriminator's logit).
    width: channels of the first layer (ngf).
    extra_layers: 3x3 conv + BN + LeakyReLU layers after the first layer.
    padding: how the padded convolutions pad (see PADDING_MODES); GANomaly's
      is zeros.
    conv_settings: how the convolutions compute.
  """

  out_features: int
  width: int = 64
  extra_layers: int = 0
  padding: str = "zeros"
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings()

  @nn.compact
  def __call__(self, x, train: bool):
    check_image_size(x.shape[1])
    check_padding(self.padding)
    conv = functools.partial(
      _conv, settings=self.conv_settings, padding=self.padding
    )
    x = nn.leaky_relu(conv(self.width, 4, 2, 1)(x), 0.2)
    for _ in range(self.extra_layers):
      x = conv(x.shape[-1], 3, 1, 1)(x)
      x = nn.leaky_relu(_batch_norm(train)(x), 0.2)
    while x.shape[1] > 4:
      x = conv(2 * x.shape[-1], 4, 2, 1)(x)
      x = nn.leaky_relu(_batch_norm(train)(x), 0.2)
    features = x
    code = _conv(
      self.out_features, 4, 1, 0, self.conv_settings, name="final_conv"
    )(x)
    return code.reshape((x.shape[0], self.out_features)), features


class DCGANDecoder(nn.Module):
  """Code [B, latent] -> image [B, S, S, C] in [-1, 1] (tanh)."""

  image_size: int
  channels: int
  width: int = 64
  extra_layers: int = 0
  padding: str = "zeros"  # Of the UpConvs and the 3x3 extra layers.
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings()

  @nn.compact
  def __call__(self, z, train: bool):
    check_image_size(self.image_size)
    check_padding(self.padding)
    up = functools.partial(
      UpConv, padding=self.padding, conv_settings=self.conv_settings
    )
    x = z.reshape((z.shape[0], 1, 1, z.shape[-1]))
    channels = top_width(self.image_size, self.width)
    x = nn.relu(_batch_norm(train)(_project_up(channels)(x)))
    while x.shape[1] < self.image_size // 2:
      channels //= 2
      x = nn.relu(_batch_norm(train)(up(channels)(x)))
    for _ in range(self.extra_layers):
      x = _conv(channels, 3, 1, 1, self.conv_settings, self.padding)(x)
      x = nn.relu(_batch_norm(train)(x))
    return jnp.tanh(up(self.channels)(x))


class GANomalyGenerator(nn.Module):
  """Encoder G_E, decoder G_D and a second encoder E (Akcay et al. 2018).

  Returns {'fake': G_D(G_E(x)), 'latent_in': G_E(x), 'latent_out':
  E(G_D(G_E(x)))}.
  """

  latent_size: int = 100
  width: int = 64
  extra_layers: int = 0
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings()

  @nn.compact
  def __call__(self, x, train: bool):
    size, channels = x.shape[1], x.shape[-1]
    settings = dict(conv_settings=self.conv_settings)
    latent_in, _ = DCGANEncoder(
      self.latent_size,
      self.width,
      self.extra_layers,
      name="encoder",
      **settings,
    )(x, train)
    fake = DCGANDecoder(
      size, channels, self.width, self.extra_layers, name="decoder", **settings
    )(latent_in, train)
    latent_out, _ = DCGANEncoder(
      self.latent_size,
      self.width,
      self.extra_layers,
      name="reencoder",
      **settings,
    )(fake, train)
    return {"fake": fake, "latent_in": latent_in, "latent_out": latent_out}


class DCGANDiscriminator(nn.Module):
  """Image -> (real/fake logit [B], features [B, 4, 4, top width]).

  The features are the encoder trunk's output before the final conv, which
  GANomaly's adversarial loss matches.
  """

  width: int = 64
  extra_layers: int = 0
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings()

  @nn.compact
  def __call__(self, x, train: bool):
    logits, features = DCGANEncoder(
      1,
      self.width,
      self.extra_layers,
      conv_settings=self.conv_settings,
      name="trunk",
    )(x, train)
    return logits[:, 0], features


class EncoderDecoder(nn.Module):
  """Image -> {'fake': image in [-1, 1], 'code': [B, latent_size]}: GANomaly's
  G_E and G_D without the second encoder (the dgad generator)."""

  latent_size: int
  width: int
  extra_layers: int = 0
  padding: str = "zeros"
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings()

  @nn.compact
  def __call__(self, x, train: bool):
    code, _ = DCGANEncoder(
      self.latent_size,
      self.width,
      self.extra_layers,
      self.padding,
      self.conv_settings,
      name="encoder",
    )(x, train)
    fake = DCGANDecoder(
      x.shape[1],
      x.shape[-1],
      self.width,
      self.extra_layers,
      self.padding,
      self.conv_settings,
      name="decoder",
    )(code, train)
    return {"fake": fake, "code": code}
