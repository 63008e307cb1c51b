"""Reverse Distillation networks (Deng & Li, CVPR 2022; RD4AD).

A frozen ImageNet teacher (`backbones.TorchResNet`) gives three maps
[layer1, layer2, layer3]. The trainable `OCBE` fuses them (MFF) and
compresses the result with a ResNet stage (OCE) into a one-class code; the
trainable `StudentDecoder` mirrors the teacher with stride-2 2x2 transposed
convolutions and reconstructs the three maps from that code. Layer rules
follow the official code (`BN_layer`, `de_resnet.py`).

Initialisation mirrors PyTorch's (parity of init only; unimportant for
accuracy):
  convolutions          Kaiming normal, fan_out, ReLU gain (RD's init loop);
  2x2 transposed convs  torch's default, U(-b, b) with b = 1/sqrt(4 * C_out)
                        (RD's init loop skips them; torch takes fan_in from
                        weight dim 1, which is C_out for a transposed conv);
  BatchNorm             scale 1, bias 0; eps 1e-5, Flax momentum 0.9 (torch
                        0.1).

Module names mirror the official state-dict keys with `<name>.<index>`
joined by an underscore (`bn_layer.0.conv1` -> `bn_layer_0/conv1`,
`layer1.0.upsample.0` -> `layer1_0/upsample_0`). The official OCBE's unused
`conv4`/`bn4` are not created; drop them when converting a checkpoint.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_oneclass.components import backbones, layers, transposed_conv
from jax_oneclass.components import conv as conv_lib
from jax_oneclass.errors import ConfigError

# Flax's fan_out of a [2, 2, C_in, C_out] kernel is 4 * C_out, so this is
# U(-1/sqrt(4 C_out), 1/sqrt(4 C_out)): torch's kaiming_uniform_(a=sqrt(5)).
_CONV_TRANSPOSE_INIT = nn.initializers.variance_scaling(
  1.0 / 3.0, "fan_out", "uniform"
)
_COSINE_EPS = 1e-8  # torch.nn.CosineSimilarity's default.
LOSS_MODES = ("flattened", "per_pixel")


class ConvTranspose2x2(nn.Module):
  """PyTorch's ConvTranspose2d(k=2, s=2, p=0, bias=False).

  `kernel[h, w, i, o]` holds torch's `weight[i, o, h, w]` (no flip). With
  kernel 2 and stride 2 the output patches do not overlap: output pixel
  (2i + p, 2j + q) is x[i, j] @ kernel[p, q]. So the sub-pixel form (the
  default `conv_settings.transposed_conv`, and 'auto' on the CPU) is one
  product to 4 * C_out channels and a depth-to-space; the other methods go
  through `ConvSettings.conv_transpose`.
  """

  features: int
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings()

  @nn.compact
  def __call__(self, x):
    c_in = x.shape[-1]
    kernel = self.param(
      "kernel", _CONV_TRANSPOSE_INIT, (2, 2, c_in, self.features)
    )
    settings = self.conv_settings
    method = transposed_conv.resolve(
      settings.transposed_conv, jax.default_backend()
    )
    if method != "subpixel":
      # torch's p=0 is lax's k - 1 = 1; the flip as in dcgan.UpConv.
      return settings.conv_transpose(
        x, kernel[::-1, ::-1], (2, 2), ((1, 1), (1, 1))
      )
    kernel = kernel.transpose(2, 0, 1, 3).reshape(c_in, 4 * self.features)
    return layers.depth_to_space(settings.matmul(x, kernel))


def _upsample(x, features: int, train: bool, settings: conv_lib.ConvSettings):
  """The decoder's shortcut: ConvTranspose2x2 + BN (torch `upsample`)."""
  x = ConvTranspose2x2(features, settings, name="upsample_0")(x)
  return layers.batch_norm(train, "upsample_1")(x)


class DecoderBasicBlock(nn.Module):
  """`de_resnet` BasicBlock: conv1 is a 2x2 transposed conv when upsampling.

  Outputs `planes` channels, at twice the input side when `upsample`
  (then the shortcut is ConvTranspose2x2 + BN; otherwise it is identity).
  """

  planes: int
  upsample: bool = False
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings()

  @nn.compact
  def __call__(self, x, train: bool = False):
    settings = self.conv_settings
    if self.upsample:
      y = ConvTranspose2x2(self.planes, settings, name="conv1")(x)
    else:
      y = layers.conv(self.planes, 3, name="conv1", settings=settings)(x)
    y = nn.relu(layers.batch_norm(train, "bn1")(y))
    y = layers.conv(self.planes, 3, name="conv2", settings=settings)(y)
    y = layers.batch_norm(train, "bn2")(y)
    if self.upsample:
      x = _upsample(x, self.planes, train, settings)
    return nn.relu(y + x)


class DecoderBottleneck(nn.Module):
  """`de_resnet` Bottleneck: 1x1 -> 3x3 (or 2x2 transposed) -> 1x1.

  Outputs `4 * planes` channels, at twice the input side when `upsample`
  (shortcut as in `DecoderBasicBlock`); the inner width is
  `planes * width_per_group // 64`.
  """

  planes: int
  upsample: bool = False
  width_per_group: int = 64
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings()

  @nn.compact
  def __call__(self, x, train: bool = False):
    settings = self.conv_settings
    width = self.planes * self.width_per_group // 64
    y = layers.conv(width, 1, name="conv1", settings=settings)(x)
    y = nn.relu(layers.batch_norm(train, "bn1")(y))
    if self.upsample:
      y = ConvTranspose2x2(width, settings, name="conv2")(y)
    else:
      y = layers.conv(width, 3, name="conv2", settings=settings)(y)
    y = nn.relu(layers.batch_norm(train, "bn2")(y))
    y = layers.conv(4 * self.planes, 1, name="conv3", settings=settings)(y)
    y = layers.batch_norm(train, "bn3")(y)
    if self.upsample:
      x = _upsample(x, 4 * self.planes, train, settings)
    return nn.relu(y + x)


def _check_block(block: str, width_per_group: int) -> None:
  if block not in ("basic", "bottleneck"):
    raise ConfigError(f"block must be 'basic' or 'bottleneck', got {block!r}.")
  if block == "basic" and width_per_group != 64:
    raise ConfigError("Basic blocks need width_per_group=64.")


class OCBE(nn.Module):
  """One-class bottleneck embedding: multi-scale fusion + a ResNet stage.

  `__call__(features, train=False)` takes the teacher's three maps
  [layer1, layer2, layer3] (NHWC, each half the side of the one before)
  and returns the code at half layer3's side: 2048@8x8 for WRN-50-2 at 256,
  512@H/32 for ResNet-18.

  MFF: layer1 goes through two 3x3 stride-2 conv + BN + ReLU layers (to
  layer2's, then layer3's width), layer2 through one (to layer3's width);
  the two are concatenated with layer3 as is. The paper's 1x1 fusion conv
  is absent, as in the official code. OCE: `num_blocks` residual blocks
  with 8 * base_width planes (512), stride 2 on the first.

  Attributes:
    block: "basic" (ResNet-18 teacher) or "bottleneck".
    num_blocks: blocks in the OCE stage (official: 2 basic, 3 bottleneck).
    width_per_group: bottleneck inner width per 64 planes; the official
      WRN-50-2 model uses 128 (inner width 1024), anomalib and ResNet-50 64.
    conv_settings: how the convolutions compute.
  """

  block: str = "bottleneck"
  num_blocks: int = 3
  width_per_group: int = 64
  base_width: int = 64  # The teacher's layer1 planes; OCE has 8x as many.
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings()

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], train: bool = False):
    _check_block(self.block, self.width_per_group)
    x1, x2, x3 = features
    c2, c3 = x2.shape[-1], x3.shape[-1]

    def halve(x, features: int, index: int):
      """3x3 stride-2 conv, BN, ReLU: the official conv{index}/bn{index}."""
      y = layers.conv(features, 3, 2, f"conv{index}", self.conv_settings)(x)
      return nn.relu(layers.batch_norm(train, f"bn{index}")(y))

    f1 = halve(halve(x1, c2, 1), c3, 2)
    f2 = halve(x2, c3, 3)
    x = jnp.concatenate([f1, f2, x3], axis=-1)
    for i in range(self.num_blocks):
      stride = 2 if i == 0 else 1
      if self.block == "basic":
        layer = backbones.BasicBlock(
          8 * self.base_width, stride, self.conv_settings, name=f"bn_layer_{i}"
        )
      else:
        layer = backbones.Bottleneck(
          8 * self.base_width,
          stride,
          self.width_per_group,
          self.conv_settings,
          name=f"bn_layer_{i}",
        )
      x = layer(x, train)
    return x


class StudentDecoder(nn.Module):
  """`de_resnet`: the teacher's layers 3, 2, 1 mirrored, upsampling by 2.

  `__call__(code, train=False)` returns three maps with the teacher's
  shapes, in the teacher's order [layer1-like, layer2-like, layer3-like].
  The decoder's own stages run the other way: its `layer1` (planes 256)
  outputs the layer3-like map and its `layer3` (planes 64) the layer1-like
  one, so the list is [layer3, layer2, layer1] by the decoder's names, as
  the official code returns it. Every stage starts with an upsampling
  block (2x2 transposed conv, stride 2, in the main path and shortcut).

  Attributes:
    block: "basic" or "bottleneck".
    stage_sizes: blocks in the decoder's layer1, layer2, layer3
      (official: (3, 4, 6) for the ResNet-50s, (2, 2, 2) for ResNet-18).
    width_per_group: bottleneck inner width per 64 planes (128 for WRN).
    conv_settings: how the convolutions compute.
  """

  block: str = "bottleneck"
  stage_sizes: Sequence[int] = (3, 4, 6)
  width_per_group: int = 64
  base_width: int = 64  # The teacher's layer1 planes.
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings()

  @nn.compact
  def __call__(self, x, train: bool = False):
    _check_block(self.block, self.width_per_group)
    outputs = []
    for stage, scale in enumerate((4, 2, 1)):
      planes = scale * self.base_width
      for i in range(self.stage_sizes[stage]):
        name = f"layer{stage + 1}_{i}"
        if self.block == "basic":
          layer = DecoderBasicBlock(
            planes, i == 0, self.conv_settings, name=name
          )
        else:
          layer = DecoderBottleneck(
            planes, i == 0, self.width_per_group, self.conv_settings, name=name
          )
        x = layer(x, train)
      outputs.append(x)
    return outputs[::-1]


# arch: (block, OCE blocks, decoder stage sizes, width_per_group).
_ARCHS = {
  "resnet18": ("basic", 2, (2, 2, 2), 64),
  "resnet50": ("bottleneck", 3, (3, 4, 6), 64),
  "wide_resnet50_2": ("bottleneck", 3, (3, 4, 6), 128),
  "resnet_tiny": ("basic", 1, (1, 1, 1), 64),
}


def build(
  arch: str,
  ocbe_width_per_group: int | None = None,
  conv_settings: conv_lib.ConvSettings = conv_lib.ConvSettings(),
) -> tuple[backbones.TorchResNet, OCBE, StudentDecoder]:
  """(teacher, OCBE, decoder) as the official code pairs them for `arch`,
  their convolutions computed as `conv_settings` say.

  `ocbe_width_per_group` overrides the OCBE's bottleneck width: the
  official WRN-50-2 model uses the arch's 128; anomalib uses 64.
  """
  if arch not in _ARCHS:
    raise ConfigError(
      f"Unknown reverse distillation backbone {arch!r}; choose one of "
      f"{sorted(_ARCHS)}."
    )
  block, oce_blocks, stage_sizes, width_per_group = _ARCHS[arch]
  if ocbe_width_per_group is None:
    ocbe_width_per_group = width_per_group
  teacher = backbones.build(arch, conv_settings=conv_settings)
  return (
    teacher,
    OCBE(
      block, oce_blocks, ocbe_width_per_group, teacher.base_width, conv_settings
    ),
    StudentDecoder(
      block, stage_sizes, width_per_group, teacher.base_width, conv_settings
    ),
  )


def teacher_maps(features: dict[str, jax.Array]) -> list[jax.Array]:
  """The teacher's {'layer1', 'layer2', 'layer3'} dict as an ordered list."""
  return [features[f"layer{i}"] for i in (1, 2, 3)]


def _cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine over the last axis, each norm clamped below at 1e-8 (torch)."""
  eps2 = _COSINE_EPS**2  # Clamp squared norms: finite gradients at zero.
  norm_a = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=-1), eps2))
  norm_b = jnp.sqrt(jnp.maximum(jnp.sum(b * b, axis=-1), eps2))
  return jnp.sum(a * b, axis=-1) / (norm_a * norm_b)


def cosine_distance_maps(
  teacher_maps: Sequence[jax.Array], student_maps: Sequence[jax.Array]
) -> list[jax.Array]:
  """Per scale, 1 - cosine similarity over channels: [B, H, W], in [0, 2].

  These are RD4AD's anomaly maps before upsampling and smoothing.
  """
  return [
    1.0 - _cosine_similarity(t, s)
    for t, s in zip(teacher_maps, student_maps, strict=True)
  ]


def reverse_distillation_loss(
  teacher_maps: Sequence[jax.Array],
  student_maps: Sequence[jax.Array],
  mode: str = "flattened",
) -> jax.Array:
  """Cosine distillation loss, summed over scales.

  'flattened' (official code, trains markedly better): per scale, the batch
  mean of 1 - cos between each example's whole maps flattened to vectors.
  'per_pixel' (paper, Eq. 1-2): per scale, the mean over the batch and
  pixels of the channel-wise cosine distance. They agree on 1x1 maps.
  Gradients flow into both inputs; stop them on the teacher's side.
  """
  if mode == "flattened":
    return sum(
      jnp.mean(
        1.0
        - _cosine_similarity(
          t.reshape(t.shape[0], -1), s.reshape(s.shape[0], -1)
        )
      )
      for t, s in zip(teacher_maps, student_maps, strict=True)
    )
  if mode == "per_pixel":
    return sum(
      jnp.mean(m) for m in cosine_distance_maps(teacher_maps, student_maps)
    )
  raise ConfigError(f"mode must be one of {LOSS_MODES}, got {mode!r}.")
