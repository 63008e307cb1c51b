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
