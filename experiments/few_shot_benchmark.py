"""Few-shot detection and localisation on the synthetic MVTec-shaped set.

The few-shot protocol (`data.num_train_images=K`: a seeded subset of K good
training images, taken after the held-out calibration split) for
gradient preference (`configs/gradient_preference.py`), reverse
distillation, and a plain nearest-neighbour repository (gradient
preference with `model.mlp_widths=()` and every patch point: the frozen
backbone's layer2+layer3 points, no selection, no mapping), per K and
category, with the same backbone and image size. It is NOT MVTec AD (see
experiments/README.md); without ImageNet weights every backbone is random
unless --pretrained names a torchvision resnet18 file.

  python experiments/few_shot_benchmark.py --categories=automobile --shots=1,4,16 --steps=50 --batch_size=8
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common  # pylint: disable=g-import-not-at-top
from experiments.localization_quality import ensure_folder

SCRIPT = "python experiments/few_shot_benchmark.py"
PART = "few_shot"

# Row label -> (method, overrides beyond the shared budget, main score).
VARIANTS = {
  "gradient_preference": ("gradient_preference", {}, "nn_max"),
  # The default before the selector study: half the repository by the
  # largest feature-map gradients, half uniform.
  "gradient_preference, largest gradients, half": (
    "gradient_preference",
    {"bank.prefer": "largest", "bank.preferred_fraction": 0.5},
    "nn_max",
  ),
  "nearest-neighbour repository": (
    "gradient_preference",
    {
      "model.mlp_widths": (),
      "bank.fraction": 1.0,
      "bank.preferred_fraction": 0.0,
      "num_train_steps": 1,
      "checkpoint_every_steps": 1,
    },
    "nn_max",
  ),
  "reverse_distillation": ("reverse_distillation", {}, "map_max"),
}


def _budget(args, shots: int) -> dict:
  return {
    "num_train_steps": args.steps,
    "batch_size": args.batch_size,
    "data.image_size": args.image_size,
    "model.backbone": "resnet18",
    "model.pretrained": args.pretrained,
    "data.num_train_images": shots,
    "data.subset_seed": args.subset_seed,
    "checkpoint_every_steps": args.steps,
    "eval.num_overlays": 0,
    "eval.plots": False,
  }


def part_run(args, save) -> dict:
  """Every variant for every K and category."""
  ensure_folder(Path(args.folder), args.categories)
  out = {
    "command": f"{SCRIPT} --categories={','.join(args.categories)} "
    f"--shots={','.join(map(str, args.shots))} "
    f"--steps={args.steps} --batch_size={args.batch_size}",
    "budget": _budget(args, 0),
    "runs": {},
  }
  if args.variants != list(VARIANTS)[:1] + list(VARIANTS)[2:]:
    out["command"] += f" --variants='{';'.join(args.variants)}'"
  if args.merge:
    out["command"] += " --merge"
  variants = {k: VARIANTS[k] for k in args.variants}
  for category in args.categories:
    arg = (
      f"mvtec,folder={args.folder},category={category},data_dir={args.data_dir}"
    )
    for label, (method, extra, score) in variants.items():
      for shots in args.shots:
        workdir = (
          Path(args.workdir_root)
          / category
          / f"k{shots}"
          / label.replace(" ", "_").replace(",", "")
        )
        res = common.run_method(
          method, arg, workdir, {**_budget(args, shots), **extra}
        )
        pixel = res["localization"]["anomaly_map"]
        row = {
          "image_auroc": res["auroc"][score],
          "pixel_auroc": pixel["pixel_auroc"],
          "aupro": pixel["aupro"],
          "step": res["step"],
          "wall_seconds": res["wall_seconds"],
        }
        out["runs"].setdefault(label, {}).setdefault(category, {})[
          str(shots)
        ] = row
        print(f"{category} K={shots} {label}: {json.dumps(row)}", flush=True)
        save(out)  # Every row as it comes: a cut-short run keeps them.
  return out


def render(result: dict) -> str:
  """One row per variant and K, categories side by side, then the mean."""
  b = result["budget"]
  runs = result["runs"]
  cats = list(next(iter(runs.values())))
  lines = [
    "## Few-shot on the synthetic MVTec-shaped set (not MVTec AD)",
    "",
    f"Command: `{result['command']}`. `data.num_train_images=K` good "
    f"training images (subset seed {b['data.subset_seed']}, after the "
    f"held-out split), {b['data.image_size']}x{b['data.image_size']}, "
    "ResNet-18 backbone with "
    + (
      f"weights {b['model.pretrained']}"
      if b["model.pretrained"]
      else "RANDOM weights (no ImageNet weights on this machine)"
    )
    + f"; at most {b['num_train_steps']} steps of batch {b['batch_size']} "
    "(the K images repeat; gradient preference may stop early). "
    "Nearest-neighbour repository: every layer2+layer3 patch point of the "
    "K images, no selection, no MLP (gradient preference with "
    "model.mlp_widths=() and bank.fraction=1). Cells: image AUROC "
    "(GP/NN: nn_max, RD: map_max) / pixel AUROC / AUPRO."
    + "".join(
      f" Rows added by `{c}`." for c in result.get("merged_commands", [])
    ),
    "",
    "| method | K | " + " | ".join(cats) + " | mean image AUROC |",
    "|---|---|" + "---|" * (len(cats) + 1),
  ]
  shots = sorted(
    {int(k) for per in runs.values() for c in per.values() for k in c}
  )
  for k in shots:
    for label, per_category in runs.items():
      cells, images = [], []
      for c in cats:
        r = per_category.get(c, {}).get(str(k))
        if r is None:
          cells.append("")
          continue
        images.append(r["image_auroc"])
        cells.append(
          f"{r['image_auroc']:.3f} / {r['pixel_auroc']:.3f} / {r['aupro']:.3f}"
        )
      mean = f"**{sum(images) / len(images):.3f}**" if images else ""
      lines.append(f"| {label} | {k} | " + " | ".join(cells) + f" | {mean} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--folder", default="/tmp/cifar_mvtec")
  parser.add_argument("--data_dir", default="/tmp/cifar_mvtec_tfds")
  parser.add_argument(
    "--categories", default="automobile", type=lambda s: s.split(",")
  )
  parser.add_argument(
    "--shots", default=[1, 4, 16], type=lambda s: [int(k) for k in s.split(",")]
  )
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--subset_seed", type=int, default=0)
  parser.add_argument("--pretrained", default="")
  parser.add_argument("--workdir_root", default="/tmp/few_shot")
  parser.add_argument(
    "--variants",
    default=[
      "gradient_preference",
      "nearest-neighbour repository",
      "reverse_distillation",
    ],
    type=lambda s: s.split(";"),
    help="';'-separated row labels of VARIANTS to run.",
  )
  parser.add_argument(
    "--merge",
    action="store_true",
    help="Add the rows to the saved results (same budget).",
  )
  parser.add_argument(
    "--report",
    action="store_true",
    help="Only rewrite the section from the saved JSON.",
  )
  args = parser.parse_args()
  if not args.report:
    saved = common.RESULTS_DIR / f"{PART}.json"
    old = (
      json.loads(saved.read_text()) if (args.merge and saved.exists()) else None
    )

    def save(result):
      if old is not None:  # These rows added to the saved ones.
        merged = json.loads(json.dumps(old))
        for label, per_category in result["runs"].items():
          for category, rows in per_category.items():
            merged["runs"].setdefault(label, {}).setdefault(
              category, {}
            ).update(rows)
        merged.setdefault("merged_commands", []).append(result["command"])
        result = merged
      common.save_part(PART, result)

    part_run(args, save)
  result = json.loads((common.RESULTS_DIR / f"{PART}.json").read_text())
  print(common.write_section(PART, render(result)))


if __name__ == "__main__":
  main()
