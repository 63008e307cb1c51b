"""Our networks against reference outputs recorded with torch (no torch here).

The fixtures in tests/golden/ come from tests/golden/make_goldens.py (run
by hand with torch, torchvision and anomalib); see its docstring for what
each holds. Weights reach our networks through the same state-dict
conversions a user's files go through.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from jax_oneclass.components import anomaly_map, backbones, pretrained
from jax_oneclass.methods.gan import dcgan, ganomaly
from jax_oneclass.methods.gan import family as gan
from jax_oneclass.methods.reverse_distillation import network as rd
from tests.golden import seeded

GOLDEN = Path(__file__).parent / "golden"


def _load(name):
  with np.load(GOLDEN / f"{name}.npz") as golden:
    return {k: golden[k] for k in golden.files}


def test_fixtures_stay_small():
  sizes = {p.name: p.stat().st_size for p in GOLDEN.glob("*.npz")}
  assert len(sizes) >= 4, sizes
  assert sum(sizes.values()) < 3e6, sizes


@pytest.mark.parametrize("arch", ["resnet18", "wide_resnet50_2"])
def test_torchvision_backbone(arch):
  golden = _load(f"torchvision_{arch}")
  variables = pretrained.convert_state_dict(
    seeded.unpack_state("state", golden), arch
  )
  backbone = backbones.build(arch)
  x = golden["images"]
  got = jax.jit(backbone.apply)(variables, x.astype(np.float32))
  for name in ("layer1", "layer2", "layer3"):
    want = golden[name]
    # float32 rounding grows with depth; float64 below is the strict check.
    tol = 1e-3 * max(1.0, float(np.abs(want).max()))
    assert np.abs(np.asarray(got[name]) - want).max() < tol, name
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
    got = jax.jit(backbone.apply)(variables, x)
    for name in ("layer1", "layer2", "layer3"):
      np.testing.assert_allclose(
        got[name], golden[name], atol=1e-9, rtol=0, err_msg=name
      )


def _torch_layout(state, module, *args):
  """Variables of `module` from a torch state dict whose keys follow our
  module names (`<name>_<i>` is torch `<name>.<i>`); 2x2 kernels are
  transposed convolutions ([in, out, 2, 2] in torch). Also returns the
  keys left unused."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
  flat, used = {}, set()
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    key = pretrained._torch_key(path[1:])  # pylint: disable=protected-access
    value = np.asarray(state[key], np.float32)
    used.add(key)
    if path[-1] == "kernel":
      value = value.transpose(
        (2, 3, 0, 1) if value.shape[2:] == (2, 2) else (2, 3, 1, 0)
      )
    assert value.shape == leaf.shape, key
    flat[path] = value
  unused = {
    k for k in state if k not in used and not k.endswith("num_batches_tracked")
  }
  return traverse_util.unflatten_dict(flat), unused


def _rd_variables(golden, dtype=np.float32):
  """Teacher maps of the fixture's images, and our OCBE's and decoder's
  variables, from reverse_distillation.npz, in `dtype`."""
  teacher, ocbe, decoder = rd.build("resnet18")
  cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)
  teacher_vars = cast(
    pretrained.convert_state_dict(
      seeded.unpack_state("teacher", golden), "resnet18"
    )
  )
  images = jnp.asarray(golden["images"], dtype)
  maps = rd.teacher_maps(teacher.apply(teacher_vars, images))
  ocbe_vars, unused = _torch_layout(
    seeded.unpack_state("bottleneck", golden), ocbe, maps
  )
  # The official OCBE's conv4/bn4 are never used in its forward pass.
  assert {k.split(".")[0] for k in unused} == {"conv4", "bn4"}
  ocbe_vars = cast(ocbe_vars)
  code = ocbe.apply(ocbe_vars, maps)
  decoder_vars, unused = _torch_layout(
    seeded.unpack_state("decoder", golden), decoder, code
  )
  assert not unused
  return maps, ocbe_vars, cast(decoder_vars)


def test_reverse_distillation_against_anomalib():
  golden = _load("reverse_distillation")
  _, ocbe, decoder = rd.build("resnet18")
  maps, ocbe_vars, decoder_vars = _rd_variables(golden)
  code = ocbe.apply(ocbe_vars, maps)
  student = decoder.apply(decoder_vars, code)
  close = lambda got, want, tol: np.testing.assert_allclose(
    got, want, atol=tol * max(1.0, float(np.abs(want).max())), rtol=0
  )
  for i in range(3):
    close(maps[i], golden[f"teacher_{i}"], 1e-4)
    close(student[i], golden[f"student_{i}"], 1e-4)
  # anomalib's 'add' maps: align-corners upsampling, a torch-reflect blur.
  smoothed = anomaly_map.anomaly_map(
    rd.cosine_distance_maps(maps, student), (64, 64), sigma=4, mode="reflect"
  )
  close(smoothed, golden["anomaly_map"], 1e-5)
  close(anomaly_map.image_scores(smoothed), golden["pred_score"][:, 0], 1e-5)
  # Train mode: the student's BatchNorms use the batch's statistics.
  code, _ = ocbe.apply(ocbe_vars, maps, train=True, mutable=["batch_stats"])
  student, _ = decoder.apply(
    decoder_vars, code, train=True, mutable=["batch_stats"]
  )
  loss = rd.reverse_distillation_loss(maps, student, "flattened")
  assert float(loss) == pytest.approx(float(golden["train_loss"]), rel=1e-5)


def _torch_kernel(kernel):
  """Our [kh, kw, in, out] kernel in torch's layout: [in, out, 2, 2] for
  the 2x2 transposed convolutions, [out, in, kh, kw] otherwise."""
  kernel = np.asarray(kernel, np.float64)
  if kernel.shape[:2] == (2, 2):
    return kernel.transpose(2, 3, 0, 1)
  return kernel.transpose(3, 2, 0, 1)


def test_reverse_distillation_gradients_against_anomalib():
  """d loss / d (OCBE, decoder) through the method's own loss path, in
  float64 as recorded (float32 rounding, amplified by train-mode BatchNorm
  over a few pixels, moves some gradients by 1%; float64 agrees to 2e-12
  of each tensor's largest value): 1-D tensors whole; per kernel its norm,
  its sum and a corner block."""
  from tests.conftest import load_config  # pylint: disable=g-import-not-at-top
  import dataclasses  # pylint: disable=g-import-not-at-top
  from jax_oneclass import data  # pylint: disable=g-import-not-at-top
  from jax_oneclass.methods.reverse_distillation import method as rd_method  # pylint: disable=g-import-not-at-top

  golden = _load("reverse_distillation_gradients")
  config = load_config("reverse_distillation")
  info = dataclasses.replace(data.dataset_info(config), image_shape=(64, 64, 3))
  method = rd_method.Method(config, info)
  with jax.enable_x64(True):
    maps, ocbe_vars, decoder_vars = _rd_variables(
      _load("reverse_distillation"), np.float64
    )
    state = rd_method.RDState(
      step=jnp.zeros((), jnp.int32),
      teacher=None,
      params={"ocbe": ocbe_vars["params"], "decoder": decoder_vars["params"]},
      batch_stats={
        "ocbe": ocbe_vars["batch_stats"],
        "decoder": decoder_vars["batch_stats"],
      },
      opt_state=None,
    )
    (loss, _), grads = jax.jit(method.gradients)(state, maps)
  assert float(loss) == pytest.approx(float(golden["train_loss"]), rel=1e-12)
  tol = 1e-9
  seen = set()
  for ours, theirs in (("ocbe", "bottleneck"), ("decoder", "decoder")):
    for path, grad in traverse_util.flatten_dict(grads[ours]).items():
      key = f"grad/{theirs}/{pretrained._torch_key(path)}"  # pylint: disable=protected-access
      if grad.ndim == 1:
        parts = {"": (grad, golden[key])}
      else:
        grad = _torch_kernel(grad)
        corner = golden[key + ".corner"]
        parts = {
          ".norm": (np.linalg.norm(grad), golden[key + ".norm"]),
          ".sum": (grad.sum(), golden[key + ".sum"]),
          ".corner": (grad[: corner.shape[0], : corner.shape[1]], corner),
        }
      scale = np.abs(golden.get(key + ".norm", golden.get(key))).max()
      for suffix, (got, want) in parts.items():
        seen.add(key + suffix)
        np.testing.assert_allclose(
          got, want, atol=tol * scale, rtol=0, err_msg=key + suffix
        )
  assert seen == set(golden) - {"train_loss"}


# torch sub-network -> our sub-module, for GANomaly's two networks.
_GAN_PARTS = {
  "encoder1": "encoder",
  "decoder": "decoder",
  "encoder2": "reencoder",
  "features": "trunk",
  "classifier": "trunk",
}
_CONV_KINDS = ("ConvTranspose", "Conv", "UpConv", "final_conv")


def _conv_order(name):
  kind, _, index = name.rpartition("_")
  if name == "final_conv":
    return (3, 0)
  return (_CONV_KINDS.index(kind), int(index))


def _gan_key_map(torch_keys, params):
  """{torch key: (our path, kernel transform)}: within each sub-network the
  torch convolutions and BatchNorms, in their order, are our Conv_i /
  ConvTranspose_0 / UpConv_i / final_conv and BatchNorm_i."""
  mapping = {}
  for torch_part, ours in _GAN_PARTS.items():
    keys = [k for k in torch_keys if k.split(".")[0] == torch_part]
    if not keys:
      continue
    convs = sorted(
      (n for n in params[ours] if not n.startswith("BatchNorm")),
      key=_conv_order,
    )
    norms = sorted(
      (n for n in params[ours] if n.startswith("BatchNorm")),
      key=lambda n: int(n.split("_")[1]),
    )
    conv_keys = [
      k
      for k in keys
      if k.endswith(".weight")
      and k[: -len("weight")] + "running_mean" not in torch_keys
    ]
    norm_prefixes = [
      k[: -len("running_mean")] for k in keys if k.endswith("running_mean")
    ]
    if torch_part == "features":  # Discriminator: classifier holds the last.
      convs = convs[:-1]
    elif torch_part == "classifier":
      convs, norms = convs[-1:], []
    assert len(conv_keys) == len(convs) and len(norm_prefixes) == len(norms)
    for key, name in zip(conv_keys, convs):
      kind = name.rpartition("_")[0] or name
      transform = {
        "ConvTranspose": lambda w: w.transpose(2, 3, 0, 1)[::-1, ::-1],
        "UpConv": lambda w: w.transpose(2, 3, 0, 1),
      }.get(kind, lambda w: w.transpose(2, 3, 1, 0))
      mapping[key] = ((ours, name, "kernel"), transform)
    for prefix, name in zip(norm_prefixes, norms):
      for torch_leaf, leaf in (
        ("weight", "scale"),
        ("bias", "bias"),
        ("running_mean", "mean"),
        ("running_var", "var"),
      ):
        mapping[prefix + torch_leaf] = ((ours, name, leaf), lambda v: v)
  return mapping


def _gan_tree(tensors, mapping, leaves):
  """Our {path: array} tree from torch tensors, for the given leaf names."""
  flat = {
    path: np.ascontiguousarray(transform(np.asarray(tensors[key])))
    for key, (path, transform) in mapping.items()
    if path[-1] in leaves and key in tensors
  }
  return traverse_util.unflatten_dict(flat)


def _ganomaly_setup(golden):
  """The GANomaly method at ganomaly.npz's sizes, its initial state from
  the fixture's networks, and the torch key maps."""
  from tests.conftest import load_config  # pylint: disable=g-import-not-at-top
  import dataclasses  # pylint: disable=g-import-not-at-top
  from jax_oneclass import data  # pylint: disable=g-import-not-at-top

  config = load_config("ganomaly")
  config.model.width, config.model.latent_size = 4, 8
  config.model.extra_layers = 0
  info = dataclasses.replace(
    data.dataset_info(config), image_shape=golden["images"].shape[1:]
  )
  method = ganomaly.Method(config, info)
  state = jax.eval_shape(
    lambda key: method.init_state(key, info.image_shape), jax.random.key(0)
  )  # Shapes only: all is replaced.
  networks, maps = {}, {}
  for name in ("generator", "discriminator"):
    tensors = {
      k.split("/", 1)[1]: v
      for k, v in golden.items()
      if k.startswith(name + "/")
    }
    network = getattr(state, name)
    maps[name] = _gan_key_map(list(tensors), network.params)
    params = _gan_tree(tensors, maps[name], ("kernel", "scale", "bias"))
    stats = _gan_tree(tensors, maps[name], ("mean", "var"))
    assert jax.tree.map(np.shape, params) == jax.tree.map(
      np.shape, network.params
    )
    assert len(maps[name]) == len(
      [k for k in tensors if not k.endswith("num_batches_tracked")]
    )
    networks[name] = gan.Network(params, stats, method.tx.init(params))
  state = gan.GANState(step=jnp.zeros((), jnp.int32), **networks)
  return method, config, state, maps


def test_ganomaly_step_against_the_official_code():
  golden = _load("ganomaly")
  method, config, state, maps = _ganomaly_setup(golden)
  images = jnp.asarray(golden["images"])
  g, d = state.generator, state.discriminator
  train_pass = jax.jit(gan.apply_train, static_argnums=0)
  outputs, _ = train_pass(method.generator, g.params, g.batch_stats, images)
  close = lambda got, want, tol: np.testing.assert_allclose(
    got, want, atol=tol * max(1.0, float(np.abs(want).max())), rtol=0
  )
  for key in ("fake", "latent_in", "latent_out"):
    close(outputs[key], golden[key], 1e-5)
  for side, x in (("real", images), ("fake", outputs["fake"])):
    (logits, features), _ = train_pass(
      method.discriminator, d.params, d.batch_stats, x
    )
    close(features, golden[f"features_{side}"], 1e-5)
    close(jax.nn.sigmoid(logits), golden[f"prob_{side}"], 1e-5)
  g_out, d_out = jax.jit(method.gradients)(state, images)
  for term in ("adversarial", "contextual", "encoder"):
    assert float(g_out.metrics[f"generator_{term}"]) == pytest.approx(
      float(golden[term]), rel=1e-5, abs=1e-9
    ), term
  assert float(g_out.loss) == pytest.approx(
    float(golden["generator_loss"]), rel=1e-5
  )
  assert float(d_out.loss) == pytest.approx(
    float(golden["discriminator_loss"]), rel=1e-5
  )
  for name, out in (("generator", g_out), ("discriminator", d_out)):
    grads = {
      k.split("/", 2)[2]: v
      for k, v in golden.items()
      if k.startswith(f"grad/{name}/")
    }
    want = _gan_tree(grads, maps[name], ("kernel", "scale", "bias"))
    jax.tree.map(lambda a, b: close(a, b, 1e-4), out.grads, want)
  # One Adam update of each network, as `train_step` applies them.
  update = jax.jit(lambda *args: gan.apply_updates(method.tx, *args))
  new = state.replace(
    generator=update(g, g_out.grads, g_out.batch_stats),
    discriminator=update(d, d_out.grads, d_out.batch_stats),
  )
  lr = config.optimizer.learning_rate
  for name in ("generator", "discriminator"):
    deltas = {
      k.split("/", 2)[2]: v
      for k, v in golden.items()
      if k.startswith(f"step/{name}/")
    }
    want = _gan_tree(deltas, maps[name], ("kernel", "scale", "bias"))
    got = jax.tree.map(
      jnp.subtract, getattr(new, name).params, getattr(state, name).params
    )
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-3 * lr, rtol=0),
      got,
      want,
    )
  # The generator's BatchNorm statistics after its one train-mode pass.
  after = {
    k.split("/", 2)[2]: v
    for k, v in golden.items()
    if k.startswith("after/generator/")
  }
  want = traverse_util.flatten_dict(
    _gan_tree(after, maps["generator"], ("mean", "var"))
  )
  before = traverse_util.flatten_dict(state.generator.batch_stats)
  for path, got in traverse_util.flatten_dict(
    new.generator.batch_stats
  ).items():
    if path[-1] == "mean":
      close(got, want[path], 1e-5)
      continue
    # torch folds the unbiased batch variance into running_var, Flax the
    # biased one: the increments differ by n / (n - 1), n >= 64 here.
    ours = np.asarray(got) - 0.9 * before[path]
    torch_increment = want[path] - 0.9 * before[path]
    constant = (np.abs(ours) < 1e-7) & (np.abs(torch_increment) < 1e-7)
    ratio = torch_increment / np.where(constant, 1.0, ours)
    assert np.all(constant | ((ratio > 1 - 1e-3) & (ratio < 1 + 1.5 / 63))), (
      path,
      ratio,
    )


def test_ganomaly_adam_steps_against_the_official_code():
  """Three `train_step`s on three new batches: Adam's betas shape the
  second and third updates (one step is about lr * sign(g) whatever they
  are). The parameters' total change (up to 3.2 * lr) agrees to 5e-3 * lr
  (measured: 6e-4 * lr; a beta1 of 0.9 instead of 0.5 moves it by 1.9 * lr),
  the losses to 1e-5 (measured: 2e-7)."""
  golden = _load("ganomaly_adam")
  method, config, state, maps = _ganomaly_setup(_load("ganomaly"))
  step = jax.jit(method.train_step)
  new = state
  for i, pixels in enumerate(golden["pixels"]):
    images = pixels[:, None].astype(np.float32) / 255  # One view.
    new, metrics = step(new, {"image": images}, jax.random.key(0))
    for ours, theirs in (
      ("loss", "generator"),
      ("discriminator_loss", "discriminator"),
    ):
      want = float(golden[f"{theirs}_loss_{i}"])
      assert float(metrics[ours]) == pytest.approx(want, rel=1e-5), (i, ours)
  lr = config.optimizer.learning_rate
  for name in ("generator", "discriminator"):
    changes = {
      k.split("/", 2)[2]: v
      for k, v in golden.items()
      if k.startswith(f"change/{name}/")
    }
    want = _gan_tree(changes, maps[name], ("kernel", "scale", "bias"))
    got = jax.tree.map(
      jnp.subtract, getattr(new, name).params, getattr(state, name).params
    )
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=5e-3 * lr, rtol=0),
      got,
      want,
    )


def _keras_reference(width, stage_sizes, head_dims, num_class, padding):
  """The reference's TF2 ResNetV1 (deep_representation_one_class
  model/resnet_util.py) for 32x32 inputs: ZeroPadding2D(k // 2) + VALID
  convolutions, a 3x3 stride-1 stem without max-pooling, basic blocks
  (`block1`), global average pooling and `get_head`. One liberty: the
  reference fixes the stem at 64 filters; it takes `width` here (the same
  at width 64) so that a narrow network tests the same layout.
  `padding='same'` swaps the 3x3 convolutions for Keras 'same' ones: the
  variant that differs only in where stride 2 pads (0 before, 1 after)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  layers = tf.keras.layers

  def conv(x, filters, kernel, strides, name):
    if padding == "same" and kernel == 3:
      return layers.Conv2D(
        filters, kernel, strides, "same", use_bias=False, name=name
      )(x)
    if kernel // 2:
      x = layers.ZeroPadding2D(kernel // 2, name=name + "_pad")(x)
    return layers.Conv2D(filters, kernel, strides, use_bias=False, name=name)(x)

  def bn(x, name):
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)(x)

  inputs = layers.Input((32, 32, 3))
  x = layers.Activation("relu")(
    bn(conv(inputs, width, 3, 1, "conv1_conv"), "conv1_bn")
  )
  for stage, blocks in enumerate(stage_sizes):
    filters = width * 2**stage
    for block in range(blocks):
      name = f"conv{stage + 2}_block{block + 1}"
      stride = 2 if stage > 0 and block == 0 else 1
      shortcut = x
      if stride != 1 or filters != x.shape[3]:
        shortcut = bn(
          conv(x, filters, 1, stride, name + "_0_conv"), name + "_0_bn"
        )
      y = layers.Activation("relu")(
        bn(conv(x, filters, 3, stride, name + "_1_conv"), name + "_1_bn")
      )
      y = bn(conv(y, filters, 3, 1, name + "_2_conv"), name + "_2_bn")
      x = layers.Activation("relu")(layers.Add()([shortcut, y]))
  pools = layers.GlobalAveragePooling2D()(x)
  proj = pools
  for i, dim in enumerate(head_dims[:-1]):
    proj = layers.Dense(dim, use_bias=False, name=f"proj_{i}")(proj)
    proj = layers.Activation("relu")(bn(proj, f"proj_{i}_bn"))
  embeds = layers.Dense(head_dims[-1], use_bias=num_class > 0, name="embeds")(
    proj
  )
  logits = layers.Dense(num_class, name="logits")(embeds)
  model = tf.keras.Model(
    inputs, {"pools": pools, "embeds": embeds, "logits": logits}
  )
  rng = np.random.default_rng(5)
  for layer in model.layers:  # Non-trivial BatchNorm values.
    if isinstance(layer, layers.BatchNormalization):
      n = layer.gamma.shape[0]
      layer.set_weights(
        [
          rng.uniform(0.5, 1.5, n),
          rng.uniform(-0.2, 0.2, n),
          rng.uniform(-0.2, 0.2, n),
          rng.uniform(0.5, 1.5, n),
        ]
      )
  return model


def _two_stage_variables(model, stage_sizes, head_dims):
  """Our SelfSupervisedNet variables from the Keras layers, by name."""
  get = lambda name: [np.asarray(w) for w in model.get_layer(name).weights]
  params, stats = {}, {}

  def conv(path, name):
    params[path] = {"kernel": get(name)[0]}

  def bn(path, name):
    gamma, beta, mean, var = get(name)
    params[path] = {"scale": gamma, "bias": beta}
    stats[path] = {"mean": mean, "var": var}

  conv(("backbone", "stem_conv"), "conv1_conv")
  bn(("backbone", "stem_bn"), "conv1_bn")
  for stage, blocks in enumerate(stage_sizes):
    for block in range(blocks):
      ours = ("backbone", f"stage{stage + 1}_block{block + 1}")
      name = f"conv{stage + 2}_block{block + 1}"
      for a, b in (("conv1", "_1_conv"), ("conv2", "_2_conv")):
        conv(ours + (a,), name + b)
      for a, b in (("bn1", "_1_bn"), ("bn2", "_2_bn")):
        bn(ours + (a,), name + b)
      if name + "_0_conv" in [layer.name for layer in model.layers]:
        conv(ours + ("shortcut_conv",), name + "_0_conv")
        bn(ours + ("shortcut_bn",), name + "_0_bn")
  for i in range(len(head_dims) - 1):
    conv(("head", f"dense{i + 1}"), f"proj_{i}")
    bn(("head", f"bn{i + 1}"), f"proj_{i}_bn")
  kernel, bias = get("embeds")
  params[("head", f"dense{len(head_dims)}")] = {"kernel": kernel, "bias": bias}
  kernel, bias = get("logits")
  params[("rotation_classifier",)] = {"kernel": kernel, "bias": bias}
  unflatten = lambda tree: traverse_util.unflatten_dict(
    {
      path + (leaf,): v
      for path, leaves in tree.items()
      for leaf, v in leaves.items()
    }
  )
  return {"params": unflatten(params), "batch_stats": unflatten(stats)}


_TWO_STAGE = dict(
  width=8, stage_sizes=(2, 1, 1, 1), head_dims=(32, 16), num_class=4
)


@pytest.fixture(scope="module")
def two_stage_outputs():
  """Ours and both Keras variants' eval-mode outputs on the same images."""
  from jax_oneclass.methods.two_stage import network  # pylint: disable=g-import-not-at-top

  cfg = _TWO_STAGE
  net = network.SelfSupervisedNet(
    cfg["stage_sizes"], cfg["width"], cfg["head_dims"], cfg["num_class"]
  )
  images = (
    np.random.default_rng(6).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  )
  reference = _keras_reference(padding="zero_padding", **cfg)
  same = _keras_reference(padding="same", **cfg)
  same.set_weights(reference.get_weights())
  variables = _two_stage_variables(
    reference, cfg["stage_sizes"], cfg["head_dims"]
  )
  shapes = jax.eval_shape(net.init, jax.random.key(0), images)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(
    lambda x: x.shape, shapes
  )
  ours = net.apply(variables, images)
  ours = {
    "pools": ours["pool"],
    "embeds": ours["embed"],
    "logits": ours["rotation_logits"],
  }
  keras_in = 2 * images - 1  # Our network maps [0, 1] to [-1, 1] itself.
  run = lambda m: {
    k: np.asarray(v) for k, v in m(keras_in, training=False).items()
  }
  return ours, run(reference), run(same)


def _agree(a, b):
  return all(np.allclose(a[k], b[k], atol=1e-4, rtol=1e-4) for k in a)


def test_two_stage_resnet_matches_the_keras_reference(two_stage_outputs):
  ours, reference, _ = two_stage_outputs
  for key, want in reference.items():
    np.testing.assert_allclose(
      ours[key], want, atol=1e-4, rtol=1e-4, err_msg=key
    )


def test_a_same_padded_keras_variant_differs(two_stage_outputs):
  """The comparison above can see the stride-2 padding (SAME pads (0, 1))."""
  ours, reference, same = two_stage_outputs
  assert not _agree(reference, same)
  assert not _agree(ours, same)
