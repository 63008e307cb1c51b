"""ImageNet ResNets laid out like torchvision's, for pretrained feature maps.

`TorchResNet` computes what torchvision's `resnet18`, `resnet50` and
`wide_resnet50_2` compute (v1.5 blocks: the stride sits on the 3x3 conv; the
shortcut is a 1x1 conv + BN when the shape changes), in NHWC, so converted
torchvision weights give the same feature maps. Padding is explicit and
symmetric, as PyTorch pads (`layers.conv`).

Module names mirror torchvision's state-dict keys, with every
`<name>.<index>` pair joined by an underscore:

  conv1, bn1                      stem
  layer{L}_{i}/conv{1,2,3}        torch `layer{L}.{i}.conv{1,2,3}`
  layer{L}_{i}/bn{1,2,3}          torch `layer{L}.{i}.bn{1,2,3}`
  layer{L}_{i}/downsample_0       torch `layer{L}.{i}.downsample.0` (1x1 conv)
  layer{L}_{i}/downsample_1       torch `layer{L}.{i}.downsample.1` (BN)

Convolutions have a `kernel` [kH, kW, in, out] and no bias; BatchNorms have
`scale`, `bias` (in `params`) and `mean`, `var` (in `batch_stats`).
`components.pretrained` converts torchvision files by this rule.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_oneclass.components import conv as conv_lib
from jax_oneclass.components.layers import batch_norm, conv
from jax_oneclass.errors import ConfigError

# Per-channel statistics torchvision's ImageNet weights expect (RGB).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(images):
  """Maps RGB images in [0, 1] to the inputs the ImageNet weights expect."""
  mean = jnp.asarray(IMAGENET_MEAN, images.dtype)
  std = jnp.asarray(IMAGENET_STD, images.dtype)
  return (images - mean) / std


def torchvision_inputs(images: jax.Array) -> jax.Array:
  """Images in [0, 1] as a torchvision backbone takes them: grey ones
  repeated to three channels, then ImageNet-normalised."""
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  return imagenet_normalize(images)


def frozen_features(
  backbone: nn.Module, variables, images: jax.Array
) -> dict[str, jax.Array]:
  """Eval-mode features of images in [0, 1] (see `torchvision_inputs`),
  with no gradient flowing back to the backbone's variables (it still
  reaches the images, for `jax_oneclass.explain`)."""
  variables = jax.tree.map(jax.lax.stop_gradient, variables)
  return backbone.apply(variables, torchvision_inputs(images))


def local_mean(x: jax.Array, size: int) -> jax.Array:
  """Mean of each `size` x `size` window (stride 1, 'same' output) over the
  pixels inside the map: average pooling without counting the padding,
  written as two VALID poolings so that ONNX converters read it right."""
  pad = (
    (0, 0),
    ((size - 1) // 2, size // 2),
    ((size - 1) // 2, size // 2),
    (0, 0),
  )
  window = dict(window_shape=(size, size), padding="VALID")
  sums = nn.avg_pool(jnp.pad(x, pad), **window)
  counts = nn.avg_pool(
    jnp.pad(jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype), pad), **window
  )
  return sums / counts


def resize_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[out, in] matrix of `jax.image.resize`'s 'bilinear' along one axis:
  half-pixel centres, a triangle kernel widened when shrinking (antialias),
  weights normalised over the pixels inside. As a matmul it needs no
  concrete batch size, so ONNX converters read it."""
  scale = size_out / size_in
  kernel_scale = min(scale, 1.0)
  source = (np.arange(size_out) + 0.5) / scale - 0.5
  distance = np.abs(source[:, None] - np.arange(size_in)[None, :])
  weights = np.maximum(0.0, 1.0 - distance * kernel_scale)
  return weights / weights.sum(axis=1, keepdims=True)


def patch_features(
  features: dict[str, jax.Array], layers: Sequence[str], neighbourhood: int = 3
) -> jax.Array:
  """Multi-level patch features on the grid of `layers[0]`.

  Each named map is averaged over a `neighbourhood` x `neighbourhood`
  window (stride 1, border windows average only the pixels inside, so a
  patch sees its surroundings), resized bilinearly to the first map's grid
  and concatenated on channels: [B, h, w, sum of channels].
  """
  unknown = [name for name in layers if name not in features]
  if unknown or not layers:
    raise ConfigError(
      f"Feature layers {list(layers)} must be a non-empty "
      f"subset of {sorted(features)}."
    )
  height, width = features[layers[0]].shape[1:3]
  parts = []
  for name in layers:
    level = features[name]
    if neighbourhood > 1:
      level = local_mean(level, neighbourhood)
    if level.shape[1:3] != (height, width):
      rows = jnp.asarray(resize_matrix(level.shape[1], height), level.dtype)
      cols = jnp.asarray(resize_matrix(level.shape[2], width), level.dtype)
      level = jnp.einsum(
        "Hh,bhwc,Ww->bHWc",
        rows,
        level,
        cols,
        precision=jax.lax.Precision.HIGHEST,
      )
    parts.append(level)
  return jnp.concatenate(parts, axis=-1)


def _shortcut(
  x, features: int, stride: int, train: bool, settings: conv_lib.ConvSettings
):
  """Identity, or a strided 1x1 conv + BN when the shape changes."""
  if x.shape[-1] == features and stride == 1:
    return x
  x = conv(features, 1, stride, "downsample_0", settings)(x)
  return batch_norm(train, "downsample_1")(x)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34); outputs `planes` channels."""

  planes: int
  stride: int = 1
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings()

  @nn.compact
  def __call__(self, x, train: bool = False):
    settings = self.conv_settings
    y = conv(self.planes, 3, self.stride, "conv1", settings)(x)
    y = nn.relu(batch_norm(train, "bn1")(y))
    y = conv(self.planes, 3, 1, "conv2", settings)(y)
    y = batch_norm(train, "bn2")(y)
    return nn.relu(y + _shortcut(x, self.planes, self.stride, train, settings))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 block; outputs `4 * planes` channels.

  The inner width is `planes * width_per_group // 64`: 64 gives ResNet-50,
  128 gives WideResNet-50-2.
  """

  planes: int
  stride: int = 1
  width_per_group: int = 64
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings()

  @nn.compact
  def __call__(self, x, train: bool = False):
    settings = self.conv_settings
    width = self.planes * self.width_per_group // 64
    y = conv(width, 1, 1, "conv1", settings)(x)
    y = nn.relu(batch_norm(train, "bn1")(y))
    y = conv(width, 3, self.stride, "conv2", settings)(y)
    y = nn.relu(batch_norm(train, "bn2")(y))
    y = conv(4 * self.planes, 1, 1, "conv3", settings)(y)
    y = batch_norm(train, "bn3")(y)
    return nn.relu(
      y + _shortcut(x, 4 * self.planes, self.stride, train, settings)
    )


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class TorchResNet(nn.Module):
  """torchvision's ImageNet ResNet without the classifier, NHWC.

  `__call__(x, train=False)` takes normalised images [B, H, W, 3] (see
  `imagenet_normalize`) and returns {'layer1', 'layer2', 'layer3'} at
  strides 4, 8 and 16; with `with_layer4`, also 'layer4' (stride 32) and
  'pool', its spatial mean [B, C] (the classifier's input). Without it,
  layer4's parameters are never created. `conv_settings` say how its
  convolutions compute.
  """

  block: str  # "basic" or "bottleneck".
  stage_sizes: Sequence[int]
  width_per_group: int = 64
  with_layer4: bool = False
  base_width: int = 64  # Stem and layer1 planes; torchvision's are 64.
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings()

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.block not in _BLOCKS:
      raise ConfigError(
        f"block must be one of {sorted(_BLOCKS)}, got {self.block!r}."
      )
    block = functools.partial(
      _BLOCKS[self.block], conv_settings=self.conv_settings
    )
    if self.block == "bottleneck":
      block = functools.partial(block, width_per_group=self.width_per_group)
    elif self.width_per_group != 64:
      raise ConfigError(
        "Basic blocks need width_per_group=64, as in torchvision."
      )
    x = conv(self.base_width, 7, 2, "conv1", self.conv_settings)(x)
    x = nn.relu(batch_norm(train, "bn1")(x))
    # torch's MaxPool2d(3, 2, padding=1): -inf padding, then a VALID window
    # (spelled out so that ONNX converters read it right).
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")
    features = {}
    for stage in range(4 if self.with_layer4 else 3):
      for i in range(self.stage_sizes[stage]):
        stride = 2 if stage > 0 and i == 0 else 1
        x = block(
          self.base_width * 2**stage, stride, name=f"layer{stage + 1}_{i}"
        )(x, train)
      features[f"layer{stage + 1}"] = x
    if self.with_layer4:
      features["pool"] = jnp.mean(x, axis=(1, 2))
    return features


_DEFAULT_SETTINGS = conv_lib.ConvSettings()


def resnet18(
  with_layer4: bool = False,
  conv_settings: conv_lib.ConvSettings = _DEFAULT_SETTINGS,
) -> TorchResNet:
  """torchvision `resnet18`: basic blocks, 64/128/256(/512) channels."""
  return TorchResNet(
    "basic", (2, 2, 2, 2), with_layer4=with_layer4, conv_settings=conv_settings
  )


def resnet50(
  with_layer4: bool = False,
  conv_settings: conv_lib.ConvSettings = _DEFAULT_SETTINGS,
) -> TorchResNet:
  """torchvision `resnet50`: bottlenecks, 256/512/1024(/2048) channels."""
  return TorchResNet(
    "bottleneck",
    (3, 4, 6, 3),
    with_layer4=with_layer4,
    conv_settings=conv_settings,
  )


def wide_resnet50_2(
  with_layer4: bool = False,
  conv_settings: conv_lib.ConvSettings = _DEFAULT_SETTINGS,
) -> TorchResNet:
  """torchvision `wide_resnet50_2`: resnet50 with twice the inner width."""
  return TorchResNet(
    "bottleneck",
    (3, 4, 6, 3),
    width_per_group=128,
    with_layer4=with_layer4,
    conv_settings=conv_settings,
  )


def resnet_tiny(
  with_layer4: bool = False,
  conv_settings: conv_lib.ConvSettings = _DEFAULT_SETTINGS,
) -> TorchResNet:
  """Not a torchvision model: resnet18's layout at 1/8 of its widths
  (8/16/32(/64) channels) with one block per stage, for tests and smoke
  runs. No pretrained weights exist for it."""
  return TorchResNet(
    "basic",
    (1, 1, 1, 1),
    with_layer4=with_layer4,
    base_width=8,
    conv_settings=conv_settings,
  )


ARCHS = {
  "resnet18": resnet18,
  "resnet50": resnet50,
  "wide_resnet50_2": wide_resnet50_2,
  "resnet_tiny": resnet_tiny,
}


def build(
  arch: str,
  with_layer4: bool = False,
  conv_settings: conv_lib.ConvSettings = _DEFAULT_SETTINGS,
) -> TorchResNet:
  """The backbone named `arch` (a key of `ARCHS`), its convolutions
  computed as `conv_settings` say."""
  if arch not in ARCHS:
    raise ConfigError(
      f"Unknown backbone {arch!r}; choose one of {sorted(ARCHS)}."
    )
  return ARCHS[arch](with_layer4, conv_settings)
