"""A trained detector: evaluate, predict, Detector.load, export, CLIs.

Every method's run is the one the session trains once through the CLI
(tests/trained.py: tiny; on digits, or a 4-image MVTec-shaped folder for
the localising methods).
"""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import jax_oneclass
from jax_oneclass import data, export
from jax_oneclass import main as main_lib
from jax_oneclass import run as run_lib
from tests.conftest import METHODS, REPO, command_in_process
from tests.trained import NUM_OVERLAYS, by_method

NUM_IMAGES = 12


def trained(method, trained_run):
  """(workdir, results) of `method`'s run shared by the test session."""
  run = trained_run(method)
  return run.workdir, run.results


def _test_images(workdir, count=NUM_IMAGES):
  """The first test images of the run's data, as its source stores them."""
  source = data.sources.get_source(run_lib.saved_config(workdir))
  return [
    np.asarray(source.decode(ex["image"]))
    for ex in source.records("test", 1, 0).take(count).as_numpy_iterator()
  ]


def _csv_scores(workdir):
  with open(workdir / "test_scores.csv") as f:
    return list(csv.DictReader(f))


@pytest.mark.parametrize("method", by_method(METHODS))
def test_predict_gives_the_scores_evaluate_wrote(method, trained_run):
  workdir, results = trained(method, trained_run)
  assert (workdir / "fitted" / str(results["step"])).is_dir()
  det = jax_oneclass.Detector.load(workdir)
  out = det.predict(_test_images(workdir))
  rows = _csv_scores(workdir)[: len(out.score)]
  assert out.scorer == results["scorer"]
  for name, values in out.scores.items():
    want = np.array([float(r[name]) for r in rows])
    # Float32 rounding differs with the batch shape; sums such as OC-SVM's
    # cancel, so the tolerance follows the scores' scale.
    np.testing.assert_allclose(
      values,
      want,
      rtol=1e-4,
      atol=1e-5 * max(1.0, np.abs(want).max()),
      err_msg=name,
    )
  np.testing.assert_array_equal(
    out.is_anomaly, [int(r["predicted_anomaly"]) for r in rows]
  )
  assert ((out.normalized_score > 0.5) == out.is_anomaly).all()
  threshold = results["thresholds"][out.scorer]["threshold"]
  assert out.threshold == threshold
  if out.maps:  # Localising methods.
    (amap,) = out.maps.values()
    assert amap.shape == (len(out.score),) + det.image_shape[:2]
    (mask,) = out.masks.values()
    assert mask.dtype == bool and mask.shape == amap.shape


@pytest.mark.xdist_group("run_reverse_distillation")
def test_results_report_thresholds_and_metrics(trained_run):
  workdir, results = trained("reverse_distillation", trained_run)
  assert results["calibration"] == {
    "split": "holdout",
    "num_images": 1,
    "min_fpr": 1.0,
    "fpr": 0.01,
    "pixel_fpr": 0.01,
  }
  assert (
    "warning: eval.fpr=0.01 is below 1/1 = 1, the smallest "
    "false-positive rate 1 holdout images resolve"
  ) in trained_run("reverse_distillation").stderr
  report = results["thresholds"]["map_max"]
  assert set(report["at_threshold"]) == {"precision", "recall", "f1", "fpr"}
  assert (
    "chosen on the labelled test split"
    in (report["f1_optimal_on_test"]["note"])
  )
  assert results["image_metrics"] == report["at_threshold"]
  assert len(_csv_scores(workdir)) == results["num_test"] == 4
  assert sorted(r["filename"] for r in _csv_scores(workdir)) == [
    "test/good/000.png",
    "test/good/001.png",
    "test/scratch/000.png",
    "test/scratch/001.png",
  ]
  assert (
    "localization" in results
    and "threshold" in results["localization"]["anomaly_map"]
  )
  assert len(list((workdir / "visualizations").glob("*.png"))) == (NUM_OVERLAYS)


def test_the_detector_loads_in_a_fresh_process(trained_run):
  workdirs = {m: str(trained(m, trained_run)[0]) for m in METHODS}
  script = (
    "import json, sys\n"
    "import jax_oneclass\n"
    "from tests.test_predict_export import _test_images\n"
    "from pathlib import Path\n"
    "out = {}\n"
    "for m, w in json.loads(sys.argv[1]).items():\n"
    "  p = jax_oneclass.Detector.load(w).predict(_test_images(Path(w)))\n"
    "  out[m] = p.score.tolist()\n"
    "print(json.dumps(out))\n"
  )
  done = subprocess.run(
    [sys.executable, "-c", script, json.dumps(workdirs)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  fresh = json.loads(done.stdout.strip().splitlines()[-1])
  for method, workdir in workdirs.items():
    here = jax_oneclass.Detector.load(workdir).predict(
      _test_images(trained(method, trained_run)[0])
    )
    np.testing.assert_allclose(
      fresh[method], here.score, rtol=1e-5, atol=1e-6, err_msg=method
    )


def _assert_symbolic_batch(model):
  """Every ONNX graph output declares the input's symbolic batch, and
  onnxruntime infers it too (a batch of 1 there warns on every call)."""
  import onnx  # pylint: disable=g-import-not-at-top
  import onnxruntime  # pylint: disable=g-import-not-at-top

  for output in onnx.load(str(model)).graph.output:
    batch = output.type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value, (output.name, batch)
  session = onnxruntime.InferenceSession(str(model))
  for output in session.get_outputs():
    assert isinstance(output.shape[0], str), (output.name, output.shape)


@pytest.mark.parametrize("method", by_method(METHODS))
def test_every_export_format_reloads_and_matches(method, trained_run, tmp_path):
  workdir, _ = trained(method, trained_run)
  det = jax_oneclass.Detector.load(workdir)
  images = np.stack(
    [
      np.round(data.to_model_input(x, det.image_shape) * 255).astype(np.uint8)
      for x in _test_images(workdir, 5)
    ]
  )
  want = det.predict(list(images))
  for fmt in export.FORMATS:
    path = export.export(det, fmt, tmp_path / fmt)
    signature = json.loads((path / "signature.json").read_text())
    assert signature["scorer"] == want.scorer
    reloaded = export.load(path)
    got = reloaded(images)
    np.testing.assert_allclose(
      got["score"], want.score, rtol=2e-4, atol=2e-4, err_msg=f"{method} {fmt}"
    )
    # A score within float noise of the threshold may flip its label.
    near = np.abs(want.score - want.threshold) < 1e-3 * (
      1 + abs(want.threshold)
    )
    np.testing.assert_array_equal(
      got["is_anomaly"][~near], want.is_anomaly[~near]
    )
    if want.maps:
      (amap,) = want.maps.values()
      np.testing.assert_allclose(
        got["anomaly_map"],
        amap,
        rtol=2e-4,
        atol=2e-4,
        err_msg=f"{method} {fmt} map",
      )
    assert len(got["score"]) == len(images)  # Any batch size: 3 works too.
    assert len(reloaded(images[:3])["score"]) == 3
    if fmt == "onnx":
      _assert_symbolic_batch(path / "model.onnx")


def _write_inputs(folder):
  """PNG, BMP, RGBA, grey and a corrupt file, of several sizes."""
  folder.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(
    folder / "a.png"
  )
  Image.fromarray(rng.integers(0, 255, (20, 30), np.uint8)).save(
    folder / "b.bmp"
  )
  Image.fromarray(rng.integers(0, 255, (16, 16, 4), np.uint8)).save(
    folder / "c.png"
  )
  (folder / "broken.jpg").write_bytes(b"not a jpeg")


@pytest.mark.xdist_group("run_gradient_preference")
def test_predict_cli_writes_scores_maps_masks_and_pictures(
  trained_run, tmp_path
):
  workdir, results = trained("gradient_preference", trained_run)
  _write_inputs(tmp_path / "in")
  out = tmp_path / "out"
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "jax_oneclass.predict",
      f"--workdir={workdir}",
      f"--input={tmp_path / 'in'}",
      f"--output={out}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=400,
    check=False,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "broken.jpg" in done.stdout + done.stderr
  summary = json.loads((out / "predictions.json").read_text())
  assert [i["file"].rsplit("/", 1)[-1] for i in summary["images"]] == [
    "a.png",
    "b.bmp",
    "c.png",
  ]
  assert summary["skipped"][0].startswith(str(tmp_path / "in" / "broken.jpg"))
  assert summary["scorer"] == results["scorer"] == "nn_max"
  first = summary["images"][0]
  assert first["label"] in ("normal", "anomalous")
  assert (first["normalized_score"] > 0.5) == (first["label"] == "anomalous")
  amap = np.load(out / first["maps"]["anomaly_map"]["map"])
  assert amap.shape == (32, 32)  # The model's resolution.
  with Image.open(
    out / summary["images"][1]["maps"]["anomaly_map"]["mask"]
  ) as mask:
    assert mask.size == (30, 20)  # b.bmp's own size.
  assert len(list((out / "visualizations").glob("*.png"))) == 3
  assert (out / "predictions.csv").read_text().count("\n") == 4


@pytest.mark.xdist_group("run_ganomaly")
@pytest.mark.parametrize(
  "inputs, message",
  [
    ("empty", "holds no image files"),
    ("missing", "is no file, folder or glob"),
    ("corrupt", "could be read as an image"),
  ],
)
def test_predict_refuses_inputs_with_nothing_to_score(
  trained_run, tmp_path, inputs, message
):
  from jax_oneclass import detector  # pylint: disable=g-import-not-at-top
  from jax_oneclass.errors import DataError  # pylint: disable=g-import-not-at-top

  workdir, _ = trained("ganomaly", trained_run)
  folder = tmp_path / "in"
  if inputs != "missing":
    folder.mkdir()
  if inputs == "corrupt":
    (folder / "x.png").write_bytes(b"\x89PNG broken")
  with pytest.raises(DataError, match=message):
    detector.predict_folder(workdir, folder, tmp_path / "out", progress=False)


@pytest.mark.xdist_group("run_dgad")
def test_eval_without_config_reuses_and_refits_the_stage(
  trained_run, tmp_path, monkeypatch, capsys
):
  shared, results = trained("dgad", trained_run)
  workdir = tmp_path / "run"  # Other tests read the shared run meanwhile.
  shutil.copytree(shared, workdir)
  args = [f"--workdir={workdir}", "--mode=eval"]
  code, out, err = command_in_process(main_lib.run, args, monkeypatch, capsys)
  assert code == 0, err[-3000:]
  assert "Using the fitted stage saved for step 4" in out
  rerun = json.loads((workdir / "results.json").read_text())
  assert rerun["auroc"] == pytest.approx(results["auroc"], abs=1e-6)
  code, out, err = command_in_process(
    main_lib.run, args + ["--refit"], monkeypatch, capsys
  )
  assert code == 0, err[-3000:]
  assert "Using the fitted stage" not in out


def test_onnx_export_holds_the_network_once(tmp_path):
  """Every output comes from one trace: a one-conv network with four
  outputs gives an ONNX graph with one Conv (not one per output) and one
  copy of its kernel."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import onnx  # pylint: disable=g-import-not-at-top

  kernel = jnp.ones((3, 3, 3, 2), jnp.float32) / 27.0

  def fn(images):
    x = images.astype(jnp.float32) / 255.0
    y = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    score = y.mean(axis=(1, 2, 3))
    return {
      "score": score,
      "normalized_score": score * 2,
      "is_anomaly": score > 0.5,
      "anomaly_map": y[..., 0],
    }

  keys = export._write_onnx(fn, (8, 8, 3), tmp_path)  # pylint: disable=protected-access
  assert keys == sorted(keys) and len(keys) == 4
  graph = onnx.load(str(tmp_path / "model.onnx")).graph
  ops = [node.op_type for node in graph.node]
  assert ops.count("Conv") == 1, ops
  assert len(graph.output) == 4
  # The kernel is stored once (as the Conv reads it), unused ones dropped.
  read = {name for node in graph.node for name in node.input}
  assert all(init.name in read for init in graph.initializer)
  assert (
    sum(1 for init in graph.initializer if sorted(init.dims) == [2, 3, 3, 3])
    == 1
  )


def test_onnx_export_leaves_out_what_no_output_needs(tmp_path):
  """A method's `score` computes every scorer; the graph holds only what
  the exported outputs need (here: one of two convolutions)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import onnx  # pylint: disable=g-import-not-at-top

  def conv(x, scale):
    kernel = jnp.full((3, 3, 3, 2), scale, jnp.float32)
    return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  def fn(images):
    x = images.astype(jnp.float32) / 255.0
    scores = {"used": conv(x, 1.0).mean((1, 2, 3)), "other": conv(x, 2.0)}
    return {"score": scores["used"]}

  assert export._write_onnx(fn, (8, 8, 3), tmp_path) == ["score"]  # pylint: disable=protected-access
  graph = onnx.load(str(tmp_path / "model.onnx")).graph
  ops = [node.op_type for node in graph.node]
  assert ops.count("Conv") == 1, ops


def test_loading_an_onnx_export_prints_nothing(tmp_path, capfd):
  """onnxruntime warns about every unused initializer of a loop body
  (a scan's constants) unless its log level is raised."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def fn(images):
    x = jnp.mean(images.astype(jnp.float32) / 255.0, axis=(1, 2, 3))
    score, _ = jax.lax.scan(
      lambda c, k: (c + x * k + 2.0, None), jnp.zeros_like(x), jnp.arange(3.0)
    )
    return {"score": score, "is_anomaly": score > 0.5}

  keys = export._write_onnx(fn, (8, 8, 3), tmp_path)  # pylint: disable=protected-access
  (tmp_path / "signature.json").write_text(
    json.dumps({"format": "onnx", "output_order": keys})
  )
  capfd.readouterr()
  out = export.load(tmp_path)(np.zeros((2, 8, 8, 3), np.uint8))
  np.testing.assert_allclose(out["score"], [6.0, 6.0])
  assert capfd.readouterr().err == ""


def test_padded_size_is_a_power_of_two_up_to_the_batch():
  from jax_oneclass.detector import padded_size  # pylint: disable=g-import-not-at-top

  assert [padded_size(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [
    1,
    2,
    4,
    8,
    16,
    16,
  ]
  assert padded_size(12, 12) == 12
  assert [padded_size(n, 16, 4) for n in (1, 5, 16)] == [4, 8, 16]
  assert padded_size(5, 6, 4) == 8  # A multiple of the devices.


@pytest.mark.xdist_group("run_reverse_distillation")
def test_one_image_is_scored_alone_and_alike(trained_run):
  workdir, _ = trained("reverse_distillation", trained_run)
  det = jax_oneclass.Detector.load(workdir)
  images = _test_images(workdir, 3)
  together = det.predict(images)
  shapes = []
  score = det._score  # pylint: disable=protected-access

  def recording(state, fitted, batch):
    shapes.append(batch["image"].shape[0])
    return score(state, fitted, batch)

  det._score = recording  # pylint: disable=protected-access
  alone = det.predict(images[1:2])
  assert shapes == [1]  # Not padded to eval.batch_size (4).
  np.testing.assert_allclose(
    alone.score, together.score[1:2], rtol=1e-5, atol=1e-6
  )
  (name,) = alone.maps
  np.testing.assert_allclose(
    alone.maps[name], together.maps[name][1:2], rtol=1e-4, atol=1e-5
  )
  one_by_one = jax_oneclass.Detector.load(workdir, batch_size=1)
  assert one_by_one.batch_size == 1
  np.testing.assert_allclose(
    one_by_one.predict(images).score, together.score, rtol=1e-5, atol=1e-6
  )
  from jax_oneclass.errors import ConfigError  # pylint: disable=g-import-not-at-top

  with pytest.raises(ConfigError, match="positive multiple"):
    jax_oneclass.Detector.load(workdir, batch_size=0)


def test_batched_model_inputs_equal_the_one_by_one_path():
  rng = np.random.default_rng(3)
  shape = (16, 16, 3)
  images = [
    rng.integers(0, 256, shape, np.uint8),  # Fast path.
    rng.integers(0, 256, (20, 12, 3), np.uint8),  # Resized.
    rng.integers(0, 256, (16, 16), np.uint8),  # Gray -> RGB.
    rng.integers(0, 256, (16, 16, 4), np.uint8),
  ]  # RGBA.
  want = np.stack([data.to_model_input(x, shape) for x in images])
  np.testing.assert_array_equal(data.to_model_inputs(images, shape), want)
  gray = [rng.integers(0, 256, (16, 16), np.uint8)]
  np.testing.assert_array_equal(
    data.to_model_inputs(gray, (16, 16, 1)),
    data.to_model_input(gray[0], (16, 16, 1))[None],
  )


def test_onnx_export_takes_flax_pooling_by_position(tmp_path):
  """jax2onnx's own pooling rules take keywords only; positional calls as
  researchers write them convert too, and give the same values."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top

  def fn(images):
    x = images.astype(jnp.float32)
    high = nn.max_pool(x, (2, 2), (2, 2))
    mean = nn.avg_pool(x, (2, 2), (2, 2), "VALID")
    return {"score": high.mean(axis=(1, 2, 3)) - mean.mean(axis=(1, 2, 3))}

  assert export._write_onnx(fn, (8, 8, 3), tmp_path) == ["score"]  # pylint: disable=protected-access
  assert nn.max_pool.__module__ == "flax.linen.pooling"  # Restored.
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), np.uint8)
  session = ort.InferenceSession(str(tmp_path / "model.onnx"))
  (got,) = session.run(None, {session.get_inputs()[0].name: images})
  np.testing.assert_allclose(got, fn(images)["score"], rtol=1e-5)


def test_an_operation_onnx_cannot_convert_is_one_line(tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def fn(images):
    x = images.astype(jnp.float32).reshape(images.shape[0], 8, -1)[:, :, :8]
    return {"score": jnp.linalg.eigh(x)[0][:, 0]}

  with pytest.raises(
    export.ExportError, match=r"ONNX export cannot convert an operation .*eigh"
  ):
    export._write_onnx(fn, (8, 8, 3), tmp_path)  # pylint: disable=protected-access
