"""torchvision-layout ResNets: shapes, sizes, weight conversion, parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_oneclass.components import pretrained, weights_io
from jax_oneclass.errors import CheckpointError, ConfigError
from jax_oneclass.components import backbones

ARCHS = ("resnet18", "resnet50", "wide_resnet50_2")
_IMAGES = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)


def _init_shapes(arch, with_layer4=False):
  model = backbones.build(arch, with_layer4)
  return jax.eval_shape(
    lambda x: model.init_with_output(jax.random.key(0), x), _IMAGES
  )


def _size(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("arch", ARCHS)
def test_feature_shapes(arch):
  widths = (64, 128, 256, 512) if arch == "resnet18" else (256, 512, 1024, 2048)
  features, _ = _init_shapes(arch)
  assert {k: v.shape for k, v in features.items()} == {
    "layer1": (2, 16, 16, widths[0]),
    "layer2": (2, 8, 8, widths[1]),
    "layer3": (2, 4, 4, widths[2]),
  }
  features, _ = _init_shapes(arch, with_layer4=True)
  assert features["layer4"].shape == (2, 2, 2, widths[3])
  assert features["pool"].shape == (2, widths[3])


# torchvision's documented totals minus the classifier (512 or 2048 inputs,
# 1000 classes), and stem through layer3 (torchvision's WRN;
# counted from torchvision's modules for the other two).
@pytest.mark.parametrize(
  "arch, through_layer3, without_fc",
  [
    ("resnet18", 2_782_784, 11_689_512 - 513_000),
    ("resnet50", 8_543_296, 25_557_032 - 2_049_000),
    ("wide_resnet50_2", 24_862_528, 68_883_240 - 2_049_000),
  ],
)
def test_parameter_counts(arch, through_layer3, without_fc):
  assert _size(_init_shapes(arch)[1]["params"]) == through_layer3
  assert _size(_init_shapes(arch, True)[1]["params"]) == without_fc


def test_unknown_arch_is_a_config_error():
  with pytest.raises(ConfigError, match="resnet18"):
    backbones.build("resnet101")
  with pytest.raises(ConfigError, match="resnet101"):
    pretrained.convert_state_dict({}, "resnet101")


def _torchvision_bottleneck_shapes(width_per_group, stage_sizes=(3, 4, 6, 3)):
  """{key: shape} of torchvision's bottleneck ResNet state dict (spec C2)."""
  shapes = {"conv1.weight": (64, 3, 7, 7)}

  def add_bn(prefix, channels):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{prefix}.{leaf}"] = (channels,)
    shapes[f"{prefix}.num_batches_tracked"] = ()

  add_bn("bn1", 64)
  in_channels = 64
  for stage, num_blocks in enumerate(stage_sizes):
    planes = 64 * 2**stage
    width, out = planes * width_per_group // 64, 4 * planes
    for i in range(num_blocks):
      prefix = f"layer{stage + 1}.{i}"
      shapes[f"{prefix}.conv1.weight"] = (width, in_channels, 1, 1)
      shapes[f"{prefix}.conv2.weight"] = (width, width, 3, 3)
      shapes[f"{prefix}.conv3.weight"] = (out, width, 1, 1)
      for j, channels in ((1, width), (2, width), (3, out)):
        add_bn(f"{prefix}.bn{j}", channels)
      if i == 0:
        shapes[f"{prefix}.downsample.0.weight"] = (out, in_channels, 1, 1)
        add_bn(f"{prefix}.downsample.1", out)
      in_channels = out
  shapes["fc.weight"], shapes["fc.bias"] = (1000, 2048), (1000,)
  return shapes


def _num_torch_params(shapes):
  return sum(
    int(np.prod(s))
    for k, s in shapes.items()
    if not k.endswith(("running_mean", "running_var", "tracked"))
  )


def test_torchvision_key_table_matches_published_counts():
  assert _num_torch_params(_torchvision_bottleneck_shapes(64)) == 25_557_032
  assert _num_torch_params(_torchvision_bottleneck_shapes(128)) == 68_883_240


@pytest.fixture(scope="module")
def resnet50_state():
  """A random resnet50 state dict under torchvision's keys and layout."""
  rng = np.random.default_rng(0)
  state = {}
  for key, shape in _torchvision_bottleneck_shapes(64).items():
    if key.endswith("tracked"):
      state[key] = np.array(7, np.int64)
    elif key.endswith("running_var"):
      state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif len(shape) == 4:  # He-scaled, so activations stay O(1).
      fan_in = np.prod(shape[1:])
      state[key] = rng.standard_normal(shape, np.float32) * np.float32(
        np.sqrt(2 / fan_in)
      )
    else:
      state[key] = rng.uniform(-0.5, 0.5, shape).astype(np.float32)
  return state


def _np_conv(x, w, stride, pad):
  """PyTorch's Conv2d (no bias) in NumPy: x [N, C, H, W], w [O, I, kH, kW]."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  kh, kw = w.shape[2:]
  h = (x.shape[2] - kh) // stride + 1
  v = (x.shape[3] - kw) // stride + 1
  out = 0.0
  for a in range(kh):
    for b in range(kw):
      patch = x[:, :, a : a + stride * h : stride, b : b + stride * v : stride]
      out = out + np.einsum("nihw,oi->nohw", patch, w[:, :, a, b])
  return out


def _np_bn(x, state, prefix):
  """BatchNorm2d in eval mode from the torch tensors."""
  get = lambda leaf: state[f"{prefix}.{leaf}"][:, None, None]
  return (x - get("running_mean")) / np.sqrt(get("running_var") + 1e-5) * get(
    "weight"
  ) + get("bias")


def _np_bottleneck(x, state, prefix, stride):
  relu = lambda y: np.maximum(y, 0.0)
  w = lambda name: state[f"{prefix}.{name}.weight"].astype(np.float64)
  y = relu(_np_bn(_np_conv(x, w("conv1"), 1, 0), state, f"{prefix}.bn1"))
  y = relu(_np_bn(_np_conv(y, w("conv2"), stride, 1), state, f"{prefix}.bn2"))
  y = _np_bn(_np_conv(y, w("conv3"), 1, 0), state, f"{prefix}.bn3")
  shortcut = _np_bn(
    _np_conv(x, w("downsample.0"), stride, 0), state, f"{prefix}.downsample.1"
  )
  return relu(y + shortcut)


def test_converted_bottleneck_matches_numpy_reference(resnet50_state):
  variables = pretrained.convert_state_dict(resnet50_state, "resnet50")
  _, init = _init_shapes("resnet50")
  assert jax.tree.map(lambda x: x.shape, variables) == jax.tree.map(
    lambda x: x.shape, init
  )
  x = np.random.default_rng(1).standard_normal((2, 256, 8, 8))
  want = _np_bottleneck(x, resnet50_state, "layer2.0", stride=2)
  block = {k: v["layer2_0"] for k, v in variables.items()}
  got = backbones.Bottleneck(128, stride=2).apply(
    block, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32)
  )
  assert got.shape == (2, 4, 4, 512)
  np.testing.assert_allclose(
    np.asarray(got).transpose(0, 3, 1, 2), want, atol=1e-4, rtol=0
  )


def test_converter_names_the_offending_key(resnet50_state):
  state = dict(resnet50_state)
  del state["layer2.1.bn2.running_var"]
  with pytest.raises(CheckpointError, match=r"layer2\.1\.bn2\.running_var"):
    pretrained.convert_state_dict(state, "resnet50")
  state = dict(resnet50_state, **{"layer3.0.extra.weight": np.zeros(3)})
  with pytest.raises(CheckpointError, match=r"layer3\.0\.extra\.weight"):
    pretrained.convert_state_dict(state, "resnet50")
  # resnet50's inner widths are half of WRN-50-2's.
  with pytest.raises(CheckpointError, match=r"layer1\.0\.conv1\.weight"):
    pretrained.convert_state_dict(resnet50_state, "wide_resnet50_2")
  # layer4 is read only when the backbone builds it.
  pretrained.convert_state_dict(resnet50_state, "resnet50", with_layer4=True)
  state = {k: v for k, v in resnet50_state.items() if "layer4" not in k}
  with pytest.raises(CheckpointError, match=r"50 missing key.*layer4\.0\."):
    pretrained.convert_state_dict(state, "resnet50", with_layer4=True)


def test_read_npz_and_reject_other_files(tmp_path, resnet50_state):
  state = {k: v for k, v in resnet50_state.items() if k.startswith("layer1.")}
  np.savez(tmp_path / "w.npz", **state)
  loaded = weights_io.read_state_dict(str(tmp_path / "w.npz"))
  assert loaded.keys() == state.keys()
  assert all(np.array_equal(loaded[k], v) for k, v in state.items())
  with pytest.raises(CheckpointError, match="No weights file"):
    weights_io.read_state_dict(str(tmp_path / "missing.pth"))
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
  with pytest.raises(CheckpointError, match="np.savez"):
    weights_io.read_state_dict(str(tmp_path / "junk.pth"))


def test_read_safetensors(tmp_path, resnet50_state):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  state = {k: v for k, v in resnet50_state.items() if k.startswith("layer1.")}
  safetensors_numpy.save_file(state, str(tmp_path / "w.safetensors"))
  loaded = weights_io.read_state_dict(str(tmp_path / "w.safetensors"))
  assert loaded.keys() == state.keys()
  assert all(np.array_equal(loaded[k], v) for k, v in state.items())


def _random_torchvision(arch):
  """A random torchvision model in eval mode with unit-scale activations."""
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  model = getattr(torchvision.models, arch)(weights=None)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.2, 0.2)
        module.momentum = None  # Running stats := one batch's statistics.
        module.reset_running_stats()
    model.train()(torch.randn(8, 3, 64, 64))
  return model.eval()


def _torch_features(model, x):
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    h = torch.from_numpy(x.transpose(0, 3, 1, 2)).to(model.conv1.weight.dtype)
    h = model.maxpool(model.relu(model.bn1(model.conv1(h))))
    features = {}
    for name in ("layer1", "layer2", "layer3"):
      h = getattr(model, name)(h)
      features[name] = h.permute(0, 2, 3, 1).numpy()
  return features


@pytest.mark.parametrize("arch", ["resnet18", "wide_resnet50_2"])
def test_parity_with_torchvision(arch):
  model = _random_torchvision(arch)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  variables = pretrained.convert_state_dict(state, arch)
  x = np.random.default_rng(0).standard_normal((1, 64, 64, 3))
  backbone = backbones.build(arch)
  got = jax.jit(backbone.apply)(variables, x.astype(np.float32))
  want = _torch_features(model, x)
  for name, value in want.items():
    # float32 rounding grows with depth: torch's own float32 layer3 of
    # WRN-50-2 is ~3e-4 from its float64 one, so the bound is relative.
    tol = 1e-4 * max(1.0, float(np.abs(value).max()))
    assert np.abs(np.asarray(got[name]) - value).max() < tol, name
  # In float64 the two must agree to rounding: any layout slip shows here.
  want = _torch_features(model.double(), x)
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
    got = backbone.apply(variables, x)
    for name, value in want.items():
      np.testing.assert_allclose(got[name], value, atol=1e-9, rtol=0)


@pytest.mark.parametrize("legacy", [False, True])
def test_reads_torch_save_files_without_torch(tmp_path, legacy):
  torch = pytest.importorskip("torch")
  pytest.importorskip("torchvision")
  model = _random_torchvision("resnet18")
  state = model.state_dict()
  state["layer1.0.bn1.running_var"] = state["layer1.0.bn1.running_var"].half()
  state["fc.weight"] = state["fc.weight"].t()  # Not contiguous.
  path = str(tmp_path / "resnet18.pth")
  torch.save(state, path, _use_new_zipfile_serialization=not legacy)
  loaded = weights_io.read_state_dict(path)
  assert list(loaded) == list(state)
  for key, value in state.items():
    assert loaded[key].dtype == value.numpy().dtype, key
    np.testing.assert_array_equal(loaded[key], value.numpy(), err_msg=key)
  variables = pretrained.load_torchvision(path, "resnet18", with_layer4=True)
  np.testing.assert_array_equal(
    variables["params"]["layer4_1"]["conv2"]["kernel"],
    state["layer4.1.conv2.weight"].numpy().transpose(2, 3, 1, 0),
  )
