"""Visual explanations (jax_oneclass.explain) for every registered method.

Each method's explanations are taken from the run the session trains once
(tests/trained.py), on two test images, with few integrated-gradient steps.
"""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_oneclass
from jax_oneclass import cli_checks, data, detector, explain
from jax_oneclass import run as run_lib
from jax_oneclass.errors import ConfigError
from jax_oneclass.methods import interface
from tests.conftest import METHODS
from tests.trained import by_method

NUM_IMAGES = 2
STEPS = 64
# Reverse distillation's map maximum has more kinks along the path: 10-12%
# at 64 steps, so it takes more.
STEPS_OF = {"reverse_distillation": 160}
# Completeness: |sum(attributions) - (score(x) - score(baseline))|, over the
# images, within this fraction of the largest |score(x) - score(baseline)|.
# Measured on the tiny runs at 64 steps: at most 3% for most methods,
# 8.8-12% for reverse distillation's map maximum (5.5% at 128 steps; see
# docs/explanations.md).
COMPLETENESS = 0.1


def _test_images(workdir, count=NUM_IMAGES):
  """The first test images of the run's data, as its source stores them."""
  source = data.sources.get_source(run_lib.saved_config(workdir))
  return [
    np.asarray(source.decode(ex["image"]))
    for ex in source.records("test", 1, 0).take(count).as_numpy_iterator()
  ]


def _correlation(a, b) -> float:
  a, b = np.ravel(a), np.ravel(b)
  return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("method", by_method(METHODS))
def test_explanations_of_every_method(method, trained_run):
  det = jax_oneclass.Detector.load(trained_run(method).workdir)
  images = _test_images(det.run.workdir)
  height, width = det.image_shape[:2]

  steps = STEPS_OF.get(method, STEPS)
  ig = det.explain(images, "integrated_gradients", steps=steps)
  assert ig.maps.shape == (NUM_IMAGES, height, width)
  with open(det.run.workdir / "test_scores.csv") as f:  # From evaluation.
    rows = list(csv.DictReader(f))[:NUM_IMAGES]
  want = np.array([float(r[ig.scorer]) for r in rows])
  np.testing.assert_allclose(
    ig.score, want, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(want).max())
  )
  gap = ig.score - ig.baseline_score
  error = np.abs(ig.maps.sum(axis=(1, 2)) - gap)
  assert error.max() <= COMPLETENESS * np.abs(gap).max(), (error, gap)

  cam = det.explain(images, "gradcam")
  assert cam.layer and cam.maps.shape == (NUM_IMAGES, height, width)
  assert np.all(cam.maps >= 0) and np.any(cam.maps > 0)

  # Randomised weights (Adebayo et al. 2018): the maps must change. Made
  # like a restored state (jitted, replicated over the run's mesh), so the
  # integrated-gradients program compiled above serves it too.
  fresh = run_lib.initial_state(
    det.run.method, det.image_shape, det.run.mesh, 12345
  )
  random = explain.explain_images(
    det.run.method,
    fresh,
    det.stage.fitted,
    data.to_model_inputs(images, det.image_shape),
    "integrated_gradients",
    ig.scorer,
    baseline=det.mean_image(),
    steps=steps,
  )
  assert _correlation(ig.maps, random["maps"]) < 0.9


def test_predict_folder_writes_explanations(trained_run, tmp_path):
  workdir = trained_run("disaug").workdir
  folder = tmp_path / "images"
  folder.mkdir()
  for i, image in enumerate(_test_images(workdir)):
    jax_oneclass.detector.Image.fromarray(image.squeeze()).save(
      folder / f"digit{i}.png"
    )
  records = detector.predict_folder(
    workdir,
    folder,
    tmp_path / "out",
    progress=False,
    visualize_images=False,
    explain=("integrated_gradients", "gradcam"),
    explain_options={"steps": 4, "baseline": "black"},
  )
  saved = json.loads((tmp_path / "out" / "predictions.json").read_text())
  assert saved["images"][0]["explanations"] == records[0]["explanations"]
  for record in records:
    paths = record["explanations"]
    for kind in cli_checks.EXPLANATIONS:
      assert np.load(tmp_path / "out" / paths[kind]).shape == (8, 8)
    assert (tmp_path / "out" / paths["panel"]).stat().st_size > 0


def test_explanation_flags_are_checked():
  assert cli_checks.explanations("gradcam, integrated_gradients,gradcam") == (
    "gradcam",
    "integrated_gradients",
  )
  with pytest.raises(ConfigError, match="Unknown explanation 'shap'"):
    cli_checks.explanations("gradcam,shap")
  with pytest.raises(ConfigError, match="--explain_steps must be >= 1"):
    cli_checks.explanations("integrated_gradients", steps=0)


class _CallbackScore:
  """A method whose only scorer leaves JAX through a host callback."""

  def score(self, state, fitted, batch):
    del state, fitted
    total = jnp.sum(batch["image"], axis=(1, 2, 3))
    host = jax.pure_callback(
      np.square, jax.ShapeDtypeStruct(total.shape, total.dtype), total
    )
    return interface.Scores({"host": host})


def test_a_non_differentiable_scorer_is_named():
  with pytest.raises(ConfigError, match="Scorer 'host' of toy is not diff"):
    explain.explain_images(
      _CallbackScore(),
      None,
      None,
      np.ones((1, 4, 4, 1), np.float32),
      "integrated_gradients",
      "host",
      "toy",
      baseline=np.zeros((4, 4, 1), np.float32),
      steps=2,
    )


def test_integrated_gradients_are_exact_for_a_quadratic():
  score = lambda x: jnp.sum(x**2)
  image = jnp.arange(12.0).reshape(2, 3, 2) / 12
  got = explain.integrated_gradients(score, image, jnp.zeros_like(image), 5, 2)
  # The midpoint rule integrates the linear gradient 2 * a * x exactly.
  np.testing.assert_allclose(got, image**2, rtol=1e-6)


def test_an_unknown_layer_lists_the_layers():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(2, (3, 3), name="conv")(x)
      return jnp.mean(nn.Dense(1, name="dense")(x), axis=(1, 2, 3))

  net = Net()
  variables = net.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
  score = lambda image: net.apply(variables, image[None])[0]
  calls = explain.module_calls(score, jnp.zeros((4, 4, 1)))
  assert explain.resolve_layer(calls, "conv") == "conv"
  with pytest.raises(ConfigError, match="No layer 'head'.*: conv, dense"):
    explain.resolve_layer(calls, "head")
  cam = explain.gradcam(
    score, jnp.ones((4, 4, 1)), "conv", [s for p, s, _ in calls if p == "conv"]
  )
  assert cam.shape == (4, 4)
