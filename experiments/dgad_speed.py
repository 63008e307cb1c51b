"""DGAD's speed claim: training time to the same AUROC as RotNet / DisAug.

Xia et al. 2021 say their discriminative-generative method has "a great
advantage in speed" over discriminative methods at close performance. This
measures it on a small budget: each method trains once for --steps steps
(its preset batch size, network width --width), writing a checkpoint every
--eval_every steps; each checkpoint is then scored on the test split with
the method's headline scorer (configs/<method>.py eval.scorer, fixed before
these runs). The training time to a checkpoint is the time from the start
of training to that checkpoint being written (compilation, input pipeline
and checkpoint writes included; evaluation excluded). The cosine schedules
are those of a --steps run, so an early checkpoint is not a shorter run.

To keep the many evaluations affordable on a CPU, each checkpoint fits only
the headline scorer's classifier (on all normal training images) and is
scored on a seeded subset of the test split: --test_per_class images of
every class (0 = the whole split). Training sees the whole training split.

Writes experiments/results/dgad_speed.json and its RESULTS.md section:
AUROC against training seconds for every method and class, and per AUROC
target the first checkpoint reaching it.

  python experiments/dgad_speed.py --data=../shared/data/cifar10-jpeg.tar.gz --classes=0,1 --steps=600 --eval_every=100
  python experiments/dgad_speed.py --data=digits --classes=1 --steps=20 --eval_every=10  # smoke run

--merge adds runs to the saved results instead of replacing them (one
method later, on its own budget); --report only re-renders the section.
"""

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common  # pylint: disable=g-import-not-at-top

from jax_oneclass import checkpointing  # pylint: disable=g-import-not-at-top
from jax_oneclass import evaluate  # pylint: disable=g-import-not-at-top
from jax_oneclass import run as run_lib  # pylint: disable=g-import-not-at-top
from jax_oneclass import train  # pylint: disable=g-import-not-at-top

PART = "dgad_speed"
SCRIPT = "python experiments/dgad_speed.py"
METHODS = ("dgad", "rotnet", "disaug")


def _load() -> str:
  """`uptime`'s load averages, to read the times with."""
  return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _cpu_name() -> str:
  """The CPU model (lscpu's 'Model name') and the core count."""
  names = [
    line.split(":", 1)[1].strip()
    for line in Path("/proc/cpuinfo").read_text().splitlines()
    if line.startswith("model name")
  ]
  return f"{names[0] if names else os.uname().machine}, {os.cpu_count()} cores"


def _checkpoint_seconds(workdir: Path, start: float) -> dict[int, float]:
  """{step: seconds from `start` until its checkpoint was written}.

  A checkpoint is written when its newest file is. checksums.json does not
  count: the checkpointer writes a step's checksums only once the save
  after it begins (saves are asynchronous), and so does the step folder's
  own modification time move then.
  """
  out = {}
  for path in (workdir / "checkpoints").iterdir():
    if path.name.isdigit():
      stamps = [
        f.stat().st_mtime
        for f in path.rglob("*")
        if f.is_file() and f.name != checkpointing.CHECKSUMS
      ]
      out[int(path.name)] = round(max(stamps) - start, 1)
  return dict(sorted(out.items()))


def test_subset_folder(
  folder: str, per_class: int, root: Path, seed: int = 0
) -> str:
  """A folder like `folder` whose test/ keeps `per_class` seeded images of
  each class (symbolic links); train/ is the whole original split."""
  source = Path(folder)
  target = root / f"data_test{per_class}_seed{seed}"
  marker = target / ".complete"
  if marker.exists():
    return str(target)
  shutil.rmtree(target, ignore_errors=True)
  target.mkdir(parents=True)
  (target / "train").symlink_to((source / "train").resolve())
  rng = random.Random(seed)
  for class_dir in sorted(p for p in (source / "test").iterdir() if p.is_dir()):
    files = sorted(p.name for p in class_dir.iterdir() if p.is_file())
    (target / "test" / class_dir.name).mkdir(parents=True)
    for name in sorted(rng.sample(files, min(per_class, len(files)))):
      (target / "test" / class_dir.name / name).symlink_to(
        (class_dir / name).resolve()
      )
  marker.touch()
  return str(target)


def headline_only(config) -> None:
  """Keeps only the classifier the headline scorer reads ('pool/gde/rot_avg'
  and 'latent/gde' both read 'gde')."""
  name = config.eval.scorer.split("/")[1]
  config.classifiers = {name: config.classifiers[name].to_dict()}


def run_one(
  method: str,
  arg: str,
  workdir: Path,
  overrides: dict,
  score_initial: bool = False,
) -> dict:
  """Trains one method from scratch, then scores every checkpoint (and,
  with `score_initial`, the untrained initial state as step 0)."""
  config = common.config_with(method, arg, overrides)
  config.progress_bar = False
  headline_only(config)
  shutil.rmtree(workdir, ignore_errors=True)  # Times need a fresh start.
  load_before = _load()
  start = time.time()
  train.train(config, workdir)
  train_seconds = round(time.time() - start, 1)
  seconds = _checkpoint_seconds(workdir, start)
  run = run_lib.setup(config, workdir, mode="eval")
  points = []
  try:
    if score_initial:
      seconds = {0: 0.0, **seconds}
    for step, secs in seconds.items():
      state = (
        run_lib.run_initial_state(run)
        if step == 0
        else run_lib.restore(run, step)[0]
      )
      results = evaluate.evaluate_run(run, state, step, output_dir=False)
      points.append(
        {
          "step": step,
          "train_seconds": secs,
          "auroc": results["auroc"][config.eval.scorer],
          "num_test": results["num_test"],
        }
      )
      print(
        f"{method} {arg.split(',')[-1]} step {step}: {secs} s, "
        f"AUROC {points[-1]['auroc']:.4f}",
        flush=True,
      )
  finally:
    run.checkpointer.close()
  return {
    "scorer": config.eval.scorer,
    "batch_size": config.batch_size,
    "views": config.data.num_views,
    "train_seconds": train_seconds,
    "load_before": load_before,
    "load_after": _load(),
    "points": points,
  }


def time_to(points: list[dict], target: float):
  """(seconds, step) of the first point with AUROC >= target, or None."""
  for p in points:
    if p["auroc"] >= target:
      return p["train_seconds"], p["step"]
  return None


def _test_images(result: dict) -> str:
  """How many test images each evaluation scored, in words."""
  counts = {
    p["num_test"]
    for by_method in result["runs"].values()
    for r in by_method.values()
    for p in r["points"]
    if "num_test" in p
  }
  per_class = result.get("test_per_class", 0)
  subset = (
    f"a seeded subset of {per_class} test images per class"
    if per_class
    else "the whole test split"
  )
  return f"{subset} ({', '.join(map(str, sorted(counts)))} images)"


def render(result: dict) -> str:
  """The RESULTS.md section."""
  commands = "; ".join(f"`{c}`" for c in result["commands"])
  lines = [
    "## DGAD's speed claim: training time to an AUROC",
    "",
    *(
      ["Stopped early: only the runs listed below finished.", ""]
      if result.get("partial")
      else []
    ),
    f"Commands: {commands}. CPU: {result['cpu']}. Each method's "
    f"preset batch size, network width {result['width']}, the steps "
    "listed, a checkpoint every --eval_every; AUROC of the method's "
    "headline scorer (fixed in its config before this run) at each "
    f"checkpoint, on {_test_images(result)}; seconds from the start "
    "of training to that checkpoint being written (compilation "
    "included, evaluation excluded). A method's cosine schedule is "
    "that of its own number of steps. The 1/5/15-min load averages "
    "before and after each run show whether anything else used the "
    "cores.",
    "",
    "| class | method | scorer | batch x views | steps | step: "
    "seconds, AUROC | load before / after |",
    "|---|---|---|---|---|---|---|",
  ]
  for c, by_method in result["runs"].items():
    for method, r in by_method.items():
      curve = "; ".join(
        f"{p['step']}: {p['train_seconds']:.0f} s, {p['auroc']:.3f}"
        for p in r["points"]
      )
      lines.append(
        f"| {c} | {method} | {r['scorer']} | {r['batch_size']} x "
        f"{r['views']} | {r['steps']} | {curve} | "
        f"{r['load_before']} / {r['load_after']} |"
      )
  lines += [
    "",
    "Time to reach each AUROC target (seconds, at step); '-' "
    "where the run never reached it, 'not run' where the method has "
    "no run for that class:",
    "",
    "| class | target | " + " | ".join(result["methods"]) + " |",
    "|---|---|" + "---|" * len(result["methods"]),
  ]
  for c, by_method in result["runs"].items():
    for target in result["targets"]:
      cells = []
      for method in result["methods"]:
        if method not in by_method:
          cells.append("not run")
          continue
        hit = time_to(by_method[method]["points"], target)
        cells.append(f"{hit[0]:.0f} s (step {hit[1]})" if hit else "-")
      lines.append(f"| {c} | {target} | " + " | ".join(cells) + " |")
  lines.append("")
  return "\n".join(lines)


def _previous() -> dict:
  """The saved results, or {} if there are none."""
  path = common.RESULTS_DIR / f"{PART}.json"
  if not path.exists():
    return {}
  result = json.loads(path.read_text())
  if "command" in result:  # Saved before --merge: one command, one budget.
    command = result.pop("command")
    result["commands"] = [command]
    result["data"] = command.split("--data=")[1].split()[0]
    for by_method in result["runs"].values():
      for run in by_method.values():
        run.update(steps=result["steps"], eval_every=result["eval_every"])
    del result["steps"], result["eval_every"]
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--data",
    default="../shared/data/cifar10-jpeg.tar.gz",
    help="CIFAR-10 JPEG .tar.gz or folder, or 'digits'.",
  )
  parser.add_argument("--classes", default="0,1")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--eval_every", type=int, default=100)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--targets", default="0.6,0.65,0.7,0.75")
  parser.add_argument(
    "--test_per_class",
    type=int,
    default=300,
    help="Test images per class for the evaluations (0 = "
    "the whole test split).",
  )
  parser.add_argument("--workdir_root", default="/tmp/jax_oneclass_speed")
  parser.add_argument(
    "--merge",
    action="store_true",
    help="Add these runs to the saved results (same data, "
    "width, targets and test subset) instead of replacing "
    "them, e.g. one method run later on its own budget.",
  )
  parser.add_argument(
    "--report",
    action="store_true",
    help="Only re-render the RESULTS.md section.",
  )
  args = parser.parse_args()
  os.chdir(common.ROOT)
  if args.report:
    print(common.write_section(PART, render(_previous())))
    return
  methods = args.methods.split(",")
  classes = args.classes.split(",")
  if args.data == "digits":
    base = "digits"
    args.test_per_class = 0  # Digits' test split is small: all of it.
  else:
    folder = common.cifar_folder(args.data)
    if args.test_per_class:
      folder = test_subset_folder(
        folder, args.test_per_class, Path(args.workdir_root)
      )
    base = f"folder,folder={folder}"
  overrides = {
    "num_train_steps": args.steps,
    "model.width": args.width,
    "checkpoint_every_steps": args.eval_every,
    "keep_checkpoints": args.steps // args.eval_every + 1,
    "eval.batch_size": 500,
    "log_every_steps": args.eval_every,
  }
  command = (
    f"{SCRIPT} --data={args.data} --classes={args.classes} "
    f"--methods={args.methods} --steps={args.steps} "
    f"--eval_every={args.eval_every} --width={args.width} "
    f"--targets={args.targets} "
    f"--test_per_class={args.test_per_class}"
    + (" --merge" if args.merge else "")
  )
  result = {
    "commands": [command],
    "cpu": _cpu_name(),
    "methods": methods,
    "width": args.width,
    "test_per_class": args.test_per_class,
    "data": args.data,
    "targets": [float(t) for t in args.targets.split(",")],
    "runs": {},
  }
  previous = _previous() if args.merge else {}
  if previous:
    same = ("cpu", "width", "test_per_class", "data", "targets")
    differ = [k for k in same if previous.get(k) != result[k]]
    if differ:
      raise SystemExit(
        f"--merge: the saved results differ in {differ}; "
        "rerun without --merge instead."
      )
    result["commands"] = previous["commands"] + [command]
    result["methods"] = [
      m for m in METHODS if m in methods + previous["methods"]
    ]
    result["runs"] = previous["runs"]
  for c in classes:
    for method in methods:
      workdir = Path(args.workdir_root) / method / c
      run = run_one(method, f"{base},normal_class={c}", workdir, overrides)
      run.update(steps=args.steps, eval_every=args.eval_every)
      result["runs"].setdefault(c, {})[method] = run
      common.save_part(PART, {**result, "partial": True})
  common.save_part(PART, result)
  common.write_section(PART, render(result))
  print(json.dumps(result["runs"], indent=1))


if __name__ == "__main__":
  main()
