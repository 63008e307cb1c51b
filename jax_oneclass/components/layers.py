"""Layers shared by several networks: torchvision-style convolutions and
BatchNorm, and depth-to-space."""

import flax.linen as nn
import jax

from jax_oneclass.components import conv as conv_lib

# torchvision's defaults: BatchNorm2d(eps=1e-5, momentum=0.1), which is Flax
# momentum 0.9; convolutions drawn with kaiming_normal_(mode='fan_out').
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(
  features: int,
  kernel: int,
  stride: int = 1,
  name=None,
  settings: conv_lib.ConvSettings = conv_lib.ConvSettings(),
):
  """torchvision's bias-free conv: symmetric 'same' padding for odd kernels
  (as PyTorch pads; 'SAME' would pad stride-2 convolutions asymmetrically)
  and kaiming_normal_(mode='fan_out') weights; computed as `settings`
  say."""
  pad = (kernel - 1) // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    (stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=CONV_INIT,
    name=name,
    conv_general_dilated=settings.conv_general_dilated,
  )


def batch_norm(train: bool, name=None):
  """torchvision's BatchNorm2d defaults (eps 1e-5, momentum 0.1)."""
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    name=name,
  )


def depth_to_space(x: jax.Array) -> jax.Array:
  """[B, H, W, 4C] -> [B, 2H, 2W, C]; channels ordered (row, col, c)."""
  b, h, w, c4 = x.shape
  x = x.reshape(b, h, w, 2, 2, c4 // 4).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, 2 * h, 2 * w, c4 // 4)
