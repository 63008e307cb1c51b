"""Evaluation: fit the non-gradient stage, score the test set, AUROC.

Every test image is scored exactly once: the last batch is padded with
masked examples, never dropped, since dropped images change AUROC.
"""

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_oneclass import data, localization, logging_utils, metrics
from jax_oneclass import parallel
from jax_oneclass.errors import CheckpointError


_LABEL_KEYS = ("mask", "is_anomaly", "label", "pixel_mask")


def _collect(fn, state, extra, batches, mesh,
             num_images: int = 0) -> tuple[dict, dict]:
  """Runs `fn(state, *extra, batch)` over batches; host arrays, masked.

  Returns (outputs, labels): per-example outputs of `fn` and the batches'
  'is_anomaly', 'label' (and 'pixel_mask' if present), padding removed;
  with `num_images`, labels also holds 'image': the first ones, gathered
  from every host like the labels.
  """
  # Labels and masks are split over hosts; an identity jit replicates them.
  gather = jax.jit(lambda b: b, out_shardings=parallel.replicated(mesh))
  outputs, labels, images = [], [], []
  for local in batches:
    batch = parallel.shard_batch(mesh, local)
    out = parallel.to_host(fn(state, *extra, batch))
    label_keys = [k for k in _LABEL_KEYS if k in batch]
    if sum(len(i) for i in images) < num_images:
      label_keys.append("image")
    keep = parallel.to_host(gather({k: batch[k] for k in label_keys}))
    mask = keep.pop("mask").astype(bool)
    if "image" in keep:
      images.append(keep.pop("image")[mask])
    outputs.append({k: v[mask] for k, v in out.items()})
    labels.append({k: v[mask] for k, v in keep.items()})
  cat = lambda parts: {k: np.concatenate([p[k] for p in parts])
                       for k in parts[0]} if parts else {}
  labels = cat(labels)
  if images:
    labels["image"] = np.concatenate(images)[:num_images]
  return cat(outputs), labels


def _scores_and_maps(method):
  """`method.score`, plus 'map:<name>' entries for methods that localise.

  A method localises by offering `score_with_maps(state, fitted, batch) ->
  (scores, {name: [B, H, W]})`, maps at the input's resolution.
  """
  if not hasattr(method, "score_with_maps"):
    return method.score

  def fn(state, fitted, batch):
    scores, maps = method.score_with_maps(state, fitted, batch)
    return {**scores, **{f"map:{k}": v for k, v in maps.items()}}
  return fn


def _write_overlays(workdir, maps, labels) -> None:
  """Heat-map PNGs of the test images `_collect` kept (the first ones).

  Every host holds the same gathered images and maps; the first writes.
  """
  if jax.process_index() != 0 or "image" not in labels:
    return
  count = len(labels["image"])
  for name, m in maps.items():
    localization.save_overlays(
        labels["image"], m[:count], labels["pixel_mask"][:count],
        Path(workdir) / "overlays" / name.replace("/", "_"))


def _has_fitted_stage(method, state, info) -> bool:
  """False when `method.embed` returns nothing, so the train pass is moot."""
  example = {"image": jax.ShapeDtypeStruct((1,) + tuple(info.image_shape),
                                           jnp.float32)}
  return bool(jax.eval_shape(method.embed, state, example))


def evaluate(config, workdir, state=None) -> dict:
  """Scores the test split with the newest checkpoint; writes results.json.

  `config` may still have num_train_steps <= 0 (it is resolved here). The
  results dict maps each scorer to its AUROC under 'auroc'.
  """
  from jax_oneclass import train as train_lib  # pylint: disable=g-import-not-at-top
  workdir = Path(workdir)
  config, info, method, mesh, checkpointer = train_lib.setup(config, workdir)
  step = checkpointer.latest_step()
  if state is None:
    if step is None:
      raise CheckpointError(
          f"No checkpoint in {workdir / 'checkpoints'}: train first "
          "(--mode=train) or point --workdir at a trained run.")
    state, _ = checkpointer.restore(
        step, train_lib.initial_state(method, info, mesh, config.seed))
  checkpointer.close()
  repl = parallel.replicated(mesh)
  start = time.perf_counter()

  embeddings = {}
  if _has_fitted_stage(method, state, info):
    embed_fn = jax.jit(method.embed, out_shardings=repl)
    train_batches = data.eval_batches(config, "train", config.eval.batch_size)
    embeddings, _ = _collect(embed_fn, state, (), train_batches, mesh)
    embeddings = {k: v[:config.eval.max_fit_examples]
                  for k, v in embeddings.items()}
  fitted = parallel.replicate(mesh, method.fit(embeddings))

  score_fn = jax.jit(_scores_and_maps(method), out_shardings=repl)
  test_batches = data.eval_batches(config, "test", config.eval.batch_size)
  num_overlays = (int(config.eval.get("num_overlays", 0))
                  if hasattr(method, "score_with_maps") else 0)
  scores, labels = _collect(score_fn, state, (fitted,), test_batches, mesh,
                            num_images=max(num_overlays, 0))
  maps = {k[len("map:"):]: scores.pop(k) for k in list(scores)
          if k.startswith("map:")}
  aurocs = {name: metrics.auroc(s, labels["is_anomaly"])
            for name, s in sorted(scores.items())}
  pixel = {}
  if maps and "pixel_mask" in labels:
    pixel = {name: {"pixel_auroc": localization.pixel_auroc(
                        m, labels["pixel_mask"]),
                    "aupro": localization.aupro(m, labels["pixel_mask"])}
             for name, m in sorted(maps.items())}
    _write_overlays(workdir, maps, labels)

  results = {
      "method": config.method,
      "data": config.data.name,
      "normal_class": config.data.normal_class,
      "class_name": info.class_names[config.data.normal_class],
      "protocol": config.data.protocol,
      "step": int(step or 0),
      "num_fit": int(len(next(iter(embeddings.values()))) if embeddings
                     else 0),
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
