"""Evaluation: fit the non-gradient stage, score the test set, AUROC.

Every test image is scored exactly once: the last batch is padded with
masked examples, never dropped, since dropped images change AUROC.
"""

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_oneclass import data, logging_utils, metrics, parallel
from jax_oneclass.errors import CheckpointError


def _collect(fn, state, extra, batches, mesh) -> tuple[dict, dict]:
  """Runs `fn(state, *extra, batch)` over batches; host arrays, masked.

  Returns (outputs, labels): per-example outputs of `fn` and the batches'
  'is_anomaly' and 'label', with padding removed.
  """
  # Labels and masks are split over hosts; an identity jit replicates them.
  gather = jax.jit(lambda b: b, out_shardings=parallel.replicated(mesh))
  outputs, labels = [], []
  for local in batches:
    batch = parallel.shard_batch(mesh, local)
    out = parallel.to_host(fn(state, *extra, batch))
    keep = parallel.to_host(
        gather({k: batch[k] for k in ("mask", "is_anomaly", "label")}))
    mask = keep["mask"].astype(bool)
    outputs.append({k: v[mask] for k, v in out.items()})
    labels.append({k: keep[k][mask] for k in ("is_anomaly", "label")})
  cat = lambda parts: {k: np.concatenate([p[k] for p in parts])
                       for k in parts[0]} if parts else {}
  return cat(outputs), cat(labels)


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

  score_fn = jax.jit(method.score, out_shardings=repl)
  test_batches = data.eval_batches(config, "test", config.eval.batch_size)
  scores, labels = _collect(score_fn, state, (fitted,), test_batches, mesh)
  aurocs = {name: metrics.auroc(s, labels["is_anomaly"])
            for name, s in sorted(scores.items())}

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
      "eval_seconds": round(time.perf_counter() - start, 2),
  }
  logging_utils.write_json(workdir / "results.json", results)
  writer = logging_utils.MetricWriter(workdir / "tensorboard" / "eval")
  writer.write_scalars(results["step"],
                       {f"auroc/{k}": v for k, v in aurocs.items()})
  writer.close()
  return results
