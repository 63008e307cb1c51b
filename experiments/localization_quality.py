"""Detection and localisation on the synthetic MVTec-shaped CIFAR-10 set.

Trains and evaluates reverse distillation and gradient preference (with and
without the gradient-preferred half of its repository) per category, on the
folder that experiments/make_mvtec_like.py writes (made here if missing),
and reports image AUROC, pixel AUROC and AUPRO in the
'localization_quality' section of RESULTS.md. It is NOT MVTec AD: see
experiments/README.md. No ImageNet weights exist on this machine, so every
backbone is randomly initialised unless --pretrained names a torchvision
file (then resnet18 weights are expected).

  python experiments/localization_quality.py run --categories=automobile,horse --steps=200
  python experiments/localization_quality.py self_supervised --categories=automobile,horse --steps=200 --ssl_steps=500
  python experiments/localization_quality.py two_stage --categories=automobile,horse --steps=200 --seeds=1,2
  python experiments/localization_quality.py matched --categories=automobile,horse --seeds=1,2 --budget_cpu_s=60
  python experiments/localization_quality.py report
"""

import argparse
import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common, measure  # pylint: disable=g-import-not-at-top

SCRIPT = "python experiments/localization_quality.py"
PART = "localization_quality"

# Row label -> (method, overrides beyond the shared budget).
VARIANTS = {
  "reverse_distillation": ("reverse_distillation", {}),
  "gradient_preference": ("gradient_preference", {}),
  "gradient_preference, random repository": (
    "gradient_preference",
    {"bank.preferred_fraction": 0.0},
  ),
  "gradient_preference, preferred points only": (
    "gradient_preference",
    {"bank.preferred_fraction": 1.0},
  ),
  "gradient_preference, largest feature gradients": (
    "gradient_preference",
    {"bank.prefer": "largest"},
  ),
}
# Rows of the runs before the 2026-12 reordering; newer runs skip it (the
# default already takes every point by the criterion).
_OLD_ONLY = ("gradient_preference, preferred points only",)
MAIN_SCORE = {
  "reverse_distillation": "map_max",
  "gradient_preference": "nn_max",
}


def ensure_folder(folder: Path, categories) -> None:
  """Writes the synthetic set with make_mvtec_like.py's defaults if absent."""
  missing = [c for c in categories if not (folder / c).is_dir()]
  if missing:
    subprocess.run(
      [
        sys.executable,
        str(common.ROOT / "experiments" / "make_mvtec_like.py"),
        f"--out={folder}",
        f"--categories={','.join(missing)}",
      ],
      check=True,
    )


def _budget(args) -> dict:
  """Overrides every localisation run shares: steps, batch, image size,
  the ResNet-18 backbone, one checkpoint at the end, overlays."""
  return {
    "num_train_steps": args.steps,
    "batch_size": args.batch_size,
    "data.image_size": args.image_size,
    "model.backbone": "resnet18",
    "checkpoint_every_steps": args.steps,
    "eval.num_overlays": 8,
  }


def _category_arg(args, category: str, preset: str = "mvtec") -> str:
  return (
    f"{preset},folder={args.folder},category={category},"
    f"data_dir={args.data_dir}"
  )


def _run(out, label, category, method, args, workdir, overrides) -> dict:
  """Trains and evaluates one run, files it under out['runs'] and logs it."""
  res = common.run_method(
    method, _category_arg(args, category), workdir, overrides
  )
  res["workdir"] = str(workdir)
  out["runs"].setdefault(label, {})[category] = res
  print(
    f"{category} {label}: {res['wall_seconds']} s, step "
    f"{res['step']}, {json.dumps(res['auroc'])}, "
    f"{json.dumps(res.get('localization'))}",
    flush=True,
  )
  return res


def part_run(args) -> dict:
  """Every variant on every category with the same step budget."""
  ensure_folder(Path(args.folder), args.categories)
  budget = {**_budget(args), "model.pretrained": args.pretrained}
  out = {
    "command": f"{SCRIPT} run --categories={','.join(args.categories)} "
    f"--steps={args.steps}",
    "budget": budget,
    "runs": {},
    "gp_order": "select_then_map",
  }
  for category in args.categories:
    for label, (method, extra) in VARIANTS.items():
      if label in _OLD_ONLY:
        continue
      workdir = Path(args.workdir_root) / category / label.replace(", ", "_")
      _run(out, label, category, method, args, workdir, {**budget, **extra})
  return out


def part_self_supervised(args) -> dict:
  """RD and gradient preference on a backbone that DisAug CLR trained on
  each category's good images (torchvision's ResNet-18 layout), instead of
  a random one; the DisAug run's own detection AUROC comes along."""
  ensure_folder(Path(args.folder), args.categories)
  ssl_budget = {
    "num_train_steps": args.ssl_steps,
    "data.image_size": args.image_size,
    "model.arch": "resnet18",
    "checkpoint_every_steps": args.ssl_steps,
  }
  budget = _budget(args)
  out = {
    "command": f"{SCRIPT} self_supervised --categories="
    f"{','.join(args.categories)} --steps={args.steps} "
    f"--ssl_steps={args.ssl_steps}",
    "ssl_budget": ssl_budget,
    "budget": budget,
    "runs": {},
  }
  for category in args.categories:
    root = Path(args.workdir_root) / category
    ssl_dir = root / "disaug_resnet18"
    _run(out, "disaug", category, "disaug", args, ssl_dir, ssl_budget)
    for method in ("reverse_distillation", "gradient_preference"):
      label = f"{method}, self-supervised backbone"
      _run(
        out,
        label,
        category,
        method,
        args,
        root / label.replace(", ", "_").replace(" ", "_"),
        {**budget, "model.pretrained": str(ssl_dir)},
      )
  return out


# The two-stage family's patch mode at this set's 64 px: 16 px patches
# (a quarter of the side, as the preset's 32 of 256 is an eighth, so that a
# patch still sees the object's context), corners every 8 px (7 x 7 = 49
# per image), maps and headline from `pool/gde/rot_avg`, fixed before the
# runs. Width 32 and 8,000 fitted patches bound the evaluation's cost.
TWO_STAGE_MAP = "pool/gde/rot_avg"
TWO_STAGE_PATCH = {
  "data.patch_size": 16,
  "eval.patch_stride": 8,
  "eval.patch_maps": (TWO_STAGE_MAP,),
  "eval.scorer": f"{TWO_STAGE_MAP}/map_max",
  "eval.max_fit_patches": 8000,
  "eval.batch_size": 16,
  "classifiers": {"gde": {}},
  "model.width": 32,
}
TWO_STAGE_METHODS = ("rotnet", "disaug")


def part_two_stage(args) -> dict:
  """RotNet and DisAug CLR in patch mode (maps from dense 16 px patches)
  with the steps and batch of the `run` rows, rendered beside RD and GP;
  one run per --seeds, runs already in the results file skipped."""
  ensure_folder(Path(args.folder), args.categories)
  budget = {
    "num_train_steps": args.steps,
    "checkpoint_every_steps": args.steps,
    **_two_stage_budget(args),
  }
  path = common.RESULTS_DIR / f"{PART}_two_stage.json"
  out = json.loads(path.read_text()) if path.exists() else {"runs": {}}
  out["budget"] = budget
  out["command"] = (
    f"{SCRIPT} two_stage --categories={','.join(args.categories)} "
    f"--steps={args.steps} --seeds={args.seeds}"
  )
  for category in args.categories:
    for method in TWO_STAGE_METHODS:
      for seed in args.seeds.split(","):
        done = out["runs"].setdefault(method, {}).setdefault(category, {})
        if seed in done:
          continue
        workdir = (
          Path(args.workdir_root) / category / f"{method}_patch_seed{seed}"
        )
        start = time.process_time()
        res = common.run_method(
          method,
          _category_arg(args, category, "mvtec_patch"),
          workdir,
          {**budget, "seed": int(seed)},
        )
        res["cpu_seconds"] = round(time.process_time() - start, 1)
        done[seed] = res
        common.save_part(f"{PART}_two_stage", out)
        print(
          f"{category} {method} seed {seed}: {res['wall_seconds']} s, "
          f"{json.dumps(res['auroc'])}, {json.dumps(res['localization'])}",
          flush=True,
        )
  return out


def _two_stage_budget(args) -> dict:
  """The two-stage patch runs' overrides beyond the train steps."""
  return {
    "batch_size": args.batch_size,
    "data.image_size": args.image_size,
    "eval.num_overlays": 8,
    **TWO_STAGE_PATCH,
  }


MATCHED_METHODS = (
  "rotnet",
  "disaug",
  "reverse_distillation",
  "gradient_preference",
)


def _matched_setting(method: str, args, category: str) -> tuple[str, dict]:
  """(config arg, overrides but the steps) of one method in `matched`:
  the two-stage family in patch mode as in `two_stage`, RD and GP as the
  `run` rows (random ResNet-18 backbone)."""
  if method in TWO_STAGE_METHODS:
    return _category_arg(args, category, "mvtec_patch"), _two_stage_budget(args)
  budget = {k: v for k, v in _budget(args).items() if k != "num_train_steps"}
  return _category_arg(args, category), {**budget, "model.pretrained": ""}


def part_matched(args) -> dict:
  """RotNet, DisAug CLR (patch mode), RD and GP with the same CPU time of
  train steps per run (--budget_cpu_s; steps from each method's median
  CPU-s per step, measured here on the first category's data before any
  run), one run per category x --seeds; runs already saved are skipped."""
  ensure_folder(Path(args.folder), args.categories)
  path = common.RESULTS_DIR / f"{PART}_matched.json"
  out = json.loads(path.read_text()) if path.exists() else {"runs": {}}
  if out.get("budget_cpu_s") not in (None, args.budget_cpu_s):
    raise SystemExit(
      f"{path} holds runs at --budget_cpu_s={out['budget_cpu_s']:g}: pass "
      "that budget, or move the file away to start again."
    )
  out["budget_cpu_s"] = args.budget_cpu_s
  out["command"] = (
    f"{SCRIPT} matched --categories={','.join(args.categories)} "
    f"--seeds={args.seeds} --budget_cpu_s={args.budget_cpu_s:g}"
  )
  calibration = out.setdefault("calibration", {})
  for method in MATCHED_METHODS:
    if method not in calibration:
      arg, overrides = _matched_setting(method, args, args.categories[0])
      calibration[method] = common.run_step_cpu_s(
        method, arg, {**overrides, "num_train_steps": 10}, steps=5, warmup=2
      )
      print(
        f"{method}: {calibration[method]['cpu_s_per_step']:.3f} CPU-s per step",
        flush=True,
      )
      common.save_part(f"{PART}_matched", out)
  out["steps"] = {
    m: max(1, round(args.budget_cpu_s / calibration[m]["cpu_s_per_step"]))
    for m in MATCHED_METHODS
  }
  out["machine"] = {**measure.machine(), "jaxlib": metadata.version("jaxlib")}
  for category in args.categories:
    for method in MATCHED_METHODS:
      for seed in args.seeds.split(","):
        done = out["runs"].setdefault(method, {}).setdefault(category, {})
        if seed in done:
          continue
        steps = out["steps"][method]
        arg, overrides = _matched_setting(method, args, category)
        workdir = (
          Path(args.workdir_root)
          / "matched"
          / category
          / f"{method}_seed{seed}"
        )
        start = time.process_time()
        res = common.run_method(
          method,
          arg,
          workdir,
          {
            **overrides,
            "num_train_steps": steps,
            "checkpoint_every_steps": steps,
            "seed": int(seed),
          },
        )
        res["cpu_seconds"] = round(time.process_time() - start, 1)
        res["workdir"] = str(workdir)
        done[seed] = res
        common.save_part(f"{PART}_matched", out)
        print(
          f"{category} {method} seed {seed}: {steps} steps, "
          f"{res['cpu_seconds']} CPU-s, {json.dumps(res['auroc'])}, "
          f"{json.dumps(res['localization'])}",
          flush=True,
        )
  return out


def _matched_figures(method: str, res: dict) -> tuple[float, float, float]:
  """(image AUROC of the headline, pixel AUROC, AUPRO) of any method."""
  if method in TWO_STAGE_METHODS:
    image, _, pixel, aupro = _two_stage_figures(res)
    return image, pixel, aupro
  return _figures(method, res)


def render_matched(result: dict) -> str:
  """The CPU-matched table: per method and category, mean ± half range
  over the seeds, then each method's mean over the categories."""
  m = result.get("machine", {})
  lines = [
    "### The same four methods at one CPU budget, two seeds",
    "",
    (
      f"Command: `{result['command']}`. Every run gets "
      f"{result['budget_cpu_s']:g} CPU-s of train steps: its steps are the "
      "budget over its median CPU-s per jitted train step, measured on "
      "real batches before any run (input pipeline not timed). RotNet and "
      "DisAug CLR in patch mode as in the table above; RD and GP as in the "
      "first table (random ResNet-18 backbone, main scores map_max and "
      "nn_max; GP may stop early). Cells: mean ± half the range over the "
      "seeds; CPU-s: the whole run's (train, its `prepare`, evaluation), "
      "mean over the seeds. All settings fixed before the runs. Machine: "
      f"{m.get('cpu', '?')}, jaxlib {m.get('jaxlib', '?')}, load "
      f"{m.get('load_average', ['?'])[0]} when the runs started."
    ),
    "",
    (
      "| method | CPU-s / step | steps | category | seeds | image AUROC | "
      "pixel AUROC | AUPRO | run CPU-s |"
    ),
    "|---|---|---|---|---|---|---|---|---|",
  ]
  means = {}
  methods = [m for m in MATCHED_METHODS if m in result["runs"]]
  for method in methods:
    for category, per_seed in result["runs"][method].items():
      figures = [_matched_figures(method, r) for r in per_seed.values()]
      means.setdefault(method, []).extend(figures)
      cpu = sum(r["cpu_seconds"] for r in per_seed.values()) / len(per_seed)
      steps = sorted({r["step"] for r in per_seed.values()})
      lines.append(
        f"| {method} | {result['calibration'][method]['cpu_s_per_step']:.3f}"
        f" | {','.join(map(str, steps))} | {category} | "
        f"{','.join(per_seed)} | "
        + " | ".join(_mean_spread([f[i] for f in figures]) for i in range(3))
        + f" | {cpu:.0f} |"
      )
  for method, figures in means.items():
    lines.append(
      f"| **{method}** | | | mean | | "
      + " | ".join(
        f"**{sum(f[i] for f in figures) / len(figures):.3f}**" for i in range(3)
      )
      + " | |"
    )
  return "\n".join(lines) + "\n"


def _two_stage_figures(res: dict) -> tuple[float, float, float, float]:
  """(map-max image AUROC, whole-image AUROC, pixel AUROC, AUPRO)."""
  pixel = res["localization"][TWO_STAGE_MAP]
  return (
    res["auroc"][f"{TWO_STAGE_MAP}/map_max"],
    res["auroc"].get(f"whole/{TWO_STAGE_MAP}", float("nan")),
    pixel["pixel_auroc"],
    pixel["aupro"],
  )


def _mean_spread(values) -> str:
  """'mean' of one value, 'mean ± half range' of several."""
  mean = sum(values) / len(values)
  if len(values) == 1:
    return f"{mean:.3f}"
  return f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f}"


def render_two_stage(result: dict, rows: dict) -> str:
  """Two-stage patch maps beside the RD / GP rows of the `run` part."""
  b = result["budget"]
  lines = [
    "### Two-stage patch maps beside RD and GP",
    "",
    f"Command: `{result['command']}`. RotNet and DisAug CLR in patch mode "
    f"(docs/two_stage.md#patch-mode), trained from scratch on the good "
    f"images for {b['num_train_steps']} steps of batch {b['batch_size']} "
    f"(the RD / GP rows' steps and batch) on {b['data.patch_size']} px "
    f"patches of the {b['data.image_size']} px images, ResNet-18 width "
    f"{b['model.width']}; test maps from patches every "
    f"{b['eval.patch_stride']} px, scored by `{TWO_STAGE_MAP}` (GDE on "
    f"{b['eval.max_fit_patches']} training patches), the mean of the "
    "patch scores covering each pixel. Image AUROC: the map's maximum "
    "(`/map_max`) and, beside it, the whole image resized to one patch "
    "(`whole/`). Two-stage rows: mean ± half the range over the training "
    "seeds (wall s: their mean). RD and GP: the table above (random "
    "backbone, one seed), their main scores. All settings fixed before "
    "the runs.",
    "",
    "| method | category | seeds | image AUROC (map max) | image AUROC "
    "(whole) | pixel AUROC | AUPRO | wall s |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for method, per_category in result["runs"].items():
    for category, per_seed in per_category.items():
      figures = [_two_stage_figures(r) for r in per_seed.values()]
      wall = sum(r["wall_seconds"] for r in per_seed.values()) / len(per_seed)
      lines.append(
        f"| {method} (patch) | {category} | {','.join(per_seed)} | "
        + " | ".join(_mean_spread([f[i] for f in figures]) for i in range(4))
        + f" | {wall:.1f} |"
      )
  for label in ("reverse_distillation", "gradient_preference"):
    for category, res in rows.get(label, {}).items():
      if category not in result["runs"].get(TWO_STAGE_METHODS[0], {}):
        continue
      image, pixel, aupro = _figures(label, res)
      lines.append(
        f"| {label} | {category} | one | {image:.3f} | | {pixel:.3f} | "
        f"{aupro:.3f} | {res['wall_seconds']} |"
      )
  return "\n".join(lines) + "\n"


def _figures(method: str, res: dict) -> tuple[float, float, float]:
  """(image AUROC of the method's main score, pixel AUROC, AUPRO)."""
  pixel = res["localization"]["anomaly_map"]
  return (
    res["auroc"][MAIN_SCORE[method]],
    pixel["pixel_auroc"],
    pixel["aupro"],
  )


def render_self_supervised(result: dict, random_rows: dict) -> str:
  """Rows with the DisAug-trained backbone next to the random-backbone ones."""
  b, s = result["budget"], result["ssl_budget"]
  lines = [
    "### The same with a self-supervised backbone",
    "",
    f"Command: `{result['command']}`. Per category, DisAug CLR "
    f"(`configs/disaug.py`, model.arch=resnet18) trains torchvision's "
    f"ResNet-18 layout on the good training images for "
    f"{s['num_train_steps']} steps at {s['data.image_size']}x"
    f"{s['data.image_size']}; RD and gradient preference then take its "
    f"workdir as model.pretrained (layer1..layer3), with the budget "
    f"above ({b['num_train_steps']} steps of batch {b['batch_size']}). "
    "The DisAug row is its own image-level detection (pool/gde/rot_avg, "
    "fixed before the run), no maps. With few categories and a short "
    "self-supervised run these are first data points, not conclusions.",
    "",
    "| method | backbone | image AUROC | pixel AUROC | AUPRO | wall s |",
    "|---|---|---|---|---|---|",
  ]
  for label, per_category in result["runs"].items():
    for category, res in per_category.items():
      if label == "disaug":
        lines.append(
          f"| disaug ({category}) | trained here | "
          f"{res['auroc']['pool/gde/rot_avg']:.3f} | | | "
          f"{res['wall_seconds']} |"
        )
        continue
      method = label.split(",")[0]
      compare = [
        (
          f"{method} ({category})",
          "random",
          random_rows.get(method, {}).get(category),
        ),
        (f"{method} ({category})", "self-supervised", res),
      ]
      for name, backbone, r in compare:
        if r is None:
          continue
        lines.append(
          f"| {name} | {backbone} | "
          + " | ".join(f"{v:.3f}" for v in _figures(method, r))
          + f" | {r['wall_seconds']} |"
        )
  return "\n".join(lines) + "\n"


def render(result: dict) -> str:
  """The section: one row per variant and category, then the means."""
  b = result["budget"]
  lines = [
    "## Localisation on a synthetic MVTec-shaped set (not MVTec AD)",
    "",
    f"Command: `{result['command']}`. CIFAR-10 images upscaled to "
    f"{b['data.image_size']}x{b['data.image_size']} with synthetic patch, "
    "scratch and stain defects and exact masks (experiments/README.md); "
    f"{b['num_train_steps']} steps of batch {b['batch_size']} at most "
    "(gradient preference may stop early), ResNet-18 backbone with "
    + (
      "weights from " + b["model.pretrained"]
      if b["model.pretrained"]
      else "RANDOM weights (no ImageNet weights on this machine)"
    )
    + ". Scores are the methods' main ones (RD: map_max; GP: nn_max); "
    "pixel metrics on the smoothed anomaly map.",
    "",
    "| method | category | steps | image AUROC | pixel AUROC | AUPRO | "
    "wall s |",
    "|---|---|---|---|---|---|---|",
  ]
  means = {}
  for label, per_category in result["runs"].items():
    method = VARIANTS[label][0]
    for category, res in per_category.items():
      row = _figures(method, res)
      means.setdefault(label, []).append(row)
      lines.append(
        f"| {label} | {category} | {res['step']} | {row[0]:.3f} "
        f"| {row[1]:.3f} | {row[2]:.3f} | {res['wall_seconds']} |"
      )
  averaged = {}
  for label, rows in means.items():
    mean = averaged[label] = [
      sum(r[i] for r in rows) / len(rows) for i in range(3)
    ]
    lines.append(
      f"| **{label}** | mean | | **{mean[0]:.3f}** | "
      f"**{mean[1]:.3f}** | **{mean[2]:.3f}** | |"
    )
  if result.get("gp_order") == "select_then_map":
    how = (
      "smallest spatial gradients of the feature map per image by "
      "default, selected before the MLP trains on them; 'largest "
      "feature gradients' the opposite direction; random = uniform"
    )
  else:
    how = (
      "bank.preferred_fraction 0.5 then, 0 = uniform sample, 1 = "
      "largest gradient norms of the MLP trained on all points only, "
      "chosen over all images at once: these gradient-preference "
      "figures were measured before the 2026-12 reordering (see the "
      "selector study)"
    )
  lines += [
    "",
    "The gradient-preference rows differ only in how the "
    f"repository is chosen ({how}): mean "
    "image / pixel AUROC "
    + "; ".join(
      f"{label} {m[0]:.3f} / {m[1]:.3f}"
      for label, m in averaged.items()
      if label.startswith("gradient_preference")
    )
    + ".",
  ]
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "part",
    choices=["run", "self_supervised", "two_stage", "matched", "report"],
  )
  parser.add_argument("--folder", default="/tmp/cifar_mvtec")
  parser.add_argument("--data_dir", default="/tmp/cifar_mvtec_tfds")
  parser.add_argument(
    "--categories", default="automobile,horse", type=lambda s: s.split(",")
  )
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--pretrained", default="")
  parser.add_argument(
    "--ssl_steps",
    type=int,
    default=500,
    help="DisAug steps for the self-supervised backbone.",
  )
  parser.add_argument("--workdir_root", default="/tmp/localization_quality")
  parser.add_argument(
    "--seeds", default="1", help="two_stage: training seeds (1: the configs')."
  )
  parser.add_argument(
    "--budget_cpu_s",
    type=float,
    default=60.0,
    help="matched: CPU seconds of train steps per run.",
  )
  args = parser.parse_args()
  if args.part == "run":
    common.save_part(PART, part_run(args))
  elif args.part == "self_supervised":
    common.save_part(f"{PART}_ssl", part_self_supervised(args))
  elif args.part == "two_stage":
    common.save_part(f"{PART}_two_stage", part_two_stage(args))
  elif args.part == "matched":
    common.save_part(f"{PART}_matched", part_matched(args))
  result = json.loads((common.RESULTS_DIR / f"{PART}.json").read_text())
  section = render(result)
  ssl_path = common.RESULTS_DIR / f"{PART}_ssl.json"
  if ssl_path.exists():
    section += "\n" + render_self_supervised(
      json.loads(ssl_path.read_text()), result["runs"]
    )
  two_stage_path = common.RESULTS_DIR / f"{PART}_two_stage.json"
  if two_stage_path.exists():
    section += "\n" + render_two_stage(
      json.loads(two_stage_path.read_text()), result["runs"]
    )
  matched_path = common.RESULTS_DIR / f"{PART}_matched.json"
  if matched_path.exists():
    section += "\n" + render_matched(json.loads(matched_path.read_text()))
  print(common.write_section(PART, section))


if __name__ == "__main__":
  main()
