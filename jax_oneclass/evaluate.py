"""Evaluation: fit and calibrate the non-gradient stage, score the test set.

Every test image is scored exactly once: the last batch is padded with
masked examples, never dropped, since dropped images change AUROC. The
fitted stage (classifiers, memory banks) and its calibration (per-scorer
thresholds at `eval.fpr` on held-out normal images, normalisation
statistics) are saved under <workdir>/fitted/<step> and reused while they
pass their checksums and belong to that step's checkpoint.

An evaluation reads each split once: the pass over the training images
feeds both the fitted stage and the pixel baseline's mean image, and the
pass over the test images both the scores and the baseline's distances.
(Without held-out images, calibration scores the training images in a
second pass, with the stage fitted in the first.)
"""

import contextlib
import csv
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_oneclass import checkpointing, data, logging_utils, metrics
from jax_oneclass import parallel, thresholds, visualize, workdir_lock
from jax_oneclass import run as run_lib
from jax_oneclass.errors import CheckpointError, ConfigError
from jax_oneclass.methods import interface

_LABEL_KEYS = ("mask", "is_anomaly", "label", "pixel_mask", "filename")


@dataclasses.dataclass
class FittedStage:
  """The fitted stage of one checkpoint, ready to score with."""

  fitted: dict  # Replicated over the mesh.
  calibration: dict  # See `calibrate`.
  num_fit: int
  # The mean normal training image, when asked for (see `pixel_baseline`).
  pixel_mean: np.ndarray | None = None


@functools.lru_cache(maxsize=8)
def _gather_fn(mesh):
  """Labels and masks are split over hosts; an identity jit replicates
  them (one per mesh: a new one per pass would trace again)."""
  return jax.jit(lambda b: b, out_shardings=parallel.replicated(mesh))


def _host_batches(fn, args, batches, mesh, num_images: int = 0, bar=None):
  """Runs `fn(*args, batch)` over batches; yields host arrays per batch,
  padding removed.

  Yields (outputs, labels): the per-example outputs of `fn` (a pytree of
  arrays with a leading batch axis; None without `fn`) and the batch's
  label fields (`_LABEL_KEYS`), gathered from every host; labels also hold
  'image' until `num_images` images have been yielded. `bar` (a progress
  bar over images) advances per batch.
  """
  gather = _gather_fn(mesh)
  seen = 0
  for local in batches:
    batch = parallel.shard_batch(mesh, local)
    out = None if fn is None else parallel.to_host(fn(*args, batch))
    label_keys = [k for k in _LABEL_KEYS if k in batch]
    if seen < num_images:
      label_keys.append("image")
    keep = parallel.to_host(gather({k: batch[k] for k in label_keys}))
    mask = keep.pop("mask").astype(bool)
    if "image" in keep:
      seen += int(mask.sum())
    if bar is not None:
      bar.update(int(mask.sum()))
    yield (
      jax.tree.map(lambda v, m=mask: v[m], out),
      {k: v[mask] for k, v in keep.items()},
    )


def _concat(parts: list):
  """The pytrees of `parts` concatenated leaf by leaf (None if none)."""
  return jax.tree.map(lambda *p: np.concatenate(p), *parts) if parts else None


def _collect(fn, args, batches, mesh, num_images: int = 0, bar=None):
  """`_host_batches`, concatenated: (outputs, labels), where labels hold
  'image' (the first `num_images`) only when asked for."""
  outputs, labels, images = [], [], []
  for out, keep in _host_batches(fn, args, batches, mesh, num_images, bar):
    if "image" in keep:
      images.append(keep.pop("image"))
    outputs.append(out)
    labels.append(keep)
  labels = _concat(labels) or {}
  if images:
    labels["image"] = np.concatenate(images)[:num_images]
  return _concat(outputs), labels


def _add_images(total, count: int, images, limit: int):
  """(total, count) with `images` added, up to `limit` images in all, one
  at a time in float32 (numpy's order for `mean(axis=0)`)."""
  for image in images[: max(limit - count, 0)]:
    if total is None:
      total = image.copy()
    else:
      total += image
    count += 1
  return total, count


def _has_fitted_stage(run: run_lib.Run, state) -> bool:
  """False when `method.embed` returns nothing, so the train pass is moot."""
  example = {
    "image": jax.ShapeDtypeStruct(
      (1,) + tuple(run.info.image_shape), jnp.float32
    )
  }
  return bool(jax.eval_shape(run.method.embed, state, example))


def _train_pass(run: run_lib.Run, state, embed: bool, pixel_mean: bool):
  """One pass over the normal training images: (their embeddings, the
  first `eval.max_fit_examples` of them, or None without `embed`; their
  mean image, or None without `pixel_mean`)."""
  config = run.config
  limit = config.eval.max_fit_examples
  embed_fn = None
  if embed:
    embed_fn = jax.jit(
      run.method.embed, out_shardings=parallel.replicated(run.mesh)
    )
  batches = data.eval_batches(config, "train", config.eval.batch_size)
  parts, total, count = [], None, 0
  for out, labels in _host_batches(
    embed_fn, (state,), batches, run.mesh, num_images=limit if pixel_mean else 0
  ):
    parts.append(out)
    if "image" in labels:
      total, count = _add_images(total, count, labels["image"], limit)
  embeddings = None
  if embed:
    embeddings = {k: v[:limit] for k, v in _concat(parts).items()}
  mean = np.true_divide(total, count) if pixel_mean else None
  return embeddings, mean


def _fit_embeddings(run: run_lib.Run, embeddings):
  """(the method's fitted stage on the host, the number of images it saw);
  `embeddings` None for a method without a fitted stage."""
  if embeddings is None:
    return run.method.fit({}), 0
  return run.method.fit(embeddings), len(next(iter(embeddings.values())))


def fit(run: run_lib.Run, state):
  """(the method's fitted stage on the host, the number of images it saw)."""
  embeddings, _ = _train_pass(
    run, state, _has_fitted_stage(run, state), pixel_mean=False
  )
  return _fit_embeddings(run, embeddings)


def score_fn(run: run_lib.Run):
  """`method.score` jitted over the run's mesh, outputs replicated (one
  jitted function per run: calibration and evaluation trace it once)."""
  if "score" not in run.jitted:
    run.jitted["score"] = jax.jit(
      run.method.score, out_shardings=parallel.replicated(run.mesh)
    )
  return run.jitted["score"]


CALIBRATIONS = ("holdout", "cross_fit")


def calibration_kind(config) -> str:
  """The checked `config.eval.calibration` ('holdout' by default)."""
  kind = config.eval.get("calibration", "holdout")
  if kind not in CALIBRATIONS:
    raise ConfigError(
      f"config.eval.calibration={kind!r}: choose one of "
      f"{', '.join(CALIBRATIONS)}."
    )
  return kind


def _stats(config, scores) -> dict:
  """Per-scorer and per-map `thresholds.calibrate` stats of `scores`."""
  return {
    "image": {
      k: thresholds.calibrate(v, config.eval.fpr)
      for k, v in scores.image.items()
    },
    "maps": {
      k: thresholds.calibrate(v, config.eval.pixel_fpr)
      for k, v in scores.maps.items()
    },
  }


def _count(scores) -> int:
  return int(len(next(iter(scores.image.values()))))


def cross_fit_stages(fit, embeddings: dict, folds: int) -> tuple[list, Any]:
  """(the stage fitted without each fold, each example's fold): `fit`
  (a method's `fit`) on the embeddings of the other folds, on the host."""
  num = len(next(iter(embeddings.values())))
  fold = thresholds.fold_ids(num, folds)
  stages = [
    jax.device_get(fit({k: v[fold != j] for k, v in embeddings.items()}))
    for j in range(folds)
  ]
  return stages, fold


def pick_folds(per_stage: list, fold) -> Any:
  """Each example's output from the stage its `fold` indexes: `per_stage`
  holds one pytree of [B, ...] arrays per stage."""
  rows = np.arange(len(fold))
  return jax.tree.map(lambda *s: np.stack(s)[fold, rows], *per_stage)


def _cross_fit_scores(run: run_lib.Run, state, fitted, embeddings):
  """Scores of the normal training images, each from the stage fitted
  without its fold; images past `eval.max_fit_examples` (never fitted on)
  from the full stage `fitted`."""
  config = run.config
  stages, fold = cross_fit_stages(
    run.method.fit, embeddings, config.eval.calibration_folds
  )
  stages = parallel.replicate(run.mesh, stages + [jax.device_get(fitted)])
  fn = jax.jit(
    lambda state, stages, batch: [
      run.method.score(state, s, batch) for s in stages
    ],
    out_shardings=parallel.replicated(run.mesh),
  )
  batches = data.eval_batches(config, "train", config.eval.batch_size)
  parts, seen = [], 0
  for per_stage, _ in _host_batches(fn, (state, stages), batches, run.mesh):
    index = np.arange(seen, seen + _count(per_stage[0]))
    seen += len(index)
    full = np.full(len(index), len(stages) - 1)
    inside = index < len(fold)
    full[inside] = fold[index[inside]]
    parts.append(pick_folds(per_stage, full))
  return _concat(parts)


def calibrate(run: run_lib.Run, state, fitted, embeddings=None) -> dict:
  """Thresholds and normalisation statistics from normal images.

  'holdout' (`eval.calibration`) scores the held-out normal images (the
  training ones when none are held out). 'cross_fit' pools those with
  every normal training image scored by the stage fitted without its fold
  (`eval.calibration_folds`), which needs `embeddings` (what `fit` was
  fitted on) and a method with a fitted stage. Returns {'split',
  'num_images', 'image': {scorer: stats}, 'maps': {name: stats}} with
  `thresholds.calibrate`'s stats.
  """
  config = run.config
  kind = calibration_kind(config)
  split = "holdout" if run.info.num_holdout else "train"
  if kind == "cross_fit":
    if not embeddings:
      raise ConfigError(
        f"config.eval.calibration='cross_fit': {config.method} has no "
        "fitted stage to cross-fit; use 'holdout' (data.holdout_fraction)."
      )
    scores = _cross_fit_scores(run, state, fitted, embeddings)
    if run.info.num_holdout:
      batches = data.eval_batches(config, "holdout", config.eval.batch_size)
      held, _ = _collect(score_fn(run), (state, fitted), batches, run.mesh)
      scores = _concat([scores, held])
    split = (
      "train (cross-fit) + holdout"
      if run.info.num_holdout
      else ("train (cross-fit)")
    )
  else:
    batches = data.eval_batches(config, split, config.eval.batch_size)
    scores, _ = _collect(score_fn(run), (state, fitted), batches, run.mesh)
  return {
    "split": split,
    "kind": kind,
    "num_images": _count(scores),
    **_stats(config, scores),
  }


def refit_command(workdir) -> str:
  """The command that fits `workdir`'s stage anew."""
  return f"python -m jax_oneclass.main --workdir={workdir} --mode=eval --refit"


def _saved_stage(run: run_lib.Run, store, step: int, repair: bool):
  """(fitted, calibration, meta) saved for checkpoint `step`, or None when
  there is none or, with `repair`, it fails verification (a warning says
  so; it is fitted anew). Without `repair` a failing stage raises a
  CheckpointError saying how to refit, and one saved before stages had
  checksums is used with a warning."""
  if not store.has(step):
    return None
  path = store.directory / str(step)
  problem = store.problem(
    step, checkpointing.checksums_digest(run.checkpointer.directory / str(step))
  )
  if problem == checkpointing.UNVERIFIED and not repair:
    logging_utils.warn(
      f"The fitted stage at {path} {problem}: using it "
      f"unverified. Run {refit_command(run.workdir)} to "
      "fit it anew with checksums."
    )
    problem = None
  if problem is None:
    try:
      return store.restore(step)
    except CheckpointError as e:
      problem = f"cannot be read ({str(e.__cause__ or e)[:200]})"
  if not repair:
    raise CheckpointError(
      f"The fitted stage at {path} {problem}. Fit it "
      f"anew: {refit_command(run.workdir)}"
    )
  logging_utils.warn(f"The fitted stage at {path} {problem}: fitting it anew.")
  return None


def load_or_fit(
  run: run_lib.Run,
  state,
  step: int,
  refit: bool = False,
  repair: bool = True,
  pixel_mean: bool = False,
) -> FittedStage:
  """The saved fitted stage of checkpoint `step`, else fitted now and saved.

  `refit` fits anew even when one is saved; `repair` (see `_saved_stage`)
  fits anew a saved one that fails verification instead of refusing it.
  With `pixel_mean`, the stage also holds the mean normal training image,
  from the same pass over the training images as the fit.
  """
  store = checkpointing.FittedStore(run.workdir / "fitted")
  mean = None
  try:
    saved = None if refit else _saved_stage(run, store, step, repair)
    if (
      saved is not None
      and repair
      and saved[1].get("kind", "holdout") != (calibration_kind(run.config))
    ):
      logging_utils.info(
        f"The stage saved for step {step} was calibrated by "
        f"{saved[1].get('kind', 'holdout')!r}, not eval.calibration="
        f"{calibration_kind(run.config)!r}: fitting it anew."
      )
      saved = None
    if saved is not None:
      fitted, calibration, meta = saved
      logging_utils.info(f"Using the fitted stage saved for step {step}.")
      num_fit = int(meta.get("num_fit", 0))
      if pixel_mean:
        _, mean = _train_pass(run, state, embed=False, pixel_mean=True)
    else:
      if not refit and not store.has(step):
        logging_utils.info(
          f"No fitted stage saved for step {step}: fitting "
          "it on the normal training images."
        )
      start = time.perf_counter()
      embeddings, mean = _train_pass(
        run, state, _has_fitted_stage(run, state), pixel_mean
      )
      fitted, num_fit = _fit_embeddings(run, embeddings)
      fitted = jax.device_get(fitted)
      calibration = calibrate(
        run, state, parallel.replicate(run.mesh, fitted), embeddings
      )
      if logging_utils.writable(store.directory.parent):
        store.save(
          step,
          fitted,
          calibration,
          {
            "step": int(step),
            "num_fit": num_fit,
            "method": run.config.method,
            "fit_seconds": round(time.perf_counter() - start, 2),
          },
          checkpointing.checksums_digest(
            run.checkpointer.directory / str(step)
          ),
        )
      else:
        logging_utils.info(
          f"{run.workdir} is read-only: the fitted stage "
          "is not saved and will be fitted again next time."
        )
  finally:
    store.close()
  return FittedStage(
    parallel.replicate(run.mesh, fitted), calibration, num_fit, mean
  )


PIXEL_BASELINE = (
  "pixel_baseline: squared distance of a test image's raw "
  "pixels (the model input) to the mean normal training "
  "image"
)


def mean_train_image(run: run_lib.Run) -> np.ndarray:
  """The mean of the first `eval.max_fit_examples` normal training images
  [H, W, C], as the model takes them."""
  return _train_pass(run, None, embed=False, pixel_mean=True)[1]


def pixel_distance_fn(run: run_lib.Run):
  """`(mean, batch) -> [B]` squared distances of the batch's images to the
  mean image (replicated over the run's mesh), jitted, outputs replicated."""
  return jax.jit(
    lambda m, batch: jnp.sum(
      jnp.square(batch["image"] - m), axis=tuple(range(1, batch["image"].ndim))
    ),
    out_shardings=parallel.replicated(run.mesh),
  )


def pixel_baseline(run: run_lib.Run) -> np.ndarray:
  """Per test image, the squared pixel distance to the mean normal training
  image: a detector with nothing learned, to compare the scorers with.
  (`evaluate_run` computes it within its own passes.)"""
  config = run.config
  mean = parallel.replicate(run.mesh, jnp.asarray(mean_train_image(run)))
  scores, _ = _collect(
    pixel_distance_fn(run),
    (mean,),
    data.eval_batches(config, "test", config.eval.batch_size),
    run.mesh,
  )
  return scores


def headline_scorer(config, scorers) -> str:
  """`config.eval.scorer`, checked against the method's scorers."""
  name = config.eval.get("scorer", "")
  if not name:
    return sorted(scorers)[0]
  if name not in scorers:
    raise ConfigError(
      f"config.eval.scorer={name!r} is not a score of {config.method}; "
      f"choose one of {', '.join(sorted(scorers))}."
    )
  return name


def calibration_summary(config, calib: dict) -> dict:
  """What the thresholds rest on: the normal images' split and number, the
  asked false-positive rates, and the smallest one `num_images` images
  resolve (1/n). Warns when eval.fpr is below it."""
  num_images = int(calib["num_images"])
  summary = {
    "split": calib["split"],
    "num_images": num_images,
    "min_fpr": 1.0 / max(num_images, 1),
    "fpr": float(config.eval.fpr),
    "pixel_fpr": float(config.eval.pixel_fpr),
  }
  if 0 < summary["fpr"] < summary["min_fpr"]:
    logging_utils.warn(
      f"eval.fpr={summary['fpr']:g} is below 1/{num_images} = "
      f"{summary['min_fpr']:.4g}, the smallest false-positive rate "
      f"{num_images} {calib['split']} images resolve: the thresholds sit "
      "at the highest normal score. Hold out more normal images "
      "(data.holdout_fraction), calibrate on all of them "
      "(eval.calibration='cross_fit') or raise eval.fpr."
    )
  return summary


def _threshold_report(scores, labels, stats) -> dict:
  """Held-out threshold and its test metrics, and the test-optimal F1."""
  best, best_f1 = thresholds.f1_optimal_threshold(scores, labels)
  return {
    **stats,
    "at_threshold": thresholds.binary_metrics(
      scores, labels, stats["threshold"]
    ),
    "f1_optimal_on_test": {
      "threshold": best,
      "f1": best_f1,
      "note": "chosen on the labelled test split; not a deployable threshold",
    },
  }


def _write_scores_csv(
  path: Path, scores: dict, labels: dict, headline: str, calibration: dict
) -> None:
  """One row per test image: every raw score, and the headline's
  normalised score and predicted label."""
  names = (
    data.decode_filenames(labels["filename"])
    if "filename" in labels
    else [""] * len(labels["is_anomaly"])
  )
  stats = calibration["image"][headline]
  normalized = thresholds.normalize(scores[headline], stats)
  scorers = sorted(scores)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(
      [
        "index",
        "filename",
        "label",
        "is_anomaly",
        *scorers,
        f"{headline}:normalized",
        "predicted_anomaly",
      ]
    )
    for i, name in enumerate(names):
      writer.writerow(
        [
          i,
          name,
          int(labels["label"][i]),
          int(labels["is_anomaly"][i]),
          *(f"{float(scores[s][i]):.7g}" for s in scorers),
          f"{normalized[i]:.6f}",
          int(scores[headline][i] > stats["threshold"]),
        ]
      )


def evaluate(config, workdir, refit: bool = False, output_dir=None) -> dict:
  """Scores the test split with the workdir's newest checkpoint (see
  `evaluate_run` for `output_dir`)."""
  run = run_lib.setup(config, workdir, mode="eval")
  writes = output_dir is None and logging_utils.writable(workdir)
  try:
    with (
      workdir_lock.held(workdir, "evaluation")
      if writes
      else contextlib.nullcontext()
    ):
      state, step = run_lib.restore_latest(run)
      return evaluate_run(run, state, step, refit=refit, output_dir=output_dir)
  finally:
    run.checkpointer.close()


def evaluate_run(
  run: run_lib.Run, state, step, refit: bool = False, output_dir=None
) -> dict:
  """Fits (or loads) the stage, scores the test split, writes the results.

  Writes results.json (AUROC per scorer; thresholds and F1 / precision /
  recall per scorer; pixel AUROC, AUPRO and pixel thresholds per map),
  test_scores.csv, and pictures (visualizations/, plots/) to `output_dir`
  (default: the workdir; False: nothing is written); returns the results.
  """
  config, info = run.config, run.info
  out = None if output_dir is False else Path(output_dir or run.workdir)
  if out is not None and not logging_utils.writable(out):
    raise ConfigError(
      f"Cannot write the results to {out} (read-only or no "
      "permission): pass --results_path=<a writable folder>."
    )
  start = time.perf_counter()
  stage = load_or_fit(run, state, step, refit, pixel_mean=True)
  logging_utils.info(f"Scoring the {info.num_test} test images...")
  test_batches = data.eval_batches(config, "test", config.eval.batch_size)
  bar = logging_utils.progress_bar(
    info.num_test, "images", enabled=config.get("progress_bar", True)
  )
  score, distance = score_fn(run), pixel_distance_fn(run)
  mean = parallel.replicate(run.mesh, jnp.asarray(stage.pixel_mean))
  (scores, baseline), labels = _collect(
    lambda batch: (score(state, stage.fitted, batch), distance(mean, batch)),
    (),
    test_batches,
    run.mesh,
    num_images=max(int(config.eval.get("num_overlays", 0)), 0),
    bar=bar,
  )
  bar.close()
  headline = headline_scorer(config, scores.image)
  is_anomaly = labels["is_anomaly"]
  calib = stage.calibration
  aurocs = {
    name: metrics.auroc(s, is_anomaly)
    for name, s in sorted(scores.image.items())
  }
  image_thresholds = {
    name: _threshold_report(s, is_anomaly, calib["image"][name])
    for name, s in sorted(scores.image.items())
  }
  pixel = {}
  if scores.maps and "pixel_mask" in labels:
    masks = labels["pixel_mask"]
    pixel = {
      name: {
        "pixel_auroc": metrics.pixel_auroc(m, masks),
        "aupro": metrics.aupro(m, masks),
        "threshold": _threshold_report(m, masks, calib["maps"][name]),
      }
      for name, m in sorted(scores.maps.items())
    }

  results = {
    "method": config.method,
    "data": config.data.name,
    "normal_class": config.data.normal_class,
    "class_name": info.class_names[config.data.normal_class],
    "protocol": config.data.protocol,
    "step": int(step or 0),
    "num_fit": int(stage.num_fit),
    "num_test": int(len(is_anomaly)),
    "num_anomalous": int(is_anomaly.sum()),
    "scorer": headline,
    "auroc": aurocs,
    "image_metrics": image_thresholds[headline]["at_threshold"],
    "calibration": calibration_summary(config, calib),
    "thresholds": image_thresholds,
    "pixel_baseline": {
      "auroc": metrics.auroc(baseline, is_anomaly),
      "note": PIXEL_BASELINE,
    },
    **({"localization": pixel} if pixel else {}),
    "eval_seconds": round(time.perf_counter() - start, 2),
  }
  if out is not None:
    logging_utils.write_json(out / "results.json", results)
    if logging_utils.is_main_process():
      _write_scores_csv(
        out / "test_scores.csv", scores.image, labels, headline, calib
      )
      _draw(out, config, scores, labels, headline, calib, aurocs)
  if logging_utils.writable(run.workdir / "tensorboard"):
    writer = logging_utils.MetricWriter(run.workdir / "tensorboard" / "eval")
    writer.write_scalars(
      results["step"],
      {
        **{f"auroc/{k}": v for k, v in aurocs.items()},
        **{
          f"f1/{k}": v["at_threshold"]["f1"]
          for k, v in image_thresholds.items()
        },
        **{
          f"{metric}/{k}": v
          for k, per in pixel.items()
          for metric, v in per.items()
          if metric != "threshold"
        },
      },
    )
    writer.close()
  return results


def _draw(
  out: Path, config, scores, labels, headline: str, calib: dict, aurocs: dict
) -> None:
  """The first test images' panels and, with eval.plots, each scorer's
  ROC curve and score histogram."""
  if "image" in labels:
    count = len(labels["image"])
    names = (
      data.decode_filenames(labels["filename"][:count])
      if "filename" in labels
      else [f"test image {i}" for i in range(count)]
    )
    map_name = interface.headline_map(headline, scores.maps)
    visualize.save_panels(
      out / "visualizations",
      labels["image"],
      names,
      scores.image[headline][:count],
      calib["image"][headline],
      headline,
      maps=None if map_name is None else scores.maps[map_name][:count],
      map_calibration=None if map_name is None else calib["maps"][map_name],
      masks=labels.get("pixel_mask", [None] * count)[:count],
      is_anomaly=labels["is_anomaly"][:count],
    )
  if config.eval.get("plots", True):
    for name, values in scores.image.items():
      visualize.save_score_plot(
        out / "plots" / f"{name.replace('/', '_')}.png",
        values,
        labels["is_anomaly"],
        calib["image"][name]["threshold"],
        f"{config.method}: {name} (AUROC {aurocs[name]:.4f})",
      )
