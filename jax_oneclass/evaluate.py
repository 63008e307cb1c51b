"""Evaluation: fit the non-gradient stage, score the test set, AUROC.

Every test image is scored exactly once: the last batch is padded with
masked examples, never dropped, since dropped images change AUROC.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_oneclass import data, logging_utils, metrics, parallel, visualize
from jax_oneclass import run as run_lib

_LABEL_KEYS = ("mask", "is_anomaly", "label", "pixel_mask")


def _collect(fn, args, batches, mesh, num_images: int = 0):
  """Runs `fn(*args, batch)` over batches; host arrays, padding removed.

  Returns (outputs, labels): the per-example outputs of `fn` (a pytree of
  arrays with a leading batch axis) concatenated over batches, and the
  batches' 'is_anomaly', 'label' (and 'pixel_mask' if present); with
  `num_images`, labels also holds 'image': the first ones, gathered from
  every host like the labels.
  """
  # Labels and masks are split over hosts; an identity jit replicates them.
  gather = jax.jit(lambda b: b, out_shardings=parallel.replicated(mesh))
  outputs, labels, images = [], [], []
  for local in batches:
    batch = parallel.shard_batch(mesh, local)
    out = parallel.to_host(fn(*args, batch))
    label_keys = [k for k in _LABEL_KEYS if k in batch]
    if sum(len(i) for i in images) < num_images:
      label_keys.append("image")
    keep = parallel.to_host(gather({k: batch[k] for k in label_keys}))
    mask = keep.pop("mask").astype(bool)
    if "image" in keep:
      images.append(keep.pop("image")[mask])
    outputs.append(jax.tree.map(lambda v, m=mask: v[m], out))
    labels.append({k: v[mask] for k, v in keep.items()})
  concat = lambda *parts: np.concatenate(parts)
  labels = jax.tree.map(concat, *labels) if labels else {}
  if images:
    labels["image"] = np.concatenate(images)[:num_images]
  return (jax.tree.map(concat, *outputs) if outputs else None), labels


def _write_overlays(workdir, maps, labels) -> None:
  """Heat-map PNGs of the test images `_collect` kept (the first ones).

  Every host holds the same gathered images and maps; the first writes.
  """
  if jax.process_index() != 0 or "image" not in labels:
    return
  count = len(labels["image"])
  for name, m in maps.items():
    visualize.save_overlays(
        labels["image"], m[:count], labels["pixel_mask"][:count],
        workdir / "overlays" / name.replace("/", "_"))


def _has_fitted_stage(run: run_lib.Run, state) -> bool:
  """False when `method.embed` returns nothing, so the train pass is moot."""
  example = {"image": jax.ShapeDtypeStruct(
      (1,) + tuple(run.info.image_shape), jnp.float32)}
  return bool(jax.eval_shape(run.method.embed, state, example))


def fit(run: run_lib.Run, state):
  """The non-gradient stage fitted on the normal training images.

  Returns (fitted, replicated over the mesh; the number of images fitted on).
  """
  config, method = run.config, run.method
  embeddings, num_fit = {}, 0
  if _has_fitted_stage(run, state):
    embed_fn = jax.jit(method.embed,
                       out_shardings=parallel.replicated(run.mesh))
    train_batches = data.eval_batches(config, "train", config.eval.batch_size)
    embeddings, _ = _collect(embed_fn, (state,), train_batches, run.mesh)
    embeddings = {k: v[:config.eval.max_fit_examples]
                  for k, v in embeddings.items()}
    num_fit = len(next(iter(embeddings.values())))
  return parallel.replicate(run.mesh, method.fit(embeddings)), num_fit


def evaluate(config, workdir) -> dict:
  """Scores the test split with the workdir's newest checkpoint."""
  run = run_lib.setup(config, workdir)
  try:
    state, step = run_lib.restore_latest(run)
    return evaluate_run(run, state, step)
  finally:
    run.checkpointer.close()


def evaluate_run(run: run_lib.Run, state, step) -> dict:
  """Fits, scores the test split and writes results.json; returns it.

  The results dict maps each scorer to its AUROC under 'auroc', and each
  map to its pixel AUROC and AUPRO under 'localization'.
  """
  config, workdir, info = run.config, run.workdir, run.info
  start = time.perf_counter()
  fitted, num_fit = fit(run, state)

  score_fn = jax.jit(run.method.score,
                     out_shardings=parallel.replicated(run.mesh))
  test_batches = data.eval_batches(config, "test", config.eval.batch_size)
  scores, labels = _collect(
      score_fn, (state, fitted), test_batches, run.mesh,
      num_images=max(int(config.eval.get("num_overlays", 0)), 0))
  aurocs = {name: metrics.auroc(s, labels["is_anomaly"])
            for name, s in sorted(scores.image.items())}
  pixel = {}
  if scores.maps and "pixel_mask" in labels:
    pixel = {name: {"pixel_auroc": metrics.pixel_auroc(
                        m, labels["pixel_mask"]),
                    "aupro": metrics.aupro(m, labels["pixel_mask"])}
             for name, m in sorted(scores.maps.items())}
    _write_overlays(workdir, scores.maps, labels)

  results = {
      "method": config.method,
      "data": config.data.name,
      "normal_class": config.data.normal_class,
      "class_name": info.class_names[config.data.normal_class],
      "protocol": config.data.protocol,
      "step": int(step or 0),
      "num_fit": int(num_fit),
      "num_test": int(len(labels["is_anomaly"])),
      "num_anomalous": int(labels["is_anomaly"].sum()),
      "auroc": aurocs,
      **({"localization": pixel} if pixel else {}),
      "eval_seconds": round(time.perf_counter() - start, 2),
  }
  logging_utils.write_json(workdir / "results.json", results)
  writer = logging_utils.MetricWriter(workdir / "tensorboard" / "eval")
  writer.write_scalars(results["step"], {
      **{f"auroc/{k}": v for k, v in aurocs.items()},
      **{f"{metric}/{k}": v for k, per in pixel.items()
         for metric, v in per.items()}})
  writer.close()
  return results
