"""ResNet for small images (CIFAR-style stem) and self-supervised heads.

The backbone follows the ResNet-18 of Sohn et al. 2021 for 32x32 inputs: a 3x3
stride-1 stem without max-pooling, four stages of basic blocks with widths
w, 2w, 4w, 8w and strides 1, 2, 2, 2, then global average pooling. BatchNorm
statistics live in the `batch_stats` collection; `train=False` uses the
running averages, so a test image's score never depends on its batch.
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jax_oneclass.components import conv as conv_lib
from jax_oneclass.components import backbones

# The TF2 reference code uses BatchNorm momentum 0.9, eps 1e-5.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
# He initialisation with fan-out, as in the reference's convolutions.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _batch_norm(train: bool, zero_init: bool = False, name=None):
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=_BN_MOMENTUM,
    epsilon=_BN_EPSILON,
    scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
    name=name,
  )


def _symmetric_padding(kernel_size: int):
  """k // 2 zeros on every side, as the reference's ZeroPadding2D + VALID.

  Not "SAME": for a stride-2 3x3 convolution on an even size, SAME pads
  (0, 1), which shifts the sampling grid one pixel off the 1x1 shortcut's.
  """
  pad = kernel_size // 2
  return ((pad, pad), (pad, pad))


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity or 1x1-projection shortcut."""

  features: int
  strides: int = 1
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings()

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda f, k, s, name: nn.Conv(
      f,
      (k, k),
      (s, s),
      padding=_symmetric_padding(k),
      use_bias=False,
      name=name,
      kernel_init=_CONV_INIT,
      conv_general_dilated=self.conv_settings.conv_general_dilated,
    )
    y = conv(self.features, 3, self.strides, "conv1")(x)
    y = nn.relu(_batch_norm(train, name="bn1")(y))
    y = conv(self.features, 3, 1, "conv2")(y)
    y = _batch_norm(train, name="bn2")(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = conv(self.features, 1, self.strides, "shortcut_conv")(x)
      x = _batch_norm(train, name="shortcut_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet backbone; returns pooled features [B, 8 * width]."""

  stage_sizes: Sequence[int] = (2, 2, 2, 2)  # ResNet-18.
  width: int = 64
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings()

  @nn.compact
  def __call__(self, images, train: bool):
    x = 2.0 * images - 1.0  # Inputs arrive in [0, 1].
    x = nn.Conv(
      self.width,
      (3, 3),
      padding=_symmetric_padding(3),
      use_bias=False,
      kernel_init=_CONV_INIT,
      name="stem_conv",
      conv_general_dilated=self.conv_settings.conv_general_dilated,
    )(x)
    x = nn.relu(_batch_norm(train, name="stem_bn")(x))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(
          self.width * 2**stage,
          strides,
          self.conv_settings,
          name=f"stage{stage + 1}_block{block + 1}",
        )(x, train)
    return jnp.mean(x, axis=(1, 2))


class MLPHead(nn.Module):
  """[Dense (no bias) -> BN -> ReLU] x (len(dims) - 1), then a linear Dense.

  This is the reference code's head: `head_dims=(512,) * 8 + (128,)` for
  contrastive learning, `(512,) * 8` followed by the rotation logits for
  RotNet. The last layer has a bias only when `last_bias` is set.
  """

  dims: Sequence[int]
  last_bias: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    for i, dim in enumerate(self.dims[:-1]):
      x = nn.Dense(dim, use_bias=False, name=f"dense{i + 1}")(x)
      x = nn.relu(_batch_norm(train, name=f"bn{i + 1}")(x))
    return nn.Dense(
      self.dims[-1], use_bias=self.last_bias, name=f"dense{len(self.dims)}"
    )(x)


class SelfSupervisedNet(nn.Module):
  """Backbone plus a projection head and, optionally, a rotation classifier.

  `arch` "cifar" is the ResNet above (`stage_sizes`, `width`); a name from
  `backbones.ARCHS` ("resnet18", ...) is torchvision's ImageNet layout
  instead (grey images repeated to RGB, ImageNet-normalised, as the
  localisation methods feed it), so that its 'backbone' variables can serve
  them as a self-supervised teacher or feature extractor.

  Returns a dict with 'pool' (pooled backbone output [B, 8 * width]),
  'embed' (the MLP head output [B, head_dims[-1]]) and, when
  `num_rotations` > 0, 'rotation_logits' [B, num_rotations] from a linear
  layer on 'embed'. The one-class classifiers read 'pool' and 'embed', as
  the reference code evaluates both. `conv_settings` say how the
  backbone's convolutions compute.
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  head_dims: Sequence[int] = (512, 128)
  num_rotations: int = 0
  arch: str = "cifar"
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings()

  @nn.compact
  def __call__(self, images, train: bool = False):
    if self.arch == "cifar":
      pool = ResNet(
        self.stage_sizes, self.width, self.conv_settings, name="backbone"
      )(images, train)
    else:  # The inputs the localisation methods give it (frozen_features).
      backbone = backbones.build(
        self.arch, with_layer4=True, conv_settings=self.conv_settings
      )
      pool = backbone.clone(parent=self, name="backbone")(
        backbones.torchvision_inputs(images), train
      )["pool"]
    embed = MLPHead(
      self.head_dims, last_bias=self.num_rotations > 0, name="head"
    )(pool, train)
    outputs = {"pool": pool, "embed": embed}
    if self.num_rotations:
      outputs["rotation_logits"] = nn.Dense(
        self.num_rotations, name="rotation_classifier"
      )(embed)
    return outputs
