"""The seed papers' comparisons at one small CPU-time budget per method.

Parts (each writes experiments/results/paper_<part>.json; `report`
re-renders the section of RESULTS.md from them):

  calibrate  CPU seconds (time.process_time) of one jitted train step of
             every method below, at the sizes used here, on a fixed random
             batch; the other parts take each method's steps from it so that
             every method gets the same CPU budget per member.
  gan        DGAD (default padding) vs GANomaly, every CIFAR-10 class x
             --seeds, one `python -m jax_oneclass.sweep` per method; then
             DGAD's other padding modes (--padding_classes, one seed;
             also alone as the part `padding`).
  gan_mvtec  The same on the MVTec-shaped set (--categories x --seeds at
             64 px, calibrated there with `calibrate --image_size=64`),
             DGAD with zero padding beside it and the untrained networks'
             scores as a reference.
  dgad_grid  DGAD with other values of one key (--grid=key=v1,v2).
  untrained  The untrained networks' AUROC on the same classes, seeds and
             test subsets: a reference column in the (a) and (b) tables.
  dgad_curve DGAD's AUROC at every --curve_every steps of a longer run,
             the default and one change per row (DGAD_CURVE_VARIANTS).
  two_stage  DisAug vs CLR vs RotNet, every CIFAR-10 class x --seeds.
  few_shot   gradient preference vs reverse distillation vs a plain
             nearest-neighbour repository on the MVTec-shaped set, K shots,
             on a backbone the two-stage family trained on the category.
  report     only re-render.

  python experiments/paper_comparisons.py calibrate
  python experiments/paper_comparisons.py gan --budget_cpu_s=25
  python experiments/paper_comparisons.py two_stage --budget_cpu_s=25

Sizes are small on purpose (a shared 2-core CPU): see SIZES. Nothing is
chosen on the test split; every run reports its last step.
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top
from experiments import common, measure

# pylint: enable=g-import-not-at-top

SCRIPT = "python experiments/paper_comparisons.py"
DATA = common.ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
WORK = Path(os.environ.get("PAPERS_WORKDIR", "/tmp/paper_comparisons"))
# The sweeps' --combine ('vmap' in the first runs; vmapped GAN steps proved
# far slower than the single step on XLA:CPU, so 'auto' times both).
COMBINE = os.environ.get("PAPERS_COMBINE", "auto")
# Where the CIFAR-10 tarball is extracted (outside the repository).
CACHE = Path(os.environ.get("JAX_ONECLASS_DATA", "/tmp/jax_oneclass_data"))
# Every run: no pictures, one checkpoint at the end.
_QUIET = {
  "eval.plots": False,
  "eval.num_overlays": 0,
  "progress_bar": False,
  "log_every_steps": 50,
}
_GAN = {"model.width": 16, "batch_size": 64}
# ResNet-18 at a quarter of the paper's width, two head layers, GDE only
# (the headline pool/gde/rot_avg needs no other classifier) fitted on 1,000
# normal training images (evaluation cost).
_TWO_STAGE = {
  "model.width": 16,
  "model.head_dims": (128, 128),
  "classifiers": {"gde": {}},
  "eval.max_fit_examples": 1000,
}
SIZES = {
  "dgad": _GAN,
  "ganomaly": _GAN,
  "rotnet": _TWO_STAGE,
  "clr": _TWO_STAGE,
  "disaug": _TWO_STAGE,
}
PAPER = {
  "gan": "Xia et al. 2021: DGAD +6 AUROC points over the best GAN baseline "
  "on CIFAR-10",
  "gan_mvtec": "Xia et al. 2021: DGAD +2 AUROC points over the best GAN "
  "baseline on MVTec AD",
  "two_stage": "Sohn et al. 2021: DisAug CLR > CLR > RotNet; DisAug 92.5 "
  "mean AUROC on CIFAR-10 (ResNet-18, 2048 epochs)",
}


def _cifar_arg(per_class: int) -> str:
  """The CIFAR-10 folder arg; the test split cut to `per_class` images of
  each class (0: all 1,000)."""
  folder = common.cifar_folder(str(DATA))
  if per_class:
    folder = test_subset(folder, per_class)
  return f"folder,folder={folder}"


def calibration_key(method_name: str, image_size: int = 32) -> str:
  """The calibration row of a method at an image size (32 px: its name)."""
  return method_name if image_size == 32 else f"{method_name}@{image_size}px"


def _step_cpu_s(
  method_name: str, steps: int, warmup: int, image_size: int = 32
) -> dict:
  """One method's jitted train step at SIZES on a fixed random batch of
  `image_size` px images: median CPU seconds (time.process_time) of
  `steps` steps after `warmup`."""
  import jax  # pylint: disable=g-import-not-at-top

  from jax_oneclass import data, methods, parallel, train  # pylint: disable=g-import-not-at-top
  from jax_oneclass import run as run_lib  # pylint: disable=g-import-not-at-top

  config = common.config_with(
    method_name,
    "cifar10",
    {**SIZES[method_name], "data.image_size": image_size},
  )
  info = types.SimpleNamespace(
    image_shape=(image_size, image_size, 3),
    num_train=4500,
    epoch_size=data.examples_per_epoch(config, 4500),
    class_names=tuple("abcdefghij"),
  )
  method = methods.get_method(config, info)
  mesh = parallel.make_mesh()
  state = run_lib.initial_state(method, info.image_shape, mesh, 0)
  step = train.jit_train_step(method, mesh)
  shape = (config.batch_size, config.data.num_views, image_size, image_size, 3)
  images = jax.random.uniform(jax.random.key(0), shape)
  batch = parallel.shard_batch(mesh, {"image": images})
  cpu = []
  for i in range(warmup + steps):
    start = time.process_time()
    state, metrics = step(state, batch, jax.random.key(i))
    jax.block_until_ready(metrics)
    cpu.append(time.process_time() - start)
  return {
    "cpu_s_per_step": measure.median(cpu[warmup:]),
    "cpu_s_each": [round(c, 3) for c in cpu[warmup:]],
    "batch_size": config.batch_size,
    "views": config.data.num_views,
    "image_size": image_size,
  }


def test_subset(folder: str, per_class: int) -> str:
  """A folder with the full train/ and the first `per_class` test images
  of each class (sorted file names; fixed before any run), as symlinks."""
  source = Path(folder)
  target = CACHE / f"cifar10_test{per_class}"
  if not (target / "done").exists():
    (target / "test").mkdir(parents=True, exist_ok=True)
    if not (target / "train").exists():
      (target / "train").symlink_to(source / "train")
    for class_dir in sorted((source / "test").iterdir()):
      out = target / "test" / class_dir.name
      out.mkdir(exist_ok=True)
      for image in sorted(class_dir.iterdir())[:per_class]:
        if not (out / image.name).exists():
          (out / image.name).symlink_to(image)
    (target / "done").touch()
  return str(target)


def part_calibrate(args):
  rows = {
    calibration_key(m, args.image_size): _step_cpu_s(
      m, args.steps, args.warmup, args.image_size
    )
    for m in args.methods.split(",")
  }
  old = _load("calibrate").get("rows", {})
  common.save_part(
    "paper_calibrate",
    {"machine": _machine(), "rows": {**old, **rows}},
  )
  for name, row in rows.items():
    print(f"{name}: {row['cpu_s_per_step']:.3f} CPU-s / step")


def _load(part: str) -> dict:
  path = common.RESULTS_DIR / f"paper_{part}.json"
  return json.loads(path.read_text()) if path.exists() else {}


def steps_for(method_name: str, budget_cpu_s: float, image_size=32) -> int:
  """Train steps that cost `budget_cpu_s` CPU seconds per member."""
  rows = _load("calibrate").get("rows", {})
  key = calibration_key(method_name, image_size)
  if key not in rows:
    raise SystemExit(
      f"No calibration for {key}: run `calibrate --methods={method_name} "
      f"--image_size={image_size}`."
    )
  return max(1, round(budget_cpu_s / rows[key]["cpu_s_per_step"]))


def refuse_unknown(flag: str, given, known) -> None:
  """Exits with one line and code 2 if `given` names anything not in
  `known`, before any run."""
  unknown = sorted(set(given) - set(known))
  if unknown:
    print(
      f"error: unknown {flag} {unknown}; choose from {', '.join(known)}.",
      file=sys.stderr,
    )
    raise SystemExit(2)


def _flag_value(value) -> str:
  return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def sweep(
  method_name, arg, workdir, overrides, seeds, classes="all", grid=(), stack=0
):
  """One `python -m jax_oneclass.sweep`: its children's CPU seconds, wall
  seconds and sweep_results.json. `classes` None: the config's class."""
  command = [
    sys.executable,
    "-m",
    "jax_oneclass.sweep",
    f"--config=configs/{method_name}.py:{arg}",
    f"--workdir={workdir}",
    *([f"--classes={classes}"] if classes is not None else []),
    f"--seeds={seeds}",
    f"--combine={COMBINE}",
    *([f"--stack={stack}"] if stack else []),
    *(f"--grid={g}" for g in grid),
    *(f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()),
  ]
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  done = subprocess.run(command, cwd=common.ROOT, check=False)
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if done.returncode != 0:
    raise SystemExit(f"sweep failed ({done.returncode}): {' '.join(command)}")
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  results = json.loads((Path(workdir) / "sweep_results.json").read_text())
  return {
    "command": " ".join(command[1:]),
    "cpu_s": round(cpu, 1),
    "wall_s": round(wall, 1),
    "results": results,
  }


def merge_runs(old: dict, new: dict) -> dict:
  """One saved sweep run from two of the same method and steps on other
  classes or seeds: the members of both (the new one's where they meet),
  their CPU and wall seconds summed."""
  if old["steps"] != new["steps"]:
    raise SystemExit(
      f"--add: the saved run trained {old['steps']} steps, this one "
      f"{new['steps']}; rerun with the same --budget_cpu_s."
    )

  def key(member):
    return member["class"], member["seed"], json.dumps(member["grid"])

  fresh = {key(m) for m in new["results"]["members"]}
  members = [m for m in old["results"]["members"] if key(m) not in fresh]
  return {
    **new,
    "command": f"{old['command']}; {new['command']}",
    "cpu_s": round(old["cpu_s"] + new["cpu_s"], 1),
    "wall_s": round(old["wall_s"] + new["wall_s"], 1),
    "results": {
      **new["results"],
      "members": members + new["results"]["members"],
    },
  }


def union(*lists: str) -> str:
  """'0,2' and '1' -> '0,1,2'; 'all' with anything -> 'all'."""
  if "all" in lists:
    return "all"
  values = {int(v) for items in lists for v in str(items).split(",") if v}
  return ",".join(str(v) for v in sorted(values))


def _run_methods(part, methods, args, extra=None):
  """One sweep per method at the same CPU budget per member; with --add,
  a sweep of --classes x --seeds in a workdir of its own, merged into the
  saved run (the part then covers the union)."""
  saved = _load(part)
  adding = getattr(args, "add", False)
  for method_name in methods:
    old = saved.get("runs", {}).get(method_name)
    if old and not (args.rerun or adding):
      continue
    steps = steps_for(method_name, args.budget_cpu_s)
    overrides = {
      **SIZES[method_name],
      **_QUIET,
      "num_train_steps": steps,
      "checkpoint_every_steps": steps,
    }
    folder = (
      f"{method_name}_classes_{args.classes}_seeds_{args.seeds}".replace(
        ",", "_"
      )
      if adding
      else method_name
    )
    run = sweep(
      method_name,
      _cifar_arg(args.test_per_class),
      WORK / part / folder,
      overrides,
      args.seeds,
      classes=args.classes,
      stack=args.stack,
    )
    run["steps"] = steps
    saved = _load(part)  # Another job may have added a method meanwhile.
    seeds, classes = args.seeds, args.classes
    old = saved.get("runs", {}).get(method_name)
    if adding and old:
      run = merge_runs(old, run)
      seeds = union(saved["seeds"], seeds)
      classes = union(saved["classes"], classes)
      earlier = saved.setdefault("earlier_machines", [])
      if saved.get("machine") and saved["machine"] not in earlier:
        earlier.append(saved["machine"])
    saved.setdefault("runs", {})[method_name] = run
    saved["budget_cpu_s"] = args.budget_cpu_s
    saved["seeds"] = seeds
    saved["classes"] = classes
    saved["test_per_class"] = args.test_per_class
    saved["combine"] = COMBINE
    saved["machine"] = _machine()
    common.save_part(f"paper_{part}", saved)
  added = extra(saved, args) if extra else None
  if added:
    saved = _load(part)
    saved.update(added)
    common.save_part(f"paper_{part}", saved)
  common.write_section("paper_comparisons", render())


def _padding_runs(saved, args):
  """DGAD's other padding modes, one seed, on --padding_classes."""
  if "run" in saved.get("padding", {}) and not args.rerun:
    return None
  modes = ["zeros", "reflect"]
  steps = steps_for("dgad", args.budget_cpu_s)
  overrides = {
    **SIZES["dgad"],
    **_QUIET,
    "num_train_steps": steps,
    "checkpoint_every_steps": steps,
  }
  run = sweep(
    "dgad",
    _cifar_arg(args.test_per_class),
    WORK / "gan" / "dgad_padding",
    overrides,
    args.padding_seeds,
    classes=args.padding_classes,
    grid=[f"model.padding={','.join(modes)}"],
  )
  run["steps"] = steps
  return {
    "padding": {
      "run": run,
      "command": f"{SCRIPT} gan --budget_cpu_s={args.budget_cpu_s:g} "
      f"--padding_classes={args.padding_classes} "
      f"--padding_seeds={args.padding_seeds} "
      f"--test_per_class={args.test_per_class}",
    }
  }


def part_padding(args):
  """Only DGAD's other padding modes (see `gan`)."""
  added = _padding_runs(_load("gan"), args)
  if added:
    saved = _load("gan")
    saved.update(added)
    common.save_part("paper_gan", saved)
  common.write_section("paper_comparisons", render())


def part_dgad_grid(args):
  """DGAD with other values of one config key (--grid=key=v1,v2) on
  --padding_classes x --padding_seeds, at the same budget: a look at a
  likely cause where DGAD disagrees with the paper (not tuning: the
  defaults stay)."""
  saved = _load("gan")
  if args.grid in saved.get("grids", {}) and not args.rerun:
    return
  steps = steps_for("dgad", args.budget_cpu_s)
  key = args.grid.partition("=")[0]
  run = sweep(
    "dgad",
    _cifar_arg(args.test_per_class),
    WORK / "gan" / f"dgad_{key}",
    {
      **SIZES["dgad"],
      **_QUIET,
      "num_train_steps": steps,
      "checkpoint_every_steps": steps,
    },
    args.padding_seeds,
    classes=args.padding_classes,
    grid=[args.grid],
  )
  run["steps"] = steps
  saved = _load("gan")  # Other jobs may have written meanwhile.
  run["script_command"] = (
    f"{SCRIPT} dgad_grid --grid={args.grid} --budget_cpu_s="
    f"{args.budget_cpu_s:g} --padding_classes={args.padding_classes} "
    f"--padding_seeds={args.padding_seeds} "
    f"--test_per_class={args.test_per_class}"
  )
  saved.setdefault("grids", {})[args.grid] = run
  common.save_part("paper_gan", saved)
  common.write_section("paper_comparisons", render())


# DGAD's score over a longer run (the falling score of dgad_speed.py, which
# used zero padding then): one class, one seed, width 32, the default
# and one change per row, each fixed before the runs.
DGAD_CURVE_VARIANTS = {
  "default": {},
  "learning_rate=5e-5": {"optimizer.learning_rate": 5e-5},
  "adversarial_weight=0": {"adversarial_weight": 0.0},
  "padding=zeros": {"model.padding": "zeros"},
}


def part_dgad_curve(args):
  """DGAD's headline AUROC at every --curve_every steps of one
  --curve_steps run per DGAD_CURVE_VARIANTS entry (--curve_variants), on
  class --curve_class, the subset and sizes of dgad_speed.py's runs:
  does the score still peak and fall, and which change removes that?"""
  from experiments import dgad_speed  # pylint: disable=g-import-not-at-top

  refuse_unknown(
    "--curve_variants", args.curve_variants.split(","), DGAD_CURVE_VARIANTS
  )
  saved = _load("dgad_curve")
  folder = dgad_speed.test_subset_folder(
    common.cifar_folder(str(DATA)), 300, WORK / "dgad_curve"
  )
  overrides = {
    "num_train_steps": args.curve_steps,
    "model.width": 32,
    "checkpoint_every_steps": args.curve_every,
    "keep_checkpoints": args.curve_steps // args.curve_every + 1,
    "eval.batch_size": 500,
    "log_every_steps": args.curve_every,
  }
  saved["command"] = (
    f"{SCRIPT} dgad_curve --curve_class={args.curve_class} "
    f"--curve_steps={args.curve_steps} --curve_every={args.curve_every}"
  )
  saved["overrides"] = overrides
  saved["class"] = args.curve_class
  runs = saved.setdefault("runs", {})
  for name in args.curve_variants.split(","):
    if name in runs:
      continue
    start = time.process_time()
    run = dgad_speed.run_one(
      "dgad",
      f"folder,folder={folder},normal_class={args.curve_class}",
      WORK / "dgad_curve" / name.replace("=", "_"),
      {**overrides, **DGAD_CURVE_VARIANTS[name]},
      score_initial=True,
    )
    run["cpu_seconds"] = round(time.process_time() - start, 1)
    runs[name] = run
    saved["machine"] = _machine()
    common.save_part("paper_dgad_curve", saved)
  common.write_section("paper_comparisons", render())


def render_dgad_curve(saved: dict) -> list[str]:
  """DGAD's AUROC per checkpoint, one row per variant, beside the
  zero-padded run of dgad_speed.py."""
  runs = saved.get("runs", {})
  if not runs:
    return []
  steps = sorted({p["step"] for r in runs.values() for p in r["points"]})
  lines = [
    (
      "#### (a) DGAD's score over a longer run: padding, learning rate, "
      "the real/fake term"
    ),
    "",
    (
      f"Command: `JAX_ONECLASS_DATA=/work/data_cache/cifar10 nice -n 19 "
      f"{saved['command']} --curve_variants=<rows>`. DGAD on one class, "
      f"{saved['overrides']['num_train_steps']} steps of batch 64, width 32, "
      "the configs' seed; headline `latent/gde` at every checkpoint (step "
      "0: the untrained initial network) on the "
      "seeded 300 test images per class of `dgad_speed.py` (whose run, "
      "with the zero padding that was then the default, peaked and fell). "
      "One change from the default per row, fixed before the runs; one "
      "seed, so differences of a few points are within noise."
    ),
    "",
    "| variant | " + " | ".join(f"step {s}" for s in steps) + " | CPU-s |",
    "|---|" + "---|" * (len(steps) + 1),
  ]
  for name in sorted(runs, key=list(DGAD_CURVE_VARIANTS).index):
    run = runs[name]
    auroc = {p["step"]: p["auroc"] for p in run["points"]}
    lines.append(
      f"| {name} | "
      + " | ".join(f"{auroc[s]:.3f}" if s in auroc else "-" for s in steps)
      + f" | {run['cpu_seconds']:.0f} |"
    )
  old = json.loads((common.RESULTS_DIR / "dgad_speed.json").read_text())
  old_run = old["runs"].get("0", {}).get("dgad")
  if old_run and saved.get("class", 0) == 0:
    auroc = {p["step"]: p["auroc"] for p in old_run["points"]}
    lines.append(
      "| dgad_speed.py's run (zeros, an earlier commit and CPU) | "
      + " | ".join(f"{auroc[s]:.3f}" if s in auroc else "-" for s in steps)
      + " | |"
    )
  return lines + ["", _machine_line(saved), ""]


def untrained_aurocs(
  method_name: str, arg: str, seed: int, extra: dict | None = None
) -> dict:
  """Every scorer's AUROC of `method_name`'s untrained initial network
  (config seed `seed`, the sizes of SIZES and `extra`), its classifiers
  fitted and calibrated as after training: what training has to beat."""
  import tempfile  # pylint: disable=g-import-not-at-top

  from jax_oneclass import evaluate  # pylint: disable=g-import-not-at-top
  from jax_oneclass import run as run_lib  # pylint: disable=g-import-not-at-top

  config = common.config_with(
    method_name,
    arg,
    {
      **SIZES[method_name],
      **_QUIET,
      **(extra or {}),
      "seed": seed,
      "progress_bar": False,
    },
  )
  with tempfile.TemporaryDirectory() as workdir:
    run = run_lib.setup(config, workdir)
    try:
      state = run_lib.run_initial_state(run)
      results = evaluate.evaluate_run(run, state, 0, output_dir=False)
    finally:
      run.checkpointer.close()
  return {"scorer": config.eval.scorer, "auroc": results["auroc"]}


def part_untrained(args):
  """The untrained networks of --methods on every --classes x --seeds,
  on the test subset of --test_per_class (200 for `gan`, 100 for
  `two_stage`): a reference column beside the trained ones."""
  saved = _load("untrained")
  classes = (
    range(10)
    if args.classes == "all"
    else [int(c) for c in args.classes.split(",")]
  )
  subset = str(args.test_per_class)
  for method_name in args.methods.split(","):
    runs = saved.setdefault("runs", {}).setdefault(method_name, {})
    per_class = runs.setdefault(subset, {})
    for c in classes:
      for seed in args.seeds.split(","):
        if seed in per_class.get(str(c), {}):
          continue
        res = untrained_aurocs(
          method_name,
          f"{_cifar_arg(args.test_per_class)},normal_class={c}",
          int(seed),
        )
        per_class.setdefault(str(c), {})[seed] = res
        print(
          f"{method_name} class {c} seed {seed}: "
          f"{res['auroc'][res['scorer']]:.4f}",
          flush=True,
        )
        saved["machine"] = _machine()
        common.save_part("paper_untrained", saved)
  common.write_section("paper_comparisons", render())


def _headlines(per_seed: dict) -> dict:
  """{seed: headline AUROC} of saved `untrained_aurocs` results."""
  return {int(s): r["auroc"][r["scorer"]] for s, r in per_seed.items()}


def _untrained_column(method_name: str, test_per_class) -> dict:
  """{class: {seed: headline AUROC}} of the untrained network on the
  same test subset, or {} if it was not scored there."""
  runs = _load("untrained").get("runs", {}).get(method_name, {})
  return {
    int(c): _headlines(per_seed)
    for c, per_seed in runs.get(str(test_per_class), {}).items()
  }


def part_gan(args):
  methods = args.only.split(",") if args.only else ("dgad", "ganomaly")
  _run_methods("gan", methods, args, None if args.only else _padding_runs)


def part_two_stage(args):
  """DisAug vs CLR vs RotNet; with --tag, a further run (e.g. a larger
  budget on fewer classes) in a part of its own, 'two_stage_<tag>'."""
  methods = args.only.split(",") if args.only else ("disaug", "clr", "rotnet")
  part = f"two_stage_{args.tag}" if args.tag else "two_stage"
  _run_methods(part, methods, args)
  if args.tag:
    saved = _load(part)
    saved["tag"] = args.tag
    common.save_part(f"paper_{part}", saved)
    common.write_section("paper_comparisons", render())


# --- (a) on the MVTec-shaped set ---------------------------------------------

MVTEC_FOLDER = CACHE / "cifar_mvtec"
MVTEC_TFDS = CACHE / "cifar_mvtec_tfds"
MVTEC_SIZE = 64  # make_mvtec_like.py's image size.
# Row label: (method, overrides). One sweep each over categories x seeds.
GAN_MVTEC_ROWS = {
  "dgad": ("dgad", {}),
  "dgad_zeros": ("dgad", {"model.padding": "zeros"}),
  "ganomaly": ("ganomaly", {}),
}


def mvtec_arg(category: str) -> str:
  """The config arg of one category of the MVTec-shaped set (made with
  make_mvtec_like.py's defaults if missing)."""
  from experiments.localization_quality import ensure_folder  # pylint: disable=g-import-not-at-top

  ensure_folder(MVTEC_FOLDER, [category])
  return (
    f"mvtec,folder={MVTEC_FOLDER},category={category},data_dir={MVTEC_TFDS}"
  )


def part_gan_mvtec(args):
  """DGAD (default and zero padding) vs GANomaly on the MVTec-shaped set,
  --categories x --seeds, the same CPU budget per member at 64 px; then
  the untrained networks on the same categories and seeds."""
  labels = args.only.split(",") if args.only else list(GAN_MVTEC_ROWS)
  refuse_unknown("--only", labels, GAN_MVTEC_ROWS)
  categories = args.categories.split(",")
  for category in categories:
    mvtec_arg(category)
  for label in labels:
    if label in _load("gan_mvtec").get("runs", {}) and not args.rerun:
      continue
    method_name, extra = GAN_MVTEC_ROWS[label]
    steps = steps_for(method_name, args.budget_cpu_s, MVTEC_SIZE)
    overrides = {
      **SIZES[method_name],
      **_QUIET,
      "data.image_size": MVTEC_SIZE,
      **extra,
      "num_train_steps": steps,
      "checkpoint_every_steps": steps,
    }
    run = sweep(
      method_name,
      mvtec_arg(categories[0]),
      WORK / "gan_mvtec" / label,
      overrides,
      args.seeds,
      classes=None,
      grid=[f"data.category={args.categories}"],
    )
    run.update(steps=steps, method=method_name, overrides=extra)
    saved = _load("gan_mvtec")
    saved.setdefault("runs", {})[label] = run
    saved.update(
      budget_cpu_s=args.budget_cpu_s,
      seeds=args.seeds,
      categories=args.categories,
      combine=COMBINE,
      machine=_machine(),
    )
    common.save_part("paper_gan_mvtec", saved)
  for method_name in ("dgad", "ganomaly"):
    for category in categories:
      for seed in args.seeds.split(","):
        saved = _load("gan_mvtec")
        done = saved.setdefault("untrained", {}).setdefault(method_name, {})
        if seed in done.get(category, {}):
          continue
        res = untrained_aurocs(
          method_name,
          mvtec_arg(category),
          int(seed),
          {"data.image_size": MVTEC_SIZE},
        )
        done.setdefault(category, {})[seed] = res
        print(
          f"untrained {method_name} {category} seed {seed}: "
          f"{res['auroc'][res['scorer']]:.4f}",
          flush=True,
        )
        common.save_part("paper_gan_mvtec", saved)
  common.write_section("paper_comparisons", render())


def _pixel_aurocs(run: dict) -> dict:
  """{category: {seed: pixel AUROC}} of a sweep's members' first map."""
  out = {}
  for member in run["results"]["members"]:
    maps = member.get("localization", {})
    if maps:
      first = maps[sorted(maps)[0]]
      out.setdefault(_row_key(member), {})[member["seed"]] = first[
        "pixel_auroc"
      ]
  return out


def render_gan_mvtec(saved: dict) -> list[str]:
  runs = saved.get("runs", {})
  if not runs:
    return []
  names = {
    "dgad": "DGAD (circular, default)",
    "dgad_zeros": "DGAD, model.padding=zeros",
    "ganomaly": "GANomaly",
  }
  columns = {names[k]: _aurocs(run) for k, run in runs.items()}
  for method_name, label in (
    ("dgad", "DGAD untrained"),
    ("ganomaly", "GANomaly untrained"),
  ):
    per_category = saved.get("untrained", {}).get(method_name, {})
    if per_category:
      columns[label] = {c: _headlines(v) for c, v in per_category.items()}
  lines = [
    "### (a) DGAD vs GANomaly on the MVTec-shaped set, 64 px",
    "",
    f"Claim: {PAPER['gan_mvtec']}. The set is CIFAR-10 categories upscaled "
    "to 64 px with synthetic defects (`make_mvtec_like.py`; NOT MVTec AD).",
    "",
    "Commands: `JAX_ONECLASS_DATA=/work/data_cache/cifar10 nice -n 19 "
    f"{SCRIPT} calibrate --methods=dgad,ganomaly --image_size=64` then "
    f"`{_combine_env(saved)}JAX_ONECLASS_DATA=/work/data_cache/cifar10 "
    f"nice -n 19 {SCRIPT} gan_mvtec --budget_cpu_s={saved['budget_cpu_s']:g}"
    f" --seeds={saved['seeds']} --categories={saved['categories']}` (each "
    "row one `python -m jax_oneclass.sweep` over categories x seeds). "
    "Sizes as (a) on CIFAR-10; the whole test split (100 good, 150 "
    "defective images per category); the headline image AUROC (DGAD "
    "latent/gde, GANomaly latent_mse), last step.",
    "",
    *class_table(columns),
    "",
  ]
  if "dgad" in runs and "ganomaly" in runs:
    dgad, ganomaly = (
      overall(_aurocs(runs[k]))[0] for k in ("dgad", "ganomaly")
    )
    lines += [
      f"DGAD - GANomaly: {100 * (dgad - ganomaly):+.1f} AUROC points "
      "(paper, MVTec AD: +2).",
      "",
    ]
  lines += _training_gain_lines(
    columns, ("DGAD", "GANomaly"), "the part's own untrained runs"
  )
  pixel = {names[k]: _pixel_aurocs(run) for k, run in runs.items()}
  pixel = {k: v for k, v in pixel.items() if v}
  if pixel:
    lines += [
      "Pixel AUROC of each method's anomaly map (mean over seeds):",
      "",
      *class_table(pixel),
      "",
    ]
  lines += [
    *budget_lines(saved, MVTEC_SIZE, names),
    "",
    "Every scorer (mean over categories ± std over seeds):",
    "",
    *scorer_table(runs),
    "",
    _machine_line(saved),
    "",
  ]
  return lines


# --- Few-shot localisation (Xu et al.'s claim) ---------------------------------


def _timed_run(method_name, arg, workdir, overrides) -> dict:
  """common.run_method plus this process's CPU seconds for the run."""
  start = time.process_time()
  res = common.run_method(method_name, arg, workdir, overrides)
  res["cpu_seconds"] = round(time.process_time() - start, 1)
  return res


def inference_rate(workdir, images, repeats: int = 2) -> dict:
  """Images per CPU second of a trained detector's predict (batch of all
  `images`), after one untimed call (compilation)."""
  import jax_oneclass  # pylint: disable=g-import-not-at-top

  detector = jax_oneclass.Detector.load(workdir)
  detector.predict(images)
  start = time.process_time()
  for _ in range(repeats):
    detector.predict(images)
  cpu = (time.process_time() - start) / repeats
  return {
    "images": len(images),
    "cpu_s": cpu,
    "images_per_cpu_s": len(images) / cpu,
  }


def _test_images(folder: Path, count: int):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  paths = sorted(folder.glob("test/*/*.png"))[:count]
  return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


FEW_SHOT_VARIANTS = (
  "gradient_preference",
  "nearest-neighbour repository",
  "reverse_distillation",
)


def few_shot_part(category: str, seed: int) -> str:
  """The results part of one few-shot (category, seed); automobile at seed 0
  (the first runs) is plain 'few_shot'."""
  name = "few_shot" if category == "automobile" else f"few_shot_{category}"
  return name if seed == 0 else f"{name}_seed{seed}"


def part_few_shot(args):
  from experiments import few_shot_benchmark as fsb  # pylint: disable=g-import-not-at-top

  category = args.category
  arg = mvtec_arg(category)
  folder = MVTEC_FOLDER
  # --fs_seed 0: the first runs (the configs' seeds, subset seed 0); any
  # other seed retrains the backbone and every row with that seed and
  # draws the K images with it, in a part of its own.
  seed = args.fs_seed
  part = few_shot_part(category, seed)
  seeded = {"seed": seed} if seed else {}
  saved = _load(part)
  saved["seed"] = seed
  saved["category"] = category
  saved["command"] = (
    f"{SCRIPT} few_shot --category={category} --shots={args.shots} "
    f"--ssl_steps={args.ssl_steps} --ssl_batch={args.ssl_batch} "
    f"--fs_steps={args.fs_steps} --fs_batch={args.fs_batch}"
    + (f" --fs_seed={seed}" if seed else "")
  )
  root = (
    WORK / "few_shot" / (category if seed == 0 else f"{category}_seed{seed}")
  )
  ssl_dir = root / "disaug_resnet18"
  if "ssl" not in saved:
    ssl = _timed_run(
      "disaug",
      arg,
      ssl_dir,
      {
        **_QUIET,
        "num_train_steps": args.ssl_steps,
        "checkpoint_every_steps": args.ssl_steps,
        "batch_size": args.ssl_batch,
        "data.image_size": 64,
        "model.arch": "resnet18",
        "classifiers": {"gde": {}},
        **seeded,
      },
    )
    saved["ssl"] = {
      "steps": args.ssl_steps,
      "batch_size": args.ssl_batch,
      "cpu_seconds": ssl["cpu_seconds"],
      "auroc": ssl["auroc"],
    }
    common.save_part(f"paper_{part}", saved)
  budget_args = types.SimpleNamespace(
    steps=args.fs_steps,
    batch_size=args.fs_batch,
    image_size=64,
    pretrained=str(ssl_dir),
    subset_seed=seed,
  )
  runs = saved.setdefault("runs", {})
  for shots in [int(k) for k in args.shots.split(",")]:
    for label in FEW_SHOT_VARIANTS:
      if str(shots) in runs.get(label, {}):
        continue
      method_name, extra, score = fsb.VARIANTS[label]
      workdir = root / f"k{shots}" / label.replace(" ", "_")
      res = _timed_run(
        method_name,
        arg,
        workdir,
        {**fsb._budget(budget_args, shots), **extra, **seeded},  # pylint: disable=protected-access
      )
      pixel = res["localization"]["anomaly_map"]
      runs.setdefault(label, {})[str(shots)] = {
        "image_auroc": res["auroc"][score],
        "pixel_auroc": pixel["pixel_auroc"],
        "aupro": pixel["aupro"],
        "step": res["step"],
        "cpu_seconds": res["cpu_seconds"],
        "workdir": str(workdir),
      }
      saved["machine"] = _machine()
      common.save_part(f"paper_{part}", saved)
  images = _test_images(folder / category, 64)
  largest = str(max(int(k) for k in args.shots.split(",")))
  saved["inference"] = {
    label: {
      "shots": int(largest),
      **inference_rate(runs[label][largest]["workdir"], images),
    }
    for label in FEW_SHOT_VARIANTS[:2]
    if largest in runs.get(label, {})
  }
  common.save_part(f"paper_{part}", saved)
  common.write_section("paper_comparisons", render())


# --- Report -------------------------------------------------------------------


def _row_key(member: dict):
  """A member's table row: its MVTec category, else its class."""
  return member["grid"].get("data.category", member["class"])


def _aurocs(run: dict, grid: dict | None = None, scorer: str = "") -> dict:
  """{class or category: {seed: AUROC}} of a sweep's members (of one grid
  point, ignoring the category), for `scorer` or each member's headline."""
  out = {}
  for member in run["results"]["members"]:
    point = {k: v for k, v in member["grid"].items() if k != "data.category"}
    if grid is not None and point != grid:
      continue
    name = scorer or member["scorer"]
    if name in member["auroc"]:
      out.setdefault(_row_key(member), {})[member["seed"]] = member["auroc"][
        name
      ]
  return out


def _mean(values) -> float:
  values = list(values)
  return sum(values) / len(values)


def _std(values) -> float:
  values = list(values)
  if len(values) < 2:
    return 0.0
  m = _mean(values)
  return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def overall(per_class: dict) -> tuple[float, float]:
  """Mean over classes of the seed means, and the sample std over seeds of
  the per-seed mean over classes (seeds that have every class)."""
  if not per_class:
    return float("nan"), float("nan")
  seeds = set.intersection(*(set(v) for v in per_class.values()))
  mean = _mean(_mean(v.values()) for v in per_class.values())
  per_seed = [_mean(v[s] for v in per_class.values()) for s in sorted(seeds)]
  return mean, _std(per_seed)


def _cell(values: dict) -> str:
  return f"{100 * _mean(values.values()):.1f}" if values else "-"


def class_table(columns: dict, names=None) -> list[str]:
  """Rows: classes (mean over seeds) and the overall mean +- seed std;
  columns: {label: {class: {seed: AUROC}}}. `names`: class names, or None
  where the rows are already names (MVTec categories)."""
  lines = [
    f"| {'class' if names else 'category'} | " + " | ".join(columns) + " |",
    "|---|" + "---|" * len(columns),
  ]
  classes = sorted({c for v in columns.values() for c in v})
  for c in classes:
    cells = [_cell(v.get(c, {})) for v in columns.values()]
    label = f"{c} ({names[c]})" if names else str(c)
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  cells = []
  for v in columns.values():
    mean, std = overall(v)
    cells.append(f"**{100 * mean:.1f} ± {100 * std:.1f}**")
  lines.append("| **mean** | " + " | ".join(cells) + " |")
  return lines


def scorer_table(runs: dict) -> list[str]:
  """Every scorer's overall AUROC per method."""
  lines = ["| method | scorer | mean AUROC ± seed std |", "|---|---|---|"]
  for label, run in runs.items():
    scorers = sorted({k for m in run["results"]["members"] for k in m["auroc"]})
    head = run["results"]["headline_scorer"]
    for scorer in scorers:
      mean, std = overall(_aurocs(run, None, scorer))
      mark = " (headline)" if scorer == head else ""
      lines.append(
        f"| {label} | {scorer}{mark} | {100 * mean:.1f} ± {100 * std:.1f} |"
      )
  return lines


def budget_lines(
  saved: dict, image_size: int = 32, names: dict | None = None
) -> list[str]:
  """What each run trained and what its whole sweep cost; a run's method
  (its label unless it saved one) names its calibration row at
  `image_size`, `names` its label in the table."""
  rows = _load("calibrate").get("rows", {})
  size = "" if image_size == 32 else f" at {image_size} px"
  lines = [
    f"| method | CPU-s / step{size} (calibrated) | steps | sweep CPU-s / "
    "member (train + eval) | sweep wall s (loaded machine) |",
    "|---|---|---|---|---|",
  ]
  for label, run in saved.get("runs", {}).items():
    key = calibration_key(run.get("method", label), image_size)
    members = len(run["results"]["members"])
    lines.append(
      f"| {(names or {}).get(label, label)} | "
      f"{rows[key]['cpu_s_per_step']:.3f} | {run['steps']} | "
      f"{run['cpu_s'] / members:.0f} | {run['wall_s']:.0f} |"
    )
  return lines


CLASSES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)


def _machine() -> dict:
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  return {**measure.machine(), "jaxlib": metadata.version("jaxlib")}


def _machine_line(saved: dict) -> str:
  m = saved.get("machine", {})
  load = ", ".join(f"{x:.1f}" for x in m.get("load_average", []))
  earlier = sorted(
    {e.get("cpu", "?") for e in saved.get("earlier_machines", [])}
    - {m.get("cpu")}
  )
  return (
    f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores shared "
    f"with other jobs (load average {load} at the end), jaxlib "
    f"{m.get('jaxlib', '?')}; every run under nice -n 19, so wall times "
    "are those of a loaded machine; CPU seconds are this job's own."
    + (
      f" Members added with --add; earlier ones ran on {', '.join(earlier)} "
      "(the same steps)."
      if earlier
      else ""
    )
  )


def _subset(per_class: dict, classes, seeds) -> dict:
  return {
    c: {s: v for s, v in per_class[c].items() if s in seeds}
    for c in classes
    if c in per_class
  }


def variant_table(saved: dict) -> list[str]:
  """DGAD's padding modes and other grids against the default DGAD and
  GANomaly on the same classes and seeds."""
  runs = saved.get("runs", {})
  variants = {}
  padding = saved.get("padding", {}).get("run")
  if padding:
    for mode in ("zeros", "reflect"):
      variants[f"DGAD, model.padding={mode}"] = _aurocs(
        padding, {"model.padding": mode}
      )
  for spec, run in saved.get("grids", {}).items():
    key = spec.partition("=")[0]
    for value in sorted(
      {json.dumps(m["grid"][key]) for m in run["results"]["members"]}
    ):
      variants[f"DGAD, {key}={json.loads(value)}"] = _aurocs(
        run, {key: json.loads(value)}
      )
  if not variants:
    return []
  classes = sorted({c for v in variants.values() for c in v})
  seeds = sorted({s for v in variants.values() for c in v.values() for s in c})
  rows = {
    "DGAD (default: circular, adversarial_weight 1)": _subset(
      _aurocs(runs["dgad"]), classes, seeds
    )
    if "dgad" in runs
    else {},
    **variants,
    "GANomaly": _subset(_aurocs(runs["ganomaly"]), classes, seeds)
    if "ganomaly" in runs
    else {},
  }
  commands = [saved.get("padding", {}).get("command")] + [
    r.get("script_command") for r in saved.get("grids", {}).values()
  ]
  lines = [
    f"DGAD variants (the same budget) on classes {classes}, seeds {seeds}; "
    "the defaults were fixed before these runs and stay. Commands: "
    + "; ".join(f"`{c}`" for c in commands if c)
    + ".",
    "",
    "| variant | " + " | ".join(str(c) for c in classes) + " | mean |",
    "|---|" + "---|" * (len(classes) + 1),
  ]
  for label, per_class in rows.items():
    if not per_class:
      continue
    cells = [_cell(per_class.get(c, {})) for c in classes]
    mean = _mean(_mean(v.values()) for v in per_class.values() if v)
    lines.append(
      f"| {label} | " + " | ".join(cells) + f" | **{100 * mean:.1f}** |"
    )
  return lines + [""]


def _combine_env(saved: dict) -> str:
  """The PAPERS_COMBINE setting of a part's runs, when not the default."""
  combine = saved.get("combine", "auto")
  return "" if combine == "auto" else f"PAPERS_COMBINE={combine} "


UNTRAINED_COMMAND = (
  f"`{SCRIPT} untrained --methods=<method> --seeds=<the table's> "
  "--test_per_class=<the table's>`"
)


def _training_gain_lines(
  columns: dict, names, source: str = UNTRAINED_COMMAND
) -> list[str]:
  """'What training added': each trained column's mean minus its untrained
  column's (from `source`), where both exist."""
  gains = []
  for name in names:
    trained = next((v for k, v in columns.items() if k.startswith(name)), {})
    untrained = columns.get(f"{name} untrained", {})
    if trained and untrained:
      gain = overall(trained)[0] - overall(untrained)[0]
      gains.append(f"{name} {100 * gain:+.1f}")
  if not gains:
    return []
  return [
    "What training added to the untrained network's score (same scorer, "
    f"classifier and test images; {source}): "
    + ", ".join(gains)
    + " AUROC points.",
    "",
  ]


def render_gan(saved: dict) -> list[str]:
  runs = saved.get("runs", {})
  if not runs:
    return []
  columns = {f"{label}": _aurocs(run) for label, run in runs.items()}
  columns = {
    ("DGAD (circular, default)" if k == "dgad" else "GANomaly"): v
    for k, v in columns.items()
  }
  for name, label in (
    ("dgad", "DGAD untrained"),
    ("ganomaly", "GANomaly untrained"),
  ):
    untrained = _untrained_column(name, saved.get("test_per_class"))
    if untrained:
      columns[label] = untrained
  dgad, ganomaly = (overall(_aurocs(runs[k]))[0] for k in ("dgad", "ganomaly"))
  lines = [
    "### (a) DGAD vs GANomaly, CIFAR-10, 32 px",
    "",
    f"Claim: {PAPER['gan']}.",
    "",
    f"Command: `{_combine_env(saved)}JAX_ONECLASS_DATA=/work/data_cache/"
    f"cifar10 nice -n 19 {SCRIPT} gan "
    f"--budget_cpu_s={saved['budget_cpu_s']:g} "
    f"--seeds={saved['seeds']} --test_per_class={saved['test_per_class']}`"
    f" (each method one `python -m jax_oneclass.sweep` over every class x "
    f"seed). Both: DCGAN width 16, latent 100, batch 64 "
    f"images, Adam 2e-4; the same {saved['budget_cpu_s']:g} CPU-s of train "
    "steps per member (steps = budget / calibrated CPU-s per step); last "
    "step, no selection on the test split. Headline scorers fixed a "
    "priori: DGAD latent/gde, GANomaly latent_mse. Test split: the first "
    f"{saved['test_per_class']} images of each class (by file name).",
    "",
    *class_table(columns, CLASSES),
    "",
    f"DGAD - GANomaly: {100 * (dgad - ganomaly):+.1f} AUROC points "
    "(paper: +6).",
    "",
    *_training_gain_lines(columns, ("DGAD", "GANomaly")),
    *budget_lines(saved),
    "",
    *variant_table(saved),
    "Every scorer (mean over classes ± std over seeds of the class mean):",
    "",
    *scorer_table(runs),
    "",
    _machine_line(saved),
    "",
  ]
  return lines


def render_two_stage(saved: dict) -> list[str]:
  runs = saved.get("runs", {})
  if not runs:
    return []
  labels = {"disaug": "DisAug CLR", "clr": "CLR", "rotnet": "RotNet"}
  columns = {labels[k]: _aurocs(run) for k, run in runs.items()}
  means = {labels[k]: overall(_aurocs(run))[0] for k, run in runs.items()}
  trained = {(c, sd) for v in columns.values() for c in v for sd in v[c]}
  untrained = {
    c: {sd: a for sd, a in per_seed.items() if (c, sd) in trained}
    for c, per_seed in _untrained_column(
      "disaug", saved.get("test_per_class")
    ).items()
  }
  untrained = {c: v for c, v in untrained.items() if v}
  gain = []
  if untrained:
    columns["untrained ResNet-18 (DisAug's init)"] = untrained
    base = overall(untrained)[0]
    gain = [
      "What training added to the untrained ResNet-18's score (DisAug's "
      "initialisation, the same scorer, GDE and test subset; "
      f"`{SCRIPT} untrained --methods=disaug --seeds={saved['seeds']} "
      f"--test_per_class={saved['test_per_class']}`): "
      + ", ".join(f"{k} {100 * (m - base):+.1f}" for k, m in means.items())
      + " AUROC points.",
      "",
    ]
  order = " > ".join(sorted(means, key=means.get, reverse=True))
  tag = saved.get("tag", "")
  title = (
    [
      f"#### (b) at {saved['budget_cpu_s']:g} CPU-s per member, classes "
      f"{saved['classes']}, seeds {saved['seeds']} (`--tag={tag}`)",
      "",
    ]
    if tag
    else [
      "### (b) DisAug CLR vs CLR vs RotNet, CIFAR-10",
      "",
      f"Claim: {PAPER['two_stage']}.",
      "",
    ]
  )
  return [
    *title,
    f"Command: `{_combine_env(saved)}JAX_ONECLASS_DATA=/work/data_cache/"
    f"cifar10 nice -n 19 {SCRIPT} two_stage "
    f"--budget_cpu_s={saved['budget_cpu_s']:g} "
    f"--seeds={saved['seeds']} --classes={saved.get('classes', 'all')} "
    f"--test_per_class={saved['test_per_class']} --stack=10"
    + (f" --tag={tag}" if tag else "")
    + "`."
    " ResNet-18 at width 16 (the paper's: 64), heads (128, 128), each "
    "config's own batch, views, augmentation and SGD; the same "
    f"{saved['budget_cpu_s']:g} CPU-s of train steps per member; headline "
    "pool/gde/rot_avg (fixed a priori, as the configs set it); last step. "
    f"Test split: the first {saved['test_per_class']} images of each class.",
    "",
    *class_table(columns, CLASSES),
    "",
    f"Order here: {order} (paper: DisAug CLR > CLR > RotNet, DisAug 92.5).",
    "",
    *gain,
    *budget_lines(saved),
    "",
    _machine_line(saved),
    "",
  ]


def render() -> str:
  lines = [
    "## Seed papers' comparisons at a small CPU budget",
    "",
    "`experiments/paper_comparisons.py`: each seed paper's comparison at "
    "the same CPU-time budget per method (train steps from a calibrated "
    "CPU-s per step). The budgets are tiny next to the papers' (a shared "
    "2-core CPU), so the numbers test the claims only at this budget.",
    "",
  ]
  lines += render_gan(_load("gan"))
  lines += render_gan_mvtec(_load("gan_mvtec"))
  lines += render_dgad_curve(_load("dgad_curve"))
  lines += render_two_stage(_load("two_stage"))
  for path in sorted(common.RESULTS_DIR.glob("paper_two_stage_*.json")):
    lines += render_two_stage(json.loads(path.read_text()))
  few_shot = [_load("few_shot")] + [
    json.loads(path.read_text())
    for path in sorted(common.RESULTS_DIR.glob("paper_few_shot_*.json"))
  ]
  for saved in few_shot:
    lines += render_few_shot(saved)
  lines += few_shot_summary(few_shot)
  return "\n".join(lines)


def few_shot_summary(runs: list[dict]) -> list[str]:
  """Mean pixel and image AUROC per method and K over every (category,
  seed) of the few-shot parts that has all K."""
  complete = [s for s in runs if s.get("runs")]
  if len(complete) < 2:
    return []
  shots = sorted(
    {int(k) for s in complete for v in s["runs"].values() for k in v}
  )
  lines = [
    f"#### (c) summed up: mean image AUROC / pixel AUROC over the "
    f"{len(complete)} (category, seed) runs above",
    "",
    "| method | " + " | ".join(f"K={k}" for k in shots) + " |",
    "|---|" + "---|" * len(shots),
  ]
  for label in FEW_SHOT_VARIANTS:
    cells = []
    for k in shots:
      rows = [
        s["runs"][label][str(k)]
        for s in complete
        if str(k) in s["runs"].get(label, {})
      ]
      if len(rows) < len(complete):
        cells.append("-")
        continue
      cells.append(
        f"{_mean([r['image_auroc'] for r in rows]):.3f} / "
        f"{_mean([r['pixel_auroc'] for r in rows]):.3f}"
      )
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return lines + [""]


def render_few_shot(saved: dict) -> list[str]:
  runs = saved.get("runs", {})
  if not runs:
    return []
  shots = sorted({int(k) for v in runs.values() for k in v})
  seed = saved.get("seed", 0)
  category = saved.get("category", "automobile")
  if seed or category != "automobile":
    title = [
      f"#### (c), {category}, seed {seed}"
      + (
        f": the backbone and every row trained with seed {seed}, the K "
        "images drawn with it"
        if seed
        else ": the configs' seeds, the K images drawn with seed 0"
      ),
      "",
    ]
  else:
    title = [
      "### (c) Few-shot: gradient preference vs reverse distillation vs a "
      "nearest-neighbour repository",
      "",
      "Claim: Xu et al. 2022: gradient preference beats the state of the "
      "art in the few-shot setting, with a faster (smaller) repository.",
      "",
    ]
  lines = [
    *title,
    f"Command: `JAX_ONECLASS_DATA=/work/data_cache/cifar10 nice -n 19 "
    f"{saved['command']}`. The synthetic MVTec-shaped set "
    "(`make_mvtec_like.py`; NOT MVTec AD), 64 px. Backbone: a torchvision "
    "ResNet-18 that DisAug CLR trained on the category's good training "
    f"images ({saved['ssl']['steps']} steps of batch "
    f"{saved['ssl']['batch_size']}, {saved['ssl']['cpu_seconds']:.0f} "
    "CPU-s; no ImageNet weights here), passed as `model.pretrained=<its "
    "workdir>` to every row. Nearest-neighbour repository: gradient "
    "preference with no MLP and every patch point (the full bank). Cells: "
    "image AUROC / pixel AUROC / AUPRO (GP, NN: nn_max; RD: map_max); "
    "CPU-s of the whole run (train + eval).",
    "",
    "| method | " + " | ".join(f"K={k}" for k in shots) + " |",
    "|---|" + "---|" * len(shots),
  ]
  for label, per_k in runs.items():
    cells = []
    for k in shots:
      r = per_k.get(str(k))
      cells.append(
        f"{r['image_auroc']:.3f} / {r['pixel_auroc']:.3f} / "
        f"{r['aupro']:.3f} ({r['cpu_seconds']:.0f} s)"
        if r
        else "-"
      )
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  inference = saved.get("inference", {})
  if inference:
    lines += [
      "",
      "Inference (Detector.predict on one batch of 64 test images, CPU "
      "seconds, after one untimed call):",
      "",
      "| repository | K | images / CPU-s |",
      "|---|---|---|",
    ]
    for label, r in inference.items():
      lines.append(f"| {label} | {r['shots']} | {r['images_per_cpu_s']:.1f} |")
  lines += ["", _machine_line(saved), ""]
  return lines


def part_report(args):
  del args
  common.write_section("paper_comparisons", render())


PARTS = {
  "calibrate": part_calibrate,
  "gan": part_gan,
  "gan_mvtec": part_gan_mvtec,
  "two_stage": part_two_stage,
  "few_shot": part_few_shot,
  "dgad_grid": part_dgad_grid,
  "dgad_curve": part_dgad_curve,
  "untrained": part_untrained,
  "padding": part_padding,
  "report": part_report,
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("part", choices=sorted(PARTS))
  parser.add_argument("--methods", default="dgad,ganomaly,rotnet,clr,disaug")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--budget_cpu_s", type=float, default=25.0)
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--classes", default="all")
  parser.add_argument(
    "--only", default="", help="gan, two_stage: these methods only"
  )
  parser.add_argument(
    "--tag",
    default="",
    help="two_stage: save as the part two_stage_<tag> beside the main one.",
  )
  parser.add_argument("--grid", default="", help="dgad_grid: key=v1,v2")
  parser.add_argument("--padding_classes", default="all")
  parser.add_argument("--padding_seeds", default="0")
  parser.add_argument("--rerun", action="store_true")
  parser.add_argument(
    "--add",
    action="store_true",
    help="gan, two_stage: train --classes x --seeds and add them to the "
    "saved runs (same budget); the tables then cover the union.",
  )
  parser.add_argument("--stack", type=int, default=0, help="sweep --stack")
  parser.add_argument("--curve_class", type=int, default=0)
  parser.add_argument("--curve_steps", type=int, default=600)
  parser.add_argument("--curve_every", type=int, default=100)
  parser.add_argument(
    "--curve_variants",
    default=",".join(DGAD_CURVE_VARIANTS),
    help="dgad_curve: rows of DGAD_CURVE_VARIANTS, comma-separated.",
  )
  parser.add_argument("--category", default="automobile")
  parser.add_argument(
    "--categories",
    default="automobile,horse",
    help="gan_mvtec: categories of the MVTec-shaped set.",
  )
  parser.add_argument(
    "--image_size",
    type=int,
    default=32,
    help="calibrate: the batch's image size (64 for gan_mvtec).",
  )
  parser.add_argument("--shots", default="1,2,4,8,16")
  parser.add_argument("--ssl_steps", type=int, default=60)
  parser.add_argument("--ssl_batch", type=int, default=8)
  parser.add_argument("--fs_steps", type=int, default=20)
  parser.add_argument(
    "--fs_seed",
    type=int,
    default=0,
    help="few_shot: 0 the first runs; another seed retrains all with it.",
  )
  parser.add_argument("--fs_batch", type=int, default=8)
  parser.add_argument(
    "--test_per_class",
    type=int,
    default=200,
    help="Test images per class (the first by file name; 0: all 1,000).",
  )
  args = parser.parse_args()
  PARTS[args.part](args)


if __name__ == "__main__":
  main()
