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
      seeded.unpack_state("state", golden), arch)
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
    got = backbone.apply(variables, x)
    for name in ("layer1", "layer2", "layer3"):
      np.testing.assert_allclose(got[name], golden[name], atol=1e-9, rtol=0,
                                 err_msg=name)


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
      value = value.transpose((2, 3, 0, 1) if value.shape[2:] == (2, 2)
                              else (2, 3, 1, 0))
    assert value.shape == leaf.shape, key
    flat[path] = value
  unused = {k for k in state if k not in used
            and not k.endswith("num_batches_tracked")}
  return traverse_util.unflatten_dict(flat), unused


def test_reverse_distillation_against_anomalib():
  golden = _load("reverse_distillation")
  teacher, ocbe, decoder = rd.build("resnet18")
  teacher_vars = pretrained.convert_state_dict(
      seeded.unpack_state("teacher", golden), "resnet18")
  images = jnp.asarray(golden["images"])
  maps = rd.teacher_maps(teacher.apply(teacher_vars, images))
  ocbe_vars, unused = _torch_layout(seeded.unpack_state("bottleneck", golden),
                                    ocbe, maps)
  # The official OCBE's conv4/bn4 are never used in its forward pass.
  assert {k.split(".")[0] for k in unused} == {"conv4", "bn4"}
  code = ocbe.apply(ocbe_vars, maps)
  decoder_vars, unused = _torch_layout(seeded.unpack_state("decoder", golden),
                                       decoder, code)
  assert not unused
  student = decoder.apply(decoder_vars, code)
  close = lambda got, want, tol: np.testing.assert_allclose(
      got, want, atol=tol * max(1.0, float(np.abs(want).max())), rtol=0)
  for i in range(3):
    close(maps[i], golden[f"teacher_{i}"], 1e-4)
    close(student[i], golden[f"student_{i}"], 1e-4)
  # anomalib's 'add' maps: align-corners upsampling, a torch-reflect blur.
  smoothed = anomaly_map.anomaly_map(rd.cosine_distance_maps(maps, student),
                                     (64, 64), sigma=4, mode="reflect")
  close(smoothed, golden["anomaly_map"], 1e-5)
  close(anomaly_map.image_scores(smoothed), golden["pred_score"][:, 0], 1e-5)
  # Train mode: the student's BatchNorms use the batch's statistics.
  code, _ = ocbe.apply(ocbe_vars, maps, train=True, mutable=["batch_stats"])
  student, _ = decoder.apply(decoder_vars, code, train=True,
                             mutable=["batch_stats"])
  loss = rd.reverse_distillation_loss(maps, student, "flattened")
  assert float(loss) == pytest.approx(float(golden["train_loss"]), rel=1e-5)
