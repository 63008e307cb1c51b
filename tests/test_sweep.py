"""Sweeps: members equal their single runs, faults, tables, command line."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_oneclass import evaluate, methods, sweep, sweep_cli, train
from jax_oneclass import main as main_lib
from jax_oneclass import run as run_lib
from jax_oneclass.errors import ConfigError
from tests.conftest import (
  METHODS,
  REPO,
  command_in_process,
  sigterm_once_saved,
  tiny_config,
)

# One method per family is also compared with its single runs.
_FAMILY_CHECKED = {}
for _name in METHODS:
  _FAMILY_CHECKED.setdefault(methods.family(_name), _name)
# Parameters of a member and its single run after the same steps. A
# program holding several members rounds some sums differently, and Adam
# turns rounding in near-zero gradients into parameter steps. Measured max
# |difference| after 4 steps: unrolled 6e-8 (RotNet), 1e-9 (GANomaly),
# 1.3e-5 (CLR, one weight of 144), 6.7e-5 (reverse distillation, lr 5e-3,
# one weight); vmap 1.1e-6 (RotNet). See sweep.VMAP_TOLERANCE too.
_ATOL, _RTOL = 1e-4, 1e-5
_ATOL_ADAM_DRIFT = {"reverse_distillation": 5e-4}


def _combine(method: str) -> str:
  """Family representatives run unrolled (reverse distillation 'auto',
  which must notice that vmap drifts); the others vmap."""
  if method == "reverse_distillation":
    return "auto"
  return (
    "unrolled" if _FAMILY_CHECKED[methods.family(method)] == method else "vmap"
  )


def _state(workdir, config):
  run = run_lib.setup(config, workdir, mode="eval")
  try:
    state, step = run_lib.restore_latest(run)
  finally:
    run.checkpointer.close()
  return jax.device_get(state), step


def _assert_close(a, b, atol=_ATOL):
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(
      np.asarray(x, np.float64),
      np.asarray(y, np.float64),
      rtol=_RTOL,
      atol=atol,
    ),
    a,
    b,
  )


def _sweep_config(method, steps=4):
  config = tiny_config(method, steps=steps)
  config.eval.plots = False
  config.eval.num_overlays = 0
  return config


# --- Input checks -------------------------------------------------------------


def test_grid_values_are_typed_and_bad_grids_fail():
  config = _sweep_config("rotnet")
  assert sweep.parse_grid(
    ["optimizer.learning_rate=1e-3,3e-4", "model.head_dims=(16, 8),(8,)"],
    config,
  ) == [
    ("optimizer.learning_rate", [1e-3, 3e-4]),
    ("model.head_dims", [(16, 8), (8,)]),
  ]
  for bad, message in [
    ("optimizer.lr=1", "Unknown config key"),
    ("optimizer.learning_rate=", "no values"),
    ("optimizer.learning_rate", "key=value"),
    ("seed=1,2", "--seeds"),
    ("batch_size=a", "cannot take"),
  ]:
    with pytest.raises(ConfigError, match=message):
      sweep.parse_grid([bad], config)


def test_classes_seeds_shard_and_stack_are_checked(tmp_path):
  config = _sweep_config("rotnet")
  assert sweep.resolve_classes(config, "all") == list(range(10))
  assert sweep.resolve_classes(config, "0,3") == [0, 3]
  with pytest.raises(ConfigError, match="10 is not a class of digits"):
    sweep.resolve_classes(config, "3,10")
  with pytest.raises(ConfigError, match="integers"):
    sweep_cli.parse_ints("0,x", "seeds")
  assert sweep_cli.parse_shard("1/4") == (1, 4)
  for bad in ("4/4", "1", "-1/2"):
    with pytest.raises(ConfigError, match="--shard"):
      sweep_cli.parse_shard(bad)
  with pytest.raises(ConfigError, match="--stack=0"):
    sweep.plan(config, tmp_path, "0", None, [], 0, (0, 1))


def test_member_folders_and_shards(tmp_path):
  config = _sweep_config("rotnet")
  grid = sweep.parse_grid(["optimizer.learning_rate=1e-3,3e-4"], config)
  members = sweep.make_members(config, tmp_path, [0, 3], [0, 1], grid)
  assert len(members) == 8
  assert members[0].workdir == (
    tmp_path / "class_0" / "seed_0" / "optimizer.learning_rate=0.001"
  )
  assert members[-1].config.optimizer.learning_rate == 3e-4
  assert members[-1].config.data.normal_class == 3
  assert members[-1].config.seed == 1
  assert config.seed == 1 and config.data.normal_class == 1  # Untouched.
  shards = [sweep.shard_members(members, i, 3) for i in range(3)]
  assert sorted((m.workdir for s in shards for m in s)) == sorted(
    m.workdir for m in members
  )


def test_mesh_puts_members_on_devices_where_they_divide():
  assert sweep.mesh_shape(8, 8, 16) == (8, 1)
  assert sweep.mesh_shape(8, 4, 16) == (4, 2)
  assert sweep.mesh_shape(8, 10, 16) == (2, 4)
  assert sweep.mesh_shape(8, 3, 16) == (1, 8)
  assert sweep.mesh_shape(8, 8, 4) == (8, 1)
  assert sweep.mesh_shape(1, 10, 16) == (1, 1)
  assert sweep.mesh_shape(8, 8, 16, num_processes=2) == (1, 8)
  assert sweep.sweep_mesh(2, 16).devices.size == jax.device_count()


def test_frozen_members_keep_their_state():
  active = jnp.array([True, False])
  old = {"w": jnp.zeros((2, 3)), "key": jax.random.split(jax.random.key(0))}
  new = {"w": jnp.ones((2, 3)), "key": jax.random.split(jax.random.key(1))}
  kept = sweep._keep(active, new, old)  # pylint: disable=protected-access
  np.testing.assert_array_equal(kept["w"], [[1, 1, 1], [0, 0, 0]])
  assert (
    jax.random.key_data(kept["key"][0]).tolist()
    == jax.random.key_data(new["key"][0]).tolist()
  )
  assert (
    jax.random.key_data(kept["key"][1]).tolist()
    == jax.random.key_data(old["key"][1]).tolist()
  )


def test_summary_overall_is_mean_over_classes_and_std_over_seeds():
  summary = sweep.summarise_scorer(
    {"0": {0: 0.9, 1: 0.8}, "1": {0: 0.7, 1: 0.6}}
  )
  assert summary["rows"]["0"]["mean"] == pytest.approx(0.85)
  assert summary["rows"]["0"]["std"] == pytest.approx(
    np.std([0.9, 0.8], ddof=1)
  )
  overall = summary["overall"]
  assert overall["mean"] == pytest.approx(0.75)
  assert overall["seed_means"] == pytest.approx({"0": 0.8, "1": 0.7})
  assert overall["std"] == pytest.approx(np.std([0.8, 0.7], ddof=1))


def test_the_reference_file_names_its_sources():
  disaug = sweep.reference_results("disaug", "cifar10")
  assert [r["value"] for r in disaug] == [92.5]
  assert "Sohn" in disaug[0]["source"]
  assert sorted(
    r["value"] for r in sweep.reference_results("reverse_distillation", "mvtec")
  ) == [97.8, 98.5]
  assert sweep.reference_results("rotnet", "digits") == []


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "jax_oneclass.sweep", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=400,
    check=False,
  )


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
  # The other cases run in process: tests/test_bad_input.py.
  out = _cli(
    "--config=configs/rotnet.py:digits",
    f"--workdir={tmp_path}",
    "--classes=0,12",
  )
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines() == [
    "error: --classes: 12 is not a class of digits (classes 0..9)."
  ]
  assert not list(tmp_path.iterdir())  # Nothing trained or written.


# --- Members equal their single runs ------------------------------------------


def _single_run_config(method, normal_class, seed):
  config = _sweep_config(method)
  config.data.normal_class, config.seed = normal_class, seed
  return config


def _single_run(config, workdir, evaluated: bool):
  """A single run, trained as `train.train_and_evaluate` trains it: (its
  final state on the host, its newest checkpoint's step, its results when
  `evaluated`, else None)."""
  run = run_lib.setup(config, workdir)
  try:
    state = train.train_run(run)
    step = run.checkpointer.latest_step()
    results = evaluate.evaluate_run(run, state, step) if evaluated else None
    return jax.device_get(state), step, results
  finally:
    run.checkpointer.close()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_sweeps_and_members_equal_single_runs(
  tmp_path, method, capsys
):
  config = _sweep_config(method)
  report = sweep.run_sweep(
    config,
    tmp_path / "sweep",
    classes="0,3",
    seeds="0",
    combine=_combine(method),
  )
  if method == "reverse_distillation":  # vmap drifts: see _combine.
    assert "using unrolled (vmap's state differs" in capsys.readouterr().out
  members = report["members"]
  assert [(m["class"], m["seed"], m["status"], m["step"]) for m in members] == [
    (0, 0, "finished", 4),
    (3, 0, "finished", 4),
  ]
  table = (tmp_path / "sweep" / sweep.TABLE_FILE).read_text()
  assert "| 0 |" in table and "| 3 |" in table and "**overall**" in table
  assert (tmp_path / "sweep" / sweep.PLOT_FILE).stat().st_size > 0
  saved = json.loads((tmp_path / "sweep" / sweep.RESULTS_FILE).read_text())
  assert saved["headline_scorer"] == members[0]["scorer"]
  if _FAMILY_CHECKED[methods.family(method)] != method and method != "rotnet":
    return  # RotNet: vmap against its single runs too.
  # Every member's state equals its single run's. The sweep evaluates each
  # member as a single run does (evaluate.evaluate_run of its state), so
  # the first member's results stand for the evaluation.
  for member in members:
    single = _single_run_config(method, member["class"], member["seed"])
    evaluated = member is members[0]
    alone, step_alone, results = _single_run(
      single, tmp_path / f"single_{member['class']}", evaluated
    )
    if evaluated:
      for scorer, auroc in results["auroc"].items():
        assert member["auroc"][scorer] == pytest.approx(auroc, abs=5e-4), scorer
    swept, step = _state(tmp_path / "sweep" / member["workdir"], single)
    assert step == step_alone == 4
    _assert_close(swept, alone, _ATOL_ADAM_DRIFT.get(method, _ATOL))


# --- Faults -------------------------------------------------------------------


# The interrupted sweeps (SIGTERM, halt_after_step) run long enough for a
# SIGTERM to land mid-run and share one uninterrupted reference.
_LONG_KEYS = {
  "num_train_steps": 40,
  "checkpoint_every_steps": 4,
  "log_every_steps": 2,
  "eval.plots": False,
  "eval.num_overlays": 0,
}
# One combine mode throughout: 'auto' may time differently per call.
_LONG_SWEEP = {"classes": "0,3", "seeds": "0", "combine": "unrolled"}
_STRAIGHT = pytest.mark.xdist_group("sweep_straight")


def _long_config():
  config = _sweep_config("rotnet")
  config.update_from_flattened_dict(_LONG_KEYS)
  return config


@pytest.fixture(scope="module")
def straight_sweep(tmp_path_factory):
  """(workdir, report) of the uninterrupted 40-step sweep of classes 0, 3."""
  workdir = tmp_path_factory.mktemp("straight")
  return workdir, sweep.run_sweep(_long_config(), workdir, **_LONG_SWEEP)


@_STRAIGHT
def test_halted_sweep_resumes_to_the_same_table_and_skips_finished(
  tmp_path, straight_sweep
):
  straight_dir, straight = straight_sweep
  config = _long_config()
  halted = _long_config()
  halted.halt_after_step = 2
  assert sweep.run_sweep(halted, tmp_path, **_LONG_SWEEP) == {}
  status = json.loads(
    (tmp_path / "class_3" / "seed_0" / sweep.STATUS_FILE).read_text()
  )
  assert status["status"] == "halted" and status["step"] == 2
  resumed = sweep.run_sweep(config, tmp_path, **_LONG_SWEEP)
  assert (tmp_path / sweep.TABLE_FILE).read_text() == (
    straight_dir / sweep.TABLE_FILE
  ).read_text()
  for a, b in zip(resumed["members"], straight["members"]):
    assert a["auroc"] == pytest.approx(b["auroc"], abs=1e-6)

  results = tmp_path / "class_0" / "seed_0" / "results.json"
  before = results.stat().st_mtime_ns
  again = sweep.run_sweep(config, tmp_path, **_LONG_SWEEP)
  assert results.stat().st_mtime_ns == before  # Skipped: not evaluated.
  assert again["summary"] == resumed["summary"]


def _poison_class_3(train_batches):
  """A `data.train_batches` whose batches of normal class 3 are NaN from
  the third step on."""

  def poisoned(config, start_step=0):
    for index, batch in enumerate(
      train_batches(config, start_step), start_step
    ):
      if config.data.normal_class == 3 and index >= 2:
        batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
      yield batch

  return poisoned


def _stop_class_5(get_method):
  """A `methods.get_method` whose methods report stop_training from the
  third step on for normal class 5 (its batches' labels), freezing there."""

  def wrapped(*args, **kwargs):
    method = get_method(*args, **kwargs)
    step_fn = method.train_step

    def train_step(state, batch, rng):
      new, metrics = step_fn(state, batch, rng)
      stop = (batch["label"][0] == 5) & (state.step >= 2)
      return new, {**metrics, "stop_training": stop.astype(jnp.float32)}

    method.train_step = train_step
    return method

  return wrapped


def test_non_finite_and_early_stopping_members_stop_alone(
  tmp_path, monkeypatch
):
  # One sweep: class 3 goes non-finite, class 5 stops early, class 0 goes on.
  monkeypatch.setattr(
    sweep.data, "train_batches", _poison_class_3(sweep.data.train_batches)
  )
  monkeypatch.setattr(
    run_lib.methods, "get_method", _stop_class_5(run_lib.methods.get_method)
  )
  config = _sweep_config("rotnet", steps=6)
  workdir = tmp_path / "sweep"
  report = sweep.run_sweep(
    config, workdir, classes="0,3,5", seeds="0", combine="vmap"
  )
  by_class = {m["class"]: m for m in report["members"]}
  assert (by_class[0]["status"], by_class[0]["step"]) == ("finished", 6)

  # The non-finite member is named, keeps its last good checkpoint and has
  # no results.
  assert by_class[3]["status"] == "non_finite"
  assert by_class[3]["error"].startswith("Non-finite")
  assert "last good checkpoint is step 2" in by_class[3]["error"]
  assert not (workdir / "class_3" / "seed_0" / "results.json").exists()
  table = (workdir / sweep.TABLE_FILE).read_text()
  assert "class_3/seed_0: non_finite" in table
  state, step = _state(
    workdir / "class_3" / "seed_0", _single_run_config("rotnet", 3, 0)
  )
  assert step == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))

  # The early-stopping member froze where its single run stops.
  assert (by_class[5]["status"], by_class[5]["step"]) == ("stopped_early", 4)
  single = _single_run_config("rotnet", 5, 0)
  single.num_train_steps = 6
  alone, step_alone, _ = _single_run(single, tmp_path / "single", False)
  swept, step = _state(workdir / "class_5" / "seed_0", single)
  assert step == step_alone == 4 and int(swept.step) == 4
  _assert_close(swept, alone)
  # Finished and stopped early: a rerun of those two neither trains nor
  # evaluates them again (the non-finite member would train again).
  again = sweep.run_sweep(config, workdir, classes="0,5", seeds="0")
  assert again["summary"] == report["summary"]


def test_command_line_sweeps_in_shards_and_evaluates_a_member(
  tmp_path, monkeypatch, capsys
):
  config_file = tmp_path / "tiny.py"
  config_file.write_text(
    "from tests.conftest import tiny_config\n"
    "def get_config(arg=None):\n"
    "  return tiny_config('rotnet', steps=2)\n"
  )
  workdir = tmp_path / "w"

  def sweep_shard(shard):
    """(exit code, sweep_results.json, stdout) of one shard's command."""
    code, out, err = command_in_process(
      lambda: sweep_cli.run(sweep.run_checked),
      [
        f"--config={config_file}",
        "--classes=0,3",
        "--seeds=0",
        "--stack=1",
        "--config.eval.plots=False",
        f"--shard={shard}",
        f"--workdir={workdir}",
      ],
      monkeypatch,
      capsys,
    )
    assert code == 0, err[-3000:]
    saved = json.loads((workdir / sweep.RESULTS_FILE).read_text())
    return saved, out

  # Each shard trains its own members; the last one's table has them all.
  first, _ = sweep_shard("0/2")
  assert (workdir / "class_0" / "seed_0" / "results.json").exists()
  assert not (workdir / "class_3").exists()
  assert [m["status"] for m in first["members"]] == ["finished", "missing"]
  second, out = sweep_shard("1/2")
  assert [m["status"] for m in second["members"]] == ["finished", "finished"]
  assert set(second["summary"][""][second["headline_scorer"]]["rows"]) == {
    "0",
    "3",
  }
  assert "**overall**" in out
  rows = [line for line in out.splitlines() if line.startswith("| ")]
  assert len(rows) == 4  # Header, classes 0 and 3, overall.

  member = workdir / "class_3" / "seed_0"
  # `--mode=eval` of the member, through main's entry point.
  code, _, err = command_in_process(
    main_lib.run,
    [
      f"--workdir={member}",
      "--mode=eval",
      f"--results_path={tmp_path / 'eval'}",
    ],
    monkeypatch,
    capsys,
  )
  assert code == 0, err[-3000:]
  again = json.loads((tmp_path / "eval" / "results.json").read_text())
  saved = json.loads((member / "results.json").read_text())
  assert again["auroc"] == saved["auroc"] and again["step"] == 2
  from jax_oneclass import detector  # pylint: disable=g-import-not-at-top

  loaded = detector.Detector.load(member)
  assert loaded.step == 2 and loaded.scorer == saved["scorer"]


def _signature(config):
  from jax_oneclass import data  # pylint: disable=g-import-not-at-top

  info = data.dataset_info(config)
  method = methods.get_method(config, info)
  state = jax.eval_shape(
    lambda k: method.init_state(k, info.image_shape), jax.random.key(0)
  )
  batch = next(data.train_batches(config))
  return sweep.trace_signature(
    method, state, batch, jax.random.key(config.seed + 1)
  )


def test_members_share_a_program_unless_their_step_differs():
  def config(method, normal_class=0, seed=0, **keys):
    c = _single_run_config(method, normal_class, seed)
    c.update_from_flattened_dict(keys)
    return c

  base = _signature(config("rotnet"))
  assert _signature(config("rotnet", normal_class=3, seed=2)) == base
  assert (
    _signature(config("rotnet", **{"optimizer.learning_rate": 1e-2})) != base
  )
  # Gradient preference selects patches with the seed: one program per seed.
  gp = _signature(config("gradient_preference"))
  assert _signature(config("gradient_preference", normal_class=3)) == gp
  assert _signature(config("gradient_preference", seed=1)) != gp


def test_a_grid_point_is_a_folder_and_a_table_section(tmp_path):
  config = _sweep_config("rotnet", steps=2)
  report = sweep.run_sweep(
    config,
    tmp_path,
    classes="0",
    seeds="0",
    grid=["optimizer.learning_rate=1e-3,1e-2"],
  )
  assert [m["grid"] for m in report["members"]] == [
    {"optimizer.learning_rate": 1e-3},
    {"optimizer.learning_rate": 1e-2},
  ]
  for folder in (
    "optimizer.learning_rate=0.001",
    "optimizer.learning_rate=0.01",
  ):
    assert (tmp_path / "class_0" / "seed_0" / folder / "results.json").is_file()
  assert sorted(report["summary"]) == [
    "optimizer.learning_rate=0.001",
    "optimizer.learning_rate=0.01",
  ]
  table = (tmp_path / sweep.TABLE_FILE).read_text()
  assert "## optimizer.learning_rate=0.01" in table


@_STRAIGHT
def test_sigterm_saves_every_member_and_the_rerun_finishes_alike(
  tmp_path, straight_sweep
):
  config_file = tmp_path / "tiny.py"
  config_file.write_text(
    "from tests.conftest import tiny_config\n"
    "def get_config(arg=None):\n"
    "  config = tiny_config('rotnet')\n"
    f"  config.update_from_flattened_dict({_LONG_KEYS!r})\n"
    "  return config\n"
  )
  command = [
    sys.executable,
    "-m",
    "jax_oneclass.sweep",
    f"--config={config_file}",
    f"--classes={_LONG_SWEEP['classes']}",
    f"--seeds={_LONG_SWEEP['seeds']}",
    f"--combine={_LONG_SWEEP['combine']}",
    f"--workdir={tmp_path / 'w'}",
  ]
  code, stderr = sigterm_once_saved(
    command, tmp_path / "w" / "class_3" / "seed_0" / "checkpoints" / "4"
  )
  assert code == 2, stderr[-3000:]
  last = [line for line in stderr.splitlines() if line.strip()][-1]
  assert "Stopped by SIGTERM at step" in last and "Traceback" not in stderr
  stopped = int(last.split("at step ")[1].split()[0])
  assert 4 <= stopped < 40
  for c in (0, 3):
    assert (
      tmp_path / "w" / f"class_{c}" / "seed_0" / "checkpoints" / str(stopped)
    ).is_dir()

  # The same sweep again (in this process) continues from the checkpoints
  # and ends as the uninterrupted one did.
  sweep.run_sweep(_long_config(), tmp_path / "w", **_LONG_SWEEP)
  straight_dir, _ = straight_sweep
  assert (tmp_path / "w" / sweep.TABLE_FILE).read_text() == (
    straight_dir / sweep.TABLE_FILE
  ).read_text()
