"""The raw-pixel baseline of every digits normal class, to pick the
quickstart's class: the one where nothing learned does worst.

pixel_baseline (jax_oneclass.evaluate) scores a test image by the squared
distance of its model input to the mean normal training image; no training
is involved, so this takes seconds.

  python experiments/digits_pixel_baseline.py
"""

import tempfile

import numpy as np

from experiments import common
from jax_oneclass import data, evaluate, metrics
from jax_oneclass import run as run_lib

SCRIPT = "python experiments/digits_pixel_baseline.py"
# Image sizes of the digits presets: 16x16 (two-stage, GAN family), 32x32
# (localising methods).
METHODS = ("disaug", "reverse_distillation")


def baseline(method: str, normal_class: int) -> float:
  config = common.config_with(method, f"digits,normal_class={normal_class}")
  run = run_lib.setup(config, tempfile.mkdtemp(), mode="eval")
  try:
    scores = evaluate.pixel_baseline(run)
  finally:
    run.checkpointer.close()
  is_anomaly = np.concatenate([
      b["is_anomaly"][b["mask"].astype(bool)]
      for b in data.eval_batches(config, "test", 256)])
  return metrics.auroc(scores, is_anomaly)


def main():
  result = {"command": SCRIPT, "auroc": {}}
  lines = ["## Digits: raw-pixel baseline per normal class", "",
           "AUROC of `pixel_baseline` (squared distance of the model input "
           "to the mean normal training image; nothing learned) on each "
           "digits normal class, at the presets' image sizes. The digits "
           "preset's default normal class is the one with the lowest "
           "figure, so a quickstart run shows whether the learned features "
           "add anything (class 0: 1.0 by raw pixels alone).", "",
           f"Command: `{SCRIPT}`", "",
           "| preset (image size) | " + " | ".join(map(str, range(10))) + " |",
           "|---|" + "---|" * 10]
  for method in METHODS:
    size = common.config_with(method, "digits").data.image_size
    values = [baseline(method, c) for c in range(10)]
    result["auroc"][f"{method}_{size}"] = values
    lines.append(f"| {method} ({size}x{size}) | "
                 + " | ".join(f"{v:.3f}" for v in values) + " |")
    print(method, size, " ".join(f"{v:.4f}" for v in values), flush=True)
  common.save_part("digits_pixel_baseline", result)
  common.write_section("digits_pixel_baseline", "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
