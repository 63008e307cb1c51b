"""Which points should gradient preference's repository keep? A study on
the synthetic MVTec-shaped CIFAR-10 set (experiments/make_mvtec_like.py;
NOT MVTec AD), in one process on precomputed backbone features.

Per category: the frozen backbone's patch points (the GP config's layers
and neighbourhood) of the good training images and of the test images;
then, per selection rule, the repository (per image `--fraction` of its
points), a centre-constrained MLP trained on exactly those points
(`--steps` Adam steps of the config's learning rate on 16 images' points,
the centre the mean initial output of the first `center_steps` batches;
no early stopping), and the image / pixel AUROC of the smoothed
nearest-neighbour map in the MLP's space (the method's nn_max and its map).

Rules: the new order's criterion (spatial gradient of the feature map, raw
or divided by the feature's norm), the old one (the per-point gradient norm
of the centre loss under an MLP first trained on ALL points, over all
layers or only the first or last layer's weights, raw or divided by
||x||), each preferring the largest or the smallest values, for all of the
repository (preferred_fraction 1) or half of it (0.5, the rest uniform),
next to a uniform repository and all points; the old criterion also as the
old code selected, over all images' points at once instead of per image. For the old criterion the
study also reports what it correlates with (Spearman): the feature norm,
the distance to the centre after training, the distance to the nearest
point of the other training images (isolation), and the share of the
largest-gradient points that lie on the grid's border.

  python experiments/gp_selector_study.py --categories=automobile,horse --steps=200
"""

import argparse
import json
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from experiments import common  # pylint: disable=g-import-not-at-top
from experiments.localization_quality import ensure_folder
from jax_oneclass import data, metrics
from jax_oneclass.components import anomaly_map, knn
from jax_oneclass.methods.gradient_preference import center_mlp
from jax_oneclass.methods.gradient_preference import method as gp
from jax_oneclass.methods.gradient_preference import repository

SCRIPT = "python experiments/gp_selector_study.py"
PART = "gp_selector_study"


def _config(args, category):
  arg = (f"mvtec,folder={args.folder},category={category},"
         f"data_dir={args.data_dir}")
  return common.config_with("gradient_preference", arg, {
      "data.image_size": args.image_size, "model.backbone": "resnet18",
      "model.pretrained": args.pretrained})


def _split(config, state, method, split):
  """Patch points [N, h, w, D], labels, pixel masks of one split."""
  points, labels, masks = [], [], []
  embed = jax.jit(method._points)  # pylint: disable=protected-access
  for batch in data.eval_batches(config, split, 32):
    keep = batch["mask"]
    points.append(np.asarray(embed(state.backbone, batch["image"]))[keep])
    labels.append(batch["is_anomaly"][keep])
    if "pixel_mask" in batch:
      masks.append(batch["pixel_mask"][keep])
  return (np.concatenate(points), np.concatenate(labels),
          np.concatenate(masks) if masks else None)


def train_mlp(config, points, seed, steps):
  """(weights, centre) of the centre-constrained MLP on `points`
  [N, m, D] (per image), batches of 16 images cycling in a seeded order."""
  rng = np.random.default_rng(seed)
  weights = center_mlp.init_mlp(jax.random.key(seed), points.shape[-1],
                                tuple(config.model.mlp_widths))
  tx = optax.adam(config.optimizer.learning_rate)
  opt_state = tx.init(weights)
  order = np.concatenate([rng.permutation(len(points))
                          for _ in range(steps * 16 // len(points) + 2)])
  batch = lambda i: jnp.asarray(
      points[order[16 * i:16 * i + 16]].reshape(-1, points.shape[-1]))
  warmup = int(config.center_steps)
  center = np.mean([np.asarray(center_mlp.mlp_apply(weights, batch(i))).mean(0)
                    for i in range(warmup)], axis=0)

  @jax.jit
  def step(weights, opt_state, x):
    grads = jax.grad(center_mlp.center_loss)(weights, center, x)
    updates, opt_state = tx.update(grads, opt_state, weights)
    return optax.apply_updates(weights, updates), opt_state

  for i in range(warmup, steps):
    weights, opt_state = step(weights, opt_state, batch(i))
  return weights, jnp.asarray(center)


def layer_gradient_norms(weights, center, x, layer):
  """[N] per-point gradient norm of ||f(x) - c||^2 w.r.t. one layer's
  weights ('first' or 'last'), or all of them ('all')."""
  if layer == "all":
    return center_mlp.per_point_gradient_norms(weights, center, x)
  out, inputs, pre = center_mlp._forward(weights, x)  # pylint: disable=protected-access
  delta = 2.0 * (out - center)
  last = len(weights) - 1
  if layer == "last":
    return (jnp.linalg.norm(delta, axis=-1)
            * jnp.linalg.norm(inputs[last], axis=-1))
  for i in range(last, 0, -1):
    delta = (delta @ weights[f"dense_{i}"].T) * (pre[i - 1] > 0)
  return jnp.linalg.norm(delta, axis=-1) * jnp.linalg.norm(inputs[0], axis=-1)


def _pick(scores, fraction, preferred_fraction, prefer, seed):
  """[N, h*w] per-point scores -> [N, m] indices, as repository.py picks."""
  kept, preferred = repository.sizes(scores.shape[1], types.SimpleNamespace(
      fraction=fraction, preferred_fraction=preferred_fraction))
  signed = scores if prefer == "largest" else -scores
  first = np.argsort(-signed, axis=1, kind="stable")[:, :preferred]
  noise = np.random.default_rng(seed).random(scores.shape[1])
  rest = []
  for row, taken in zip(signed, first):
    free = np.setdiff1d(np.arange(len(row)), taken)
    order = np.argsort(-noise[free], kind="stable")
    rest.append(free[order[:kept - preferred]])
  return np.concatenate([first, np.stack(rest)], axis=1)


def _pick_global(scores, fraction, preferred_fraction, seed):
  """The selection before 2026-12: over ALL training points at once, the
  `preferred_fraction` of `fraction` of them with the largest scores, the
  rest uniform; -> flat indices."""
  flat = scores.reshape(-1)
  size = max(int(round(fraction * len(flat))), 1)
  preferred = int(round(preferred_fraction * size))
  order = np.argsort(-flat, kind="stable")
  rng = np.random.default_rng(seed)
  rest = rng.choice(order[preferred:], size - preferred, replace=False)
  return np.concatenate([order[:preferred], np.sort(rest)])


def evaluate(config, train_sel, test_points, labels, masks, seed, steps):
  """(image AUROC, pixel AUROC) of the method trained on `train_sel`."""
  weights, _ = train_mlp(config, train_sel, seed, steps)
  bank = knn.build_bank(np.asarray(center_mlp.mlp_apply(
      weights, jnp.asarray(train_sel.reshape(-1, train_sel.shape[-1])))))
  grid = test_points.shape[:3]
  mapped = center_mlp.mlp_apply(
      weights, jnp.asarray(test_points.reshape(-1, test_points.shape[-1])))
  distances = knn.nearest_distance(bank, mapped, k=1).reshape(grid)
  size = config.data.image_size
  maps = np.asarray(anomaly_map.anomaly_map(distances, (size, size),
                                            sigma=config.eval.map_sigma))
  image = metrics.auroc(maps.reshape(len(maps), -1).max(1), labels)
  return image, metrics.pixel_auroc(maps, masks)


def study(args, category) -> dict:
  """Every rule on one category; diagnostics of the old criterion."""
  config = _config(args, category)
  info = data.dataset_info(config)
  method = gp.Method(config, info)
  state = method.init_state(jax.random.key(config.seed), info.image_shape)
  train, _, _ = _split(config, state, method, "train")
  test, labels, masks = _split(config, state, method, "test")
  n, h, w, dim = train.shape
  flat = train.reshape(n, h * w, dim)
  out = {"num_train": n, "grid": [h, w], "dim": dim, "rows": {}}

  # The old order: an MLP on all points, then its gradients.
  weights, center = train_mlp(config, flat, config.seed, args.steps)
  x = jnp.asarray(flat.reshape(-1, dim))
  criteria = {}
  for layer in ("all", "first", "last"):
    g = np.asarray(layer_gradient_norms(weights, center, x, layer))
    criteria[f"old: trained-MLP gradient, {layer} layer(s)"] = g.reshape(n, -1)
  norm = np.linalg.norm(flat, axis=-1)
  criteria["old: trained-MLP gradient / ||x||"] = (
      criteria["old: trained-MLP gradient, all layer(s)"] / norm)
  for normalize in (False, True):
    label = ("new: feature-map spatial gradient"
             + (" / ||x||" if normalize else ""))
    criteria[label] = np.asarray(repository.feature_gradient(
        jnp.asarray(train), normalize)).reshape(n, -1)

  old = criteria["old: trained-MLP gradient, all layer(s)"].reshape(-1)
  to_center = np.linalg.norm(np.asarray(center_mlp.mlp_apply(weights, x))
                             - np.asarray(center), axis=-1)
  sample = np.random.default_rng(0).choice(len(old), min(1500, len(old)),
                                           replace=False)
  image_of = np.repeat(np.arange(n), h * w)
  # Squared distance to the nearest point of the OTHER training images.
  points = flat.reshape(-1, dim).astype(np.float32)
  queries = points[sample]
  squared = ((queries**2).sum(1)[:, None] - 2 * queries @ points.T
             + (points**2).sum(1)[None])
  squared[image_of[sample][:, None] == image_of[None]] = np.inf
  isolation = squared.min(1)
  border = np.zeros((h, w), bool)
  border[[0, -1], :] = border[:, [0, -1]] = True
  top = np.argsort(-old)[:len(old) // 10]
  out["old_criterion"] = {
      "spearman_feature_norm": stats.spearmanr(old, norm.reshape(-1))[0],
      "spearman_distance_to_center": stats.spearmanr(old, to_center)[0],
      "spearman_isolation": stats.spearmanr(old[sample], isolation)[0],
      "spearman_new_criterion": stats.spearmanr(
          old, criteria["new: feature-map spatial gradient"].reshape(-1))[0],
      "border_share_top10pct": float(
          np.tile(border.reshape(-1), n)[top].mean()),
      "border_share_all": float(border.mean())}
  print(category, json.dumps(out["old_criterion"]), flush=True)

  def run(label, index):
    start = time.perf_counter()
    chosen = np.take_along_axis(flat, index[..., None], axis=1)
    image, pixel = evaluate(config, chosen, test, labels, masks, config.seed,
                            args.steps)
    out["rows"][label] = {"image_auroc": image, "pixel_auroc": pixel}
    print(f"{category} | {label} | {image:.3f} | {pixel:.3f} | "
          f"{time.perf_counter() - start:.1f} s", flush=True)

  old_all = criteria["old: trained-MLP gradient, all layer(s)"]
  for share in (1.0, 0.5):
    # Chunks of m points in a seeded order stand in for images while the
    # MLP trains (a global selection keeps unequal numbers per image).
    chosen = _pick_global(old_all, args.fraction, share, config.seed)
    kept = repository.sizes(h * w, types.SimpleNamespace(
        fraction=args.fraction, preferred_fraction=share))[0]
    chosen = np.random.default_rng(config.seed).permutation(chosen)
    chosen = chosen[:len(chosen) // kept * kept].reshape(-1, kept)
    label = ("old: trained-MLP gradient, all layer(s), largest, over all "
             f"images (the old selection), preferred_fraction {share}")
    start = time.perf_counter()
    image, pixel = evaluate(config, flat.reshape(-1, dim)[chosen], test,
                            labels, masks, config.seed, args.steps)
    out["rows"][label] = {"image_auroc": image, "pixel_auroc": pixel}
    per_image = np.bincount(image_of[chosen.reshape(-1)], minlength=n)
    out.setdefault("old_global_images_covered", {})[str(share)] = float(
        (per_image > 0).mean())
    print(f"{category} | {label} | {image:.3f} | {pixel:.3f} | "
          f"{time.perf_counter() - start:.1f} s | images with a point: "
          f"{(per_image > 0).mean():.2f}", flush=True)
  uniform = np.zeros((n, h * w))
  run("uniform", _pick(uniform, args.fraction, 0.0, "largest", config.seed))
  run("all points", np.tile(np.arange(h * w), (n, 1)))
  if args.quick:
    return out
  for label, scores in criteria.items():
    for prefer in ("largest", "smallest"):
      for share in (1.0, 0.5):
        run(f"{label}, {prefer}, preferred_fraction {share}",
            _pick(scores, args.fraction, share, prefer, config.seed))
  return out


def render(result) -> str:
  """The RESULTS.md section."""
  cats = list(result["categories"])
  lines = [
      "## Gradient preference: which points the repository keeps", "",
      f"Command: `{result['command']}`. Synthetic MVTec-shaped CIFAR-10 set "
      f"at {result['image_size']}x{result['image_size']} (not MVTec AD), "
      "ResNet-18 backbone with "
      + (f"weights {result['pretrained']}" if result["pretrained"] else
         "RANDOM weights (no ImageNet weights on this machine)")
      + f", layer2+layer3 points; per image {result['fraction']:.0%} of "
      f"its points enter the repository; the centre-constrained MLP trains "
      f"{result['steps']} steps on exactly those points (in one process on "
      "precomputed features, no early stopping), and the image / pixel "
      "AUROC is that of the smoothed nearest-neighbour map in its space "
      "(nn_max). 'old' criteria need an MLP trained on all points first "
      "(the order before 2026-12), 'new' ones only the features.", "",
      "| rule | " + " | ".join(f"{c} image / pixel" for c in cats)
      + " | mean image / pixel |",
      "|---|" + "---|" * (len(cats) + 1)]
  labels = list(result["categories"][cats[0]]["rows"])
  best = {}
  for label in labels:
    cells, means = [], []
    for c in cats:
      r = result["categories"][c]["rows"][label]
      cells.append(f"{r['image_auroc']:.3f} / {r['pixel_auroc']:.3f}")
      means.append((r["image_auroc"], r["pixel_auroc"]))
    m = best[label] = np.mean(means, axis=0)
    lines.append(f"| {label} | " + " | ".join(cells)
                 + f" | **{m[0]:.3f}** / {m[1]:.3f} |")
  for i, name in enumerate(("image", "pixel")):
    top = max(best, key=lambda label: best[label][i])
    lines.append(f"{'' if i else chr(10)}Best mean {name} AUROC: {top} "
                 f"({best[top][i]:.3f}).")
  lines += ["", "Share of training images with at least one point in the "
            "old global selection (preferred_fraction 1 / 0.5): " + "; ".join(
                f"{c} " + " / ".join(
                    f"{v:.2f}" for _, v in sorted(result["categories"][c].get(
                        "old_global_images_covered", {}).items(),
                        reverse=True)) for c in cats) + ".",
            "", "What the old criterion (all layers) follows, Spearman "
            "correlation over the training points:", "",
            "| category | feature norm | distance to c | isolation | new "
            "criterion | border share of top 10% (all points) |",
            "|---|---|---|---|---|---|"]
  for c in cats:
    o = result["categories"][c]["old_criterion"]
    lines.append(
        f"| {c} | {o['spearman_feature_norm']:.2f} | "
        f"{o['spearman_distance_to_center']:.2f} | "
        f"{o['spearman_isolation']:.2f} | {o['spearman_new_criterion']:.2f} "
        f"| {o['border_share_top10pct']:.2f} ({o['border_share_all']:.2f}) |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--folder", default="/tmp/cifar_mvtec")
  parser.add_argument("--data_dir", default="/tmp/cifar_mvtec_tfds")
  parser.add_argument("--categories", default="automobile,horse",
                      type=lambda s: s.split(","))
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--fraction", type=float, default=0.1)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--pretrained", default="")
  parser.add_argument("--quick", action="store_true",
                      help="Only the old global selection, uniform and all.")
  parser.add_argument("--report", action="store_true",
                      help="Only rewrite the section from the saved JSON.")
  args = parser.parse_args()
  if not args.report:
    ensure_folder(Path(args.folder), args.categories)
    result = {"command": f"{SCRIPT} --categories={','.join(args.categories)}"
                         f" --steps={args.steps}",
              "image_size": args.image_size, "fraction": args.fraction,
              "steps": args.steps, "pretrained": args.pretrained,
              "categories": {c: study(args, c) for c in args.categories}}
    common.save_part(PART, result)
  result = json.loads((common.RESULTS_DIR / f"{PART}.json").read_text())
  print(common.write_section(PART, render(result)))


if __name__ == "__main__":
  main()
