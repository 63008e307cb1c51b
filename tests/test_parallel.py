"""Data parallelism: 1 vs 4 devices, and two processes via jax.distributed."""

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jax_oneclass import methods, workdir_lock
from tests import parallel_worker
from tests.conftest import METHODS, REPO


def _env(num_devices: int) -> dict:
  env = dict(
    os.environ,
    PYTHONPATH=str(REPO),
    TF_CPP_MIN_LOG_LEVEL="3",
    JAX_PLATFORMS="cpu",
  )
  env["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={num_devices}"
  ).strip()
  return env


def _run_worker(names: list[str], num_devices: int, root) -> dict:
  """`parallel_worker.run_steps` of each method, in one subprocess with
  `num_devices` devices: {method: its result}."""
  out = subprocess.run(
    [
      sys.executable,
      str(REPO / "tests" / "parallel_worker.py"),
      ",".join(names),
      "3",
      str(root),
    ],
    env=_env(num_devices),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


# The first method of each family whose networks normalise over the global
# batch (the two-stage ResNet with cross-device negatives, the DCGANs).
_ONE_PER_FAMILY = sorted(
  {
    methods.family(m): m
    for m in reversed(METHODS)
    if methods.family(m) in ("two_stage", "gan")
  }.values()
)


@pytest.fixture(name="four_devices", scope="module")
def _four_devices(tmp_path_factory) -> dict:
  """Every method of _ONE_PER_FAMILY stepped on 4 devices, in one
  subprocess (each start costs seconds of imports)."""
  return _run_worker(_ONE_PER_FAMILY, 4, tmp_path_factory.mktemp("four"))


@pytest.mark.parametrize(
  "method",
  [
    pytest.param(m, marks=pytest.mark.xdist_group("parallel_four_devices"))
    for m in _ONE_PER_FAMILY
  ],
)
def test_same_steps_on_one_and_four_devices(method, tmp_path, four_devices):
  one = parallel_worker.run_steps(method, 3, tmp_path / "one")  # In process.
  four = four_devices[method]
  assert (one["devices"], four["devices"]) == (1, 4)
  # Global-batch BatchNorm and contrastive negatives: same numbers up to
  # float reduction order.
  assert four["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-5)
  assert four["state_abs_sum"] == pytest.approx(one["state_abs_sum"], rel=1e-4)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class _Job:
  outputs: list[str]  # Per process, stdout + stderr.
  pids: list[int]
  lock_holders: list[tuple]  # Each (pid, purpose) the lock file named.
  holders_by_lock: dict  # Lock file -> its holders, for every lock watched.


def _run_two_processes(
  flags: list[str],
  returncode: int = 0,
  lock=None,
  module="jax_oneclass.main",
  more_locks=(),
):
  """`module` with `flags` as processes 0 and 1 of one job (2 devices
  each), once both exited with `returncode`; the lock files `lock` and
  `more_locks` are watched while they run."""
  flags = [
    *flags,
    "--config.progress_bar=False",
    f"--coordinator_address=127.0.0.1:{_free_port()}",
    "--num_processes=2",
  ]
  with tempfile.TemporaryDirectory() as logs, contextlib.ExitStack() as files:
    # Files, not pipes: this process watches the lock instead of reading.
    streams = [
      [files.enter_context(open(Path(logs) / f"{i}.{k}", "w+")) for k in "oe"]
      for i in range(2)
    ]
    procs = [
      subprocess.Popen(
        [
          sys.executable,
          "-m",
          module,
          *flags,
          f"--process_id={i}",
        ],
        cwd=REPO,
        env=_env(2),
        stdout=out,
        stderr=err,
      )
      for i, (out, err) in enumerate(streams)
    ]
    watched = [path for path in (lock, *more_locks) if path]
    holders = {path: [] for path in watched}
    deadline = time.monotonic() + 400
    while any(p.poll() is None for p in procs):
      assert time.monotonic() < deadline
      for path in watched:
        holder = workdir_lock.read_holder(path)
        if holder and (holder["pid"], holder["purpose"]) not in holders[path]:
          holders[path].append((holder["pid"], holder["purpose"]))
      time.sleep(0.05)
    outputs = []
    for out, err in streams:
      out.seek(0)
      err.seek(0)
      outputs.append((out.read(), err.read()))
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == returncode, err[-3000:]
  return _Job(
    [out + err for out, err in outputs],
    [p.pid for p in procs],
    holders.get(lock, []),
    holders,
  )


# A tiny CLR run on digits, as command-line flags.
_TINY_CLR = (
  "--config.num_train_steps=3",
  "--config.batch_size=16",
  "--config.data.image_size=8",
  "--config.model.stage_sizes=(1,1)",
  "--config.model.width=4",
  "--config.model.head_dims=(16,8)",
)


def test_two_processes_train_and_evaluate(tmp_path):
  job = _run_two_processes(
    [
      "--config=configs/clr.py:digits",
      f"--workdir={tmp_path}",
      *_TINY_CLR,
      "--config.eval.batch_size=64",
      "--config.checkpoint_every_steps=2",
      # Pictures are process 0's alone; the panels test draws them. Scoring
      # 4 rotations of each image is no more parallel than scoring one.
      "--config.eval.plots=False",
      "--config.eval.num_overlays=0",
      "--config.eval.rotation_averaging=False",
      "--config.eval.scorer=pool/gde",
    ],
    lock=workdir_lock.lock_path(tmp_path),
  )
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["step"] == 3 and results["num_test"] == 599
  assert "4 devices in 2 processes" in job.outputs[0]
  # Only process 0 takes the workdir's lock (process 1 would be refused
  # it), for the whole run, and releases it.
  assert job.lock_holders == [(job.pids[0], "training")]
  assert not workdir_lock.lock_path(tmp_path).exists()


def _run_two_process_sweep(workdir, classes: str, members):
  """The tiny CLR digits sweep of `classes` x seed 0 in two processes,
  watching each member folder's lock."""
  return _run_two_processes(
    [
      "--config=configs/clr.py:digits",
      f"--workdir={workdir}",
      f"--classes={classes}",
      "--seeds=0",
      *_TINY_CLR,
      "--config.eval.batch_size=64",
      "--config.eval.plots=False",
      "--config.eval.num_overlays=0",
      "--config.eval.rotation_averaging=False",
      "--config.eval.scorer=pool/gde",
    ],
    module="jax_oneclass.sweep",
    more_locks=[workdir_lock.lock_path(m) for m in members],
  )


def test_two_processes_sweep_each_its_own_member(tmp_path):
  members = [tmp_path / "class_0" / "seed_0", tmp_path / "class_3" / "seed_0"]
  job = _run_two_process_sweep(tmp_path, "0,3", members)
  # Process i trained, evaluated and wrote member i alone, on its own 2
  # devices (as a one-host job: it read all of its member's images).
  for i, member in enumerate(members):
    assert job.holders_by_lock[workdir_lock.lock_path(member)] == [
      (job.pids[i], "training")
    ]
    assert "Scoring the 599 test images" in job.outputs[i]
    results = json.loads((member / "results.json").read_text())
    assert results["step"] == 3 and results["num_test"] == 599
  report = json.loads((tmp_path / "sweep_results.json").read_text())
  assert [(m["class"], m["status"], m["step"]) for m in report["members"]] == [
    (0, "finished", 3),
    (3, "finished", 3),
  ]
  assert "**overall**" in job.outputs[0]  # The table, from process 0 only.
  assert "**overall**" not in job.outputs[1]


def test_two_processes_sweep_one_member_data_parallel(tmp_path):
  # Fewer members than processes: both hosts train the member together,
  # as a single run over their 4 devices would.
  member = tmp_path / "class_0" / "seed_0"
  job = _run_two_process_sweep(tmp_path, "0", [member])
  assert "(mesh {'member': 1, 'data': 4})" in job.outputs[0]
  assert job.holders_by_lock[workdir_lock.lock_path(member)] == [
    (job.pids[0], "training")
  ]
  results = json.loads((member / "results.json").read_text())
  assert results["step"] == 3 and results["num_test"] == 599
  report = json.loads((tmp_path / "sweep_results.json").read_text())
  assert [(m["class"], m["status"]) for m in report["members"]] == [
    (0, "finished")
  ]
  assert "**overall**" in job.outputs[0]
  assert "**overall**" not in job.outputs[1]


def test_two_processes_both_stop_on_a_held_workdir_lock(tmp_path):
  sleeper = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(300)"]
  )
  try:
    (tmp_path / ".lock").write_text(
      json.dumps(
        {
          "host": socket.gethostname(),
          "pid": sleeper.pid,
          "since": 0,
          "purpose": "training",
        }
      )
    )
    outputs = _run_two_processes(
      [
        "--config=configs/clr.py:digits",
        f"--workdir={tmp_path}",
        *_TINY_CLR,
      ],
      returncode=2,
    ).outputs
  finally:
    sleeper.kill()
    sleeper.wait()
  assert f"is in use by pid {sleeper.pid} on host" in outputs[0]
  assert "(process 0 says which)" in outputs[1]
  assert not (tmp_path / "checkpoints" / "2").exists()


def test_two_processes_localise_and_draw_panels(tmp_path):
  # pylint: disable=g-import-not-at-top
  from jax_oneclass.data import mvtec
  from tests.test_mvtec import write_widget

  # pylint: enable=g-import-not-at-top
  write_widget(tmp_path)  # 4 good train images; 2 good + 2 defective test.
  data_dir = tmp_path / "tfds"
  mvtec.build_mvtec_like(tmp_path, "widget", data_dir=str(data_dir))
  run = tmp_path / "run"
  _run_two_processes(
    [
      f"--config=configs/gradient_preference.py:mvtec,folder={tmp_path},"
      f"category=widget,data_dir={data_dir}",
      f"--workdir={run}",
      "--config.data.image_size=32",
      "--config.model.backbone=resnet_tiny",
      "--config.num_train_steps=2",
      "--config.center_steps=1",
      "--config.batch_size=4",
      "--config.eval.batch_size=4",
      "--config.eval.num_overlays=3",
      "--config.eval.plots=False",  # ROC curves: not what is tested here.
      "--config.checkpoint_every_steps=2",
    ]
  )
  results = json.loads((run / "results.json").read_text())
  assert (results["num_test"], results["num_anomalous"]) == (4, 2)
  assert 0.0 <= results["localization"]["anomaly_map"]["aupro"] <= 1.0
  # Each process read 2 of the 4 test images; the first 3 of the gathered
  # set (so some from each process) are drawn, once, by process 0.
  panels = sorted((run / "visualizations").glob("*.png"))
  assert len(panels) == 3
