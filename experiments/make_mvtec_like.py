"""Builds an MVTec-shaped folder with synthetic, exactly masked defects.

NOT MVTec AD: the images are real CIFAR-10 photos upscaled with PIL's bicubic
filter, and the defects are drawn by this script, so scores on this folder do
not compare with MVTec AD papers. It exists to exercise localisation (pixel
masks, anomaly maps, AUPRO) on real images where MVTec AD is not at hand.

For each category (a CIFAR-10 class name) it writes, in MVTec AD's layout:

  <out>/<category>/train/good/000.png   first num_train train-split images
  <out>/<category>/test/good/000.png    first num_test_good test-split images
  <out>/<category>/test/<defect>/000.png  num_test_defect further test images
  <out>/<category>/ground_truth/<defect>/000_mask.png  uint8 0/255
  <out>/<category>/provenance.csv       source (and donor) of every file
  <out>/README.txt                      how the folder was made

Defects (drawn after upscaling; every changed pixel is inside the mask):
  patch    a rectangle (sides 15-35% of the image) cut from a random train
           image of another class and pasted at a random place (CutPaste-like);
  scratch  a 2-4 segment polyline, 2-3 px wide at 64 px, of a random colour;
  stain    a rotated ellipse blended with a random dark tint (alpha 0.5-0.8).
A draw is redone until the mask covers >= 1% of the image and the pixels
under it change visibly (mean absolute change >= 24 of 255).

  python experiments/make_mvtec_like.py --out=/tmp/cifar_mvtec \
      --categories=automobile,horse --image_size=64 --num_train=500 \
      --num_test_good=100 --num_test_defect=50 --seed=0
"""

import argparse
import csv
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common  # pylint: disable=g-import-not-at-top
import numpy as np
from PIL import Image, ImageDraw

DEFECTS = ("patch", "scratch", "stain")
DEFAULT_SOURCE = common.ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
SCRIPT = "python experiments/make_mvtec_like.py"
_MIN_AREA = 0.01  # Fraction of the image a defect must cover.
_MIN_CHANGE = 24.0  # Mean absolute change under the mask, 0-255 scale.


def upscale(path, size: int) -> np.ndarray:
  """An image file as uint8 [size, size, 3], resized with PIL's bicubic."""
  with Image.open(path) as image:
    image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(image, np.uint8)


def add_patch(image, donor, rng):
  """Pastes a random rectangle of `donor` at a random place of `image`.

  Returns:
    (defective uint8 [H, W, 3], mask bool [H, W]).
  """
  size = image.shape[0]
  h, w = rng.integers(round(0.15 * size), round(0.35 * size) + 1, size=2)
  sy, sx = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
  ty, tx = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
  out, mask = image.copy(), np.zeros(image.shape[:2], bool)
  out[ty : ty + h, tx : tx + w] = donor[sy : sy + h, sx : sx + w]
  mask[ty : ty + h, tx : tx + w] = True
  return out, mask


def add_scratch(image, rng):
  """Draws a thin random polyline of one random colour; (image, mask)."""
  size = image.shape[0]
  width = max(1, round(int(rng.integers(2, 4)) * size / 64))
  points = [rng.uniform(0.15, 0.85, size=2) * size]
  for _ in range(rng.integers(2, 5)):
    angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.4) * size
    step = length * np.array([np.cos(angle), np.sin(angle)])
    points.append(np.clip(points[-1] + step, 1, size - 2))
  canvas = Image.new("L", (size, size))
  ImageDraw.Draw(canvas).line(
    [tuple(p) for p in points], fill=255, width=width, joint="curve"
  )
  mask = np.asarray(canvas) > 0
  out = image.copy()
  out[mask] = rng.integers(0, 256, size=3)
  return out, mask


def add_stain(image, rng):
  """Tints a random rotated ellipse towards a dark colour; (image, mask)."""
  size = image.shape[0]
  a, b = rng.uniform(0.08, 0.2, size=2) * size
  cy, cx = rng.uniform(0.2, 0.8, size=2) * size
  theta = rng.uniform(0, np.pi)
  y, x = np.mgrid[:size, :size] + 0.5
  u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
  v = (y - cy) * np.cos(theta) - (x - cx) * np.sin(theta)
  mask = (u / a) ** 2 + (v / b) ** 2 <= 1
  tint = rng.integers(0, 256, size=3) * rng.uniform(0.1, 0.6)
  alpha = rng.uniform(0.5, 0.8)
  out = image.copy()
  blended = (1 - alpha) * image[mask] + alpha * tint
  out[mask] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
  return out, mask


def visible(clean, defective, mask) -> bool:
  """Whether a defect is big enough and changes the pixels under its mask."""
  if mask.mean() < _MIN_AREA:
    return False
  change = np.abs(defective.astype(int) - clean.astype(int))[mask].mean()
  return bool(change >= _MIN_CHANGE)


def make_defect(kind, clean, rng, donor_files):
  """Draws one defect of `kind` until visible; (image, mask, donor or '')."""
  for _ in range(1000):
    donor = ""
    if kind == "patch":
      donor = donor_files[rng.integers(len(donor_files))]
      image, mask = add_patch(clean, upscale(donor, clean.shape[0]), rng)
    elif kind == "scratch":
      image, mask = add_scratch(clean, rng)
    else:
      image, mask = add_stain(clean, rng)
    if visible(clean, image, mask):
      return image, mask, donor
  raise RuntimeError(f"No visible {kind} defect after 1000 draws.")


def _save(array, path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _jpegs(folder: Path) -> list[Path]:
  return sorted(folder.glob("*.jpg"))


def make_category(
  source: Path, out: Path, category: str, classes: list[str], args
) -> dict:
  """Writes one category folder; returns its image counts per subfolder."""
  rng = np.random.default_rng([args.seed, classes.index(category)])
  train, test = (_jpegs(source / s / category) for s in ("train", "test"))
  n_test = args.num_test_good + len(DEFECTS) * args.num_test_defect
  if len(train) < args.num_train or len(test) < n_test:
    raise SystemExit(
      f"{category}: asked for {args.num_train} train and "
      f"{n_test} test images; the source has {len(train)} and "
      f"{len(test)}."
    )
  donors = [
    f for c in classes if c != category for f in _jpegs(source / "train" / c)
  ]
  folder, size, rows = out / category, args.image_size, []
  for split, files in (
    ("train", train[: args.num_train]),
    ("test", test[: args.num_test_good]),
  ):
    for i, f in enumerate(files):
      name = f"{split}/good/{i:03d}.png"
      _save(upscale(f, size), folder / name)
      rows.append((name, f.relative_to(source), ""))
  start = args.num_test_good
  for kind in DEFECTS:
    for i, f in enumerate(test[start : start + args.num_test_defect]):
      image, mask, donor = make_defect(kind, upscale(f, size), rng, donors)
      _save(image, folder / "test" / kind / f"{i:03d}.png")
      _save(
        mask.astype(np.uint8) * 255,
        folder / "ground_truth" / kind / f"{i:03d}_mask.png",
      )
      rows.append(
        (
          f"test/{kind}/{i:03d}.png",
          f.relative_to(source),
          donor and donor.relative_to(source),
        )
      )
    start += args.num_test_defect
  with open(folder / "provenance.csv", "w", newline="") as fh:
    csv.writer(fh).writerows([("filename", "source", "donor"), *rows])
  return {
    "train/good": args.num_train,
    "test/good": args.num_test_good,
    **{f"test/{k}": args.num_test_defect for k in DEFECTS},
  }


def readme(command: str, seed: int, counts: dict) -> str:
  """The text of <out>/README.txt: what the folder is and how it was made."""
  lines = [
    "CIFAR-10 images with synthetic defects in MVTec AD's layout; this "
    "is NOT MVTec AD.",
    "",
    f"Made by: {command}",
    f"Seed: {seed} (one numpy Generator per category, seeded with "
    "[seed, CIFAR-10 class index])",
    "Images per folder:",
  ]
  lines += [
    f"  {c}: " + ", ".join(f"{k} {v}" for k, v in n.items())
    for c, n in counts.items()
  ]
  lines += ["", "How it was made (the docstring of the script):", "", __doc__]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="/tmp/cifar_mvtec")
  parser.add_argument(
    "--categories",
    default="automobile,horse",
    help="Comma-separated CIFAR-10 class names.",
  )
  parser.add_argument(
    "--source",
    default=str(DEFAULT_SOURCE),
    help="CIFAR-10 JPEG .tar.gz or its extracted folder.",
  )
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--num_train", type=int, default=500)
  parser.add_argument("--num_test_good", type=int, default=100)
  parser.add_argument("--num_test_defect", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--overwrite",
    action="store_true",
    help="Replace existing category folders.",
  )
  args = parser.parse_args()
  out = Path(args.out)
  categories = [c.strip() for c in args.categories.split(",") if c.strip()]
  source = Path(common.cifar_folder(args.source))
  classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
  for category in categories:
    folder = out / category
    if category not in classes:
      raise SystemExit(
        f"Unknown CIFAR-10 class {category!r}; one of {', '.join(classes)}."
      )
    if folder.exists() and any(folder.iterdir()) and not args.overwrite:
      raise SystemExit(
        f"{folder} exists and is not empty; pass --overwrite "
        "to replace it, or choose another --out."
      )
  for category in categories:
    shutil.rmtree(out / category, ignore_errors=True)
  counts = {c: make_category(source, out, c, classes, args) for c in categories}
  command = (
    f"{SCRIPT} --out={args.out} --categories={','.join(categories)} "
    f"--source={args.source} --image_size={args.image_size} "
    f"--num_train={args.num_train} "
    f"--num_test_good={args.num_test_good} "
    f"--num_test_defect={args.num_test_defect} --seed={args.seed}"
  )
  text = readme(command, args.seed, counts)
  (out / "README.txt").write_text(text)
  print(text, end="")


if __name__ == "__main__":
  main()
