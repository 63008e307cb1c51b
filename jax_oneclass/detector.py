"""A trained detector for notebooks and services.

  det = jax_oneclass.Detector.load("/tmp/run")
  out = det.predict(["a.png", "b.jpg"])  # or uint8 arrays [N, H, W, C]
  out.score, out.normalized_score, out.is_anomaly, out.maps, out.masks

Images of any size and 1, 3 or 4 channels are resized as in training;
scoring is the run's jit-compiled `score` over all local devices, on
batches of `eval.batch_size` (or Detector.load's `batch_size`; a shorter
one padded to the next power of two, so a single image is scored alone).
The fitted stage and thresholds come from the workdir (fitted and saved
there first if missing).
"""

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from PIL import Image

from jax_oneclass import data, evaluate, logging_utils, parallel, thresholds
from jax_oneclass import explain as explain_lib
from jax_oneclass import visualize
from jax_oneclass import run as run_lib
from jax_oneclass.cli_checks import IG_BASELINES, IMAGE_SUFFIXES, list_images
from jax_oneclass.errors import CheckpointError, ConfigError, DataError
from jax_oneclass.methods import interface

_TF_DECODES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclasses.dataclass
class Prediction:
  """Per-image outputs for N images (NumPy).

  `score`, `normalized_score` (the threshold at 0.5) and `is_anomaly` are
  those of the headline scorer `scorer`; `scores` holds every scorer's raw
  score. For localising methods `maps` {name: [N, H, W]} at the model's
  resolution, `normalized_maps` likewise and `masks` {name: bool [N, H, W]}
  (normalised map above 0.5); empty otherwise.
  """

  names: list[str]
  scorer: str
  threshold: float
  score: np.ndarray
  normalized_score: np.ndarray
  is_anomaly: np.ndarray
  scores: dict[str, np.ndarray]
  maps: dict[str, np.ndarray]
  normalized_maps: dict[str, np.ndarray]
  masks: dict[str, np.ndarray]


def read_image(path) -> np.ndarray:
  """uint8 [H, W, C] of an image file (first frame of an animation)."""
  path = Path(path)
  raw = path.read_bytes()
  if path.suffix.lower() in _TF_DECODES:
    # TF decodes as the training pipeline does (same bytes -> same pixels).
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    try:
      return tf.io.decode_image(raw, expand_animations=False).numpy()
    except (tf.errors.InvalidArgumentError, ValueError):
      pass  # Let PIL say what is wrong, or read what TF cannot.
  with Image.open(path) as image:
    image.seek(0)
    if image.mode not in ("L", "RGB", "RGBA"):
      image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    return np.asarray(image)


def load_images(paths: Sequence) -> tuple[list, list[str], list[str]]:
  """(uint8 images, their names, 'path: reason' of those skipped)."""
  images, names, skipped = [], [], []
  for path in paths:
    try:
      images.append(read_image(path))
      names.append(str(path))
    except (OSError, ValueError, SyntaxError) as e:
      skipped.append(f"{path}: {type(e).__name__}: {e}")
  return images, names, skipped


class Detector:
  """A trained run: its method, state, fitted stage and thresholds."""

  def __init__(
    self, run: run_lib.Run, state, stage: evaluate.FittedStage, step: int
  ):
    self.run, self.state, self.stage, self.step = run, state, stage, step
    self.config = run.config
    self.image_shape = tuple(run.info.image_shape)
    # Images per compiled call; on a busy CPU a smaller batch can cost less
    # per image (see `experiments/speed.py inference_sweep`).
    self.batch_size = int(run.config.eval.batch_size)
    self._score = evaluate.score_fn(run)
    # The headline scorer (config.eval.scorer), checked against the saved
    # calibration's scorers.
    self.scorer = evaluate.headline_scorer(
      run.config, stage.calibration["image"]
    )
    self._mean_image = None

  @classmethod
  def load(
    cls,
    workdir,
    config=None,
    refit: bool = False,
    batch_size: int | None = None,
  ) -> "Detector":
    """The detector of a workdir's newest checkpoint.

    `config` defaults to the run's own (config.json); `refit` fits the
    non-gradient stage and thresholds anew; `batch_size` (default
    eval.batch_size) is the number of images scored per compiled call.
    """
    require_checkpoint(workdir)
    config = config or run_lib.saved_config(workdir)
    if config is None:
      raise ConfigError(
        f"No config.json in {workdir}: point it at a trained run's workdir."
      )
    run = run_lib.setup(
      config, workdir, info=run_lib.saved_info(workdir, config), mode="predict"
    )
    try:
      state, step = run_lib.restore_latest(run)
    finally:
      run.checkpointer.close()
    detector = cls(
      run,
      state,
      evaluate.load_or_fit(run, state, step, refit, repair=False),
      step,
    )
    if batch_size is not None:
      if batch_size < 1 or batch_size % parallel.device_count():
        raise ConfigError(
          f"batch_size {batch_size} must be a positive "
          f"multiple of the {parallel.device_count()} devices."
        )
      if (
        config.eval.get("batch_norm") == "batch"
        and batch_size != config.eval.batch_size
      ):
        raise ConfigError(
          "This run scores with batch-statistics BatchNorm "
          "(eval.batch_norm='batch'), so its scores depend on the batch; "
          f"keep eval.batch_size ({config.eval.batch_size})."
        )
      detector.batch_size = batch_size
    return detector

  def _batches(self, images: list) -> Any:
    """Model inputs in padded batches: (batch, count).

    Full chunks of `self.batch_size`; a shorter (last or only) chunk is padded
    to `padded_size` only, so one image costs one image, not a whole batch.
    """
    size = self.batch_size
    # Batch-statistics BatchNorm (GANomaly's eval.batch_norm='batch'): the
    # scores depend on the padding, so pad as evaluation does.
    whole = self.config.eval.get("batch_norm") == "batch"
    for start in range(0, len(images), size):
      chunk = data.to_model_inputs(
        images[start : start + size], self.image_shape
      )
      padded = (
        size
        if whole
        else padded_size(len(chunk), size, parallel.device_count())
      )
      batch = np.zeros((padded,) + self.image_shape, np.float32)
      batch[: len(chunk)] = chunk
      yield batch, len(chunk)

  def score_images(self, images: list, progress: bool = False) -> Any:
    """The method's raw `Scores` of uint8 images, as host arrays."""
    if parallel.process_count() > 1:
      raise ConfigError(
        "Detector runs in one process (all its devices); "
        "use --mode=eval for multi-host scoring."
      )
    outputs = []
    total = -(-len(images) // self.batch_size)
    bar = logging_utils.progress_bar(total, "batches", enabled=progress)
    for batch, count in self._batches(images):
      sharded = parallel.shard_batch(self.run.mesh, {"image": batch})
      out = parallel.to_host(
        self._score(self.state, self.stage.fitted, sharded)
      )
      outputs.append(jax.tree.map(lambda v, n=count: v[:n], out))
      bar.update(1)
    bar.close()
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)

  def predict(
    self, images, names: Sequence[str] | None = None, progress: bool = False
  ) -> Prediction:
    """Scores, labels and (for localising methods) maps and masks.

    `images`: uint8 [N, H, W(, C)] or a list of uint8 arrays of any sizes,
    or of image file paths.
    """
    images, names = _images_and_names(images, names)
    raw = self.score_images(images, progress)
    scorer = self.scorer
    calib = self.stage.calibration
    stats = calib["image"][scorer]
    normalized_maps = {
      k: thresholds.normalize(v, calib["maps"][k]).astype(np.float32)
      for k, v in raw.maps.items()
    }
    return Prediction(
      names=names,
      scorer=scorer,
      threshold=stats["threshold"],
      score=raw.image[scorer],
      normalized_score=thresholds.normalize(raw.image[scorer], stats),
      is_anomaly=raw.image[scorer] > stats["threshold"],
      scores=raw.image,
      maps=raw.maps,
      normalized_maps=normalized_maps,
      masks={k: v > calib["maps"][k]["threshold"] for k, v in raw.maps.items()},
    )

  def mean_image(self) -> np.ndarray:
    """The mean normal training image [H, W, C] (read once, then kept)."""
    if self._mean_image is None:
      self._mean_image = evaluate.mean_train_image(self.run)
    return self._mean_image

  def explain(
    self,
    images,
    method: str = "integrated_gradients",
    names: Sequence[str] | None = None,
    scorer: str | None = None,
    baseline: str = "mean",
    steps: int = 64,
    chunk: int = 16,
    layer: str | None = None,
  ) -> explain_lib.Explanation:
    """Attribution maps of a scorer's score (default: the headline's) to
    the pixels; see `jax_oneclass.explain`.

    `images` as for `predict`. `method`: 'integrated_gradients' (from
    `baseline` 'mean', the mean normal training image, or 'black', in
    `steps` points, `chunk` at a time) or 'gradcam' (at module path `layer`,
    default the method's `gradcam_layer`).
    """
    images, names = _images_and_names(images, names)
    scorer = scorer or self.scorer
    scorers = self.stage.calibration["image"]
    if scorer not in scorers:
      raise ConfigError(
        f"{scorer!r} is not a scorer of {self.config.method}; choose one of "
        f"{', '.join(sorted(scorers))}."
      )
    base = None
    if method == "integrated_gradients":
      if baseline not in IG_BASELINES:
        raise ConfigError(
          f"Unknown baseline {baseline!r}; choose {' or '.join(IG_BASELINES)}."
        )
      base = (
        self.mean_image()
        if baseline == "mean"
        else np.zeros(self.image_shape, np.float32)
      )
    out = explain_lib.explain_images(
      self.run.method,
      self.state,
      self.stage.fitted,
      data.to_model_inputs(images, self.image_shape),
      method,
      scorer,
      self.config.method,
      baseline=base,
      steps=steps,
      chunk=chunk,
      layer=layer,
    )
    return explain_lib.Explanation(
      names=names, method=method, scorer=scorer, **out
    )


def _images_and_names(images, names) -> tuple[list, list[str]]:
  """uint8 images (read when given as paths) and their names."""
  if isinstance(images, np.ndarray):
    images = list(images)
  images = list(images)
  if not images:
    raise DataError("No images to predict.")
  if isinstance(images[0], (str, os.PathLike)):
    images, names, skipped = load_images(images)
    if skipped:
      raise DataError(f"Cannot read {skipped[0]}.")
  if names is None:
    names = [f"image {i}" for i in range(len(images))]
  return images, list(names)


def padded_size(count: int, batch_size: int, num_devices: int = 1) -> int:
  """The batch `count` (<= `batch_size`) images are padded to: the next
  power of two (so a few compiled shapes serve every count), at most
  `batch_size`, rounded up to a multiple of `num_devices`."""
  size = 1 << max(0, count - 1).bit_length()
  size = min(size, batch_size)
  return -(-max(size, num_devices) // num_devices) * num_devices


def require_checkpoint(workdir) -> None:
  """Fails clearly when `workdir` holds no trained run."""
  if not (Path(workdir) / "checkpoints").is_dir():
    raise CheckpointError(
      f"No checkpoints/ in {workdir}: train first or "
      "point --workdir at a trained run."
    )


def _stem(index: int, name: str) -> str:
  base = os.path.splitext(os.path.basename(name))[0]
  return f"{index:05d}_{base}"


def _mask_at_size(normalized_map: np.ndarray, size) -> np.ndarray:
  """The predicted mask at an image's (height, width): the normalised map
  resized bilinearly, above 0.5."""
  picture = Image.fromarray(normalized_map.astype(np.float32), mode="F")
  resized = np.asarray(picture.resize((size[1], size[0]), Image.BILINEAR))
  return resized > 0.5


def predict_folder(
  workdir,
  source,
  output,
  config=None,
  refit: bool = False,
  visualize_images: bool = True,
  progress: bool = True,
  explain: Sequence[str] = (),
  explain_options: dict | None = None,
) -> list[dict]:
  """Predicts every image of `source` (file, folder or glob) into `output`.

  Writes predictions.csv and predictions.json (per image: raw score,
  normalised score, label at the run's threshold), for localising methods
  maps/<name>.npy (the raw map at the model's resolution) and
  masks/<name>.png (the predicted mask at the image's own size), and with
  `visualize_images` a panel per image in visualizations/. `explain` names
  explanations (see `Detector.explain`, which takes `explain_options`)
  written to explanations/. Unreadable files are named and skipped.
  Returns the per-image records.
  """
  if not source or not output:
    raise DataError(
      "Predicting needs --input (an image file, a folder or a "
      "glob) and --output (a folder for the results)."
    )
  paths = list_images(source)
  if not paths:
    raise DataError(
      f"--input {source!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})."
    )
  images, names, skipped = load_images(paths)
  for line in skipped:
    logging_utils.info(f"Skipped unreadable image {line}")
  if not images:
    raise DataError(
      f"None of the {len(paths)} files of {source!r} could be "
      "read as an image; see the lines above."
    )
  det = Detector.load(workdir, config=config, refit=refit)
  out = det.predict(images, names, progress=progress)
  output = Path(output)
  output.mkdir(parents=True, exist_ok=True)
  stats = det.stage.calibration["image"][out.scorer]
  records = []
  for i, name in enumerate(names):
    stem = _stem(i, name)
    record = {
      "file": name,
      "scorer": out.scorer,
      "score": float(out.score[i]),
      "normalized_score": float(out.normalized_score[i]),
      "threshold": float(out.threshold),
      "label": "anomalous" if out.is_anomaly[i] else "normal",
      "scores": {k: float(v[i]) for k, v in sorted(out.scores.items())},
    }
    for map_name, values in out.maps.items():
      # Map names may hold '/' (the two-stage patch mode's scorers).
      suffix = "" if len(out.maps) == 1 else "_" + map_name.replace("/", "_")
      map_path = output / "maps" / f"{stem}{suffix}.npy"
      mask_path = output / "masks" / f"{stem}{suffix}.png"
      map_path.parent.mkdir(exist_ok=True)
      mask_path.parent.mkdir(exist_ok=True)
      np.save(map_path, values[i])
      mask = _mask_at_size(
        out.normalized_maps[map_name][i], images[i].shape[:2]
      )
      Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
      record.setdefault("maps", {})[map_name] = {
        "map": str(map_path.relative_to(output)),
        "mask": str(mask_path.relative_to(output)),
        "anomalous_pixels": float(mask.mean()),
      }
    records.append(record)
  if visualize_images:
    model_inputs = [data.to_model_input(im, det.image_shape) for im in images]
    map_name = interface.headline_map(out.scorer, out.maps)
    visualize.save_panels(
      output / "visualizations",
      model_inputs,
      names,
      out.score,
      stats,
      out.scorer,
      maps=None if map_name is None else out.maps[map_name],
      map_calibration=(
        None if map_name is None else det.stage.calibration["maps"][map_name]
      ),
    )
  if explain:
    _write_explanations(
      output, det, images, names, records, explain, explain_options or {}
    )
  with open(output / "predictions.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["file", "score", "normalized_score", "label"])
    for r in records:
      writer.writerow(
        [
          r["file"],
          f"{r['score']:.7g}",
          f"{r['normalized_score']:.6f}",
          r["label"],
        ]
      )
  (output / "predictions.json").write_text(
    json.dumps(
      {
        "workdir": str(workdir),
        "step": det.step,
        "scorer": out.scorer,
        "threshold": float(out.threshold),
        "skipped": skipped,
        "images": records,
      },
      indent=2,
    )
    + "\n"
  )
  anomalous = int(np.sum(out.is_anomaly))
  logging_utils.info(
    f"{len(records)} images scored ({anomalous} anomalous at "
    f"{out.scorer} > {out.threshold:.4g}), {len(skipped)} skipped; "
    f"results in {output}."
  )
  return records


def _write_explanations(
  output: Path, det: Detector, images, names, records, kinds, options: dict
) -> None:
  """explanations/<stem>_<kind>.npy (the map [H, W] at the model's
  resolution) per image and explanation, and a panel <stem>.png per image;
  each record gets their paths."""
  folder = output / "explanations"
  folder.mkdir(exist_ok=True)
  explained = [det.explain(images, kind, names, **options) for kind in kinds]
  scorer = explained[0].scorer
  calibration = det.stage.calibration["image"][scorer]
  for i, name in enumerate(names):
    stem = _stem(i, name)
    paths = {}
    for result in explained:
      path = folder / f"{stem}_{result.method}.npy"
      np.save(path, result.maps[i])
      paths[result.method] = str(path.relative_to(output))
    picture = visualize.explanation_panel(
      data.to_model_input(images[i], det.image_shape),
      name,
      float(explained[0].score[i]),
      calibration,
      scorer,
      {r.method: explain_lib.display_map(r.maps[i]) for r in explained},
    )
    picture.save(folder / f"{stem}.png")
    records[i]["explanations"] = {
      "scorer": scorer,
      **paths,
      "panel": str((folder / f"{stem}.png").relative_to(output)),
    }
