"""The benchmarks' reports, rendered from hand-made results."""

import json

from experiments import common, dgad_speed, paper_comparisons, speed
from experiments import two_stage_benchmark as bench


def _part(seed, auroc_by_class, baseline_by_class, command="cmd"):
  classes = [str(c) for c in range(len(auroc_by_class))]
  return {
    "command": command,
    "seed": seed,
    "runs": {
      "disaug": {
        c: {
          "auroc": {bench.HEADLINE_SCORER: a, "pool/kde": a - 0.1},
          "wall_seconds": 10.0,
        }
        for c, a in zip(classes, auroc_by_class)
      }
    },
    "baselines": {
      c: {"pixels/ocsvm": b, "pixels/gde_lw": b - 0.01}
      for c, b in zip(classes, baseline_by_class)
    },
  }


def test_seed_section_gives_each_seed_and_the_spread():
  parts = {
    "digits": _part(1, [0.9, 1.0], [0.95, 0.95], "first"),
    "digits_seed2": _part(2, [0.8, 0.9], [0.95, 0.95], "second"),
  }
  text = "\n".join(bench._seed_section(parts))
  assert "`first`; `second`" in text
  # Means 0.95 and 0.85: sample sd 0.0707.
  assert (
    f"| disaug / {bench.HEADLINE_SCORER} | 0.9500 | 0.8500 | 0.9000 ± 0.0707 |"
  ) in text
  assert (
    "| raw pixels / pixels/ocsvm | 0.9500 | 0.9500 | 0.9500 ± 0.0000 |" in text
  )
  parts["digits_seed3"] = _part(3, [0.9, 0.9], [0.95, 0.95], "third")
  parts["digits_seed3"]["runs"]["clr"] = parts["digits_seed3"]["runs"].pop(
    "disaug"
  )
  text = "\n".join(bench._seed_section(parts))
  assert (
    f"| disaug / {bench.HEADLINE_SCORER} | 0.9500 | 0.8500 | - | "
    "0.9000 ± 0.0707 |"
  ) in text
  assert f"| clr / {bench.HEADLINE_SCORER} | - | - | 0.9000 | 0.9000 |" in text


def test_auroc_section_ranks_scorers_and_flags_runs_without_gde_lw():
  part = _part(1, [0.99, 0.97], [0.95, 0.97])
  lines = bench._auroc_section("Title", part, "note")
  text = "\n".join(lines)
  assert "predates" not in text
  assert "Best raw-pixel baseline: pixels/ocsvm (0.9600)." in text
  assert (
    f"- disaug: 1 of 2 scorers beat it. {bench.HEADLINE_SCORER} "
    "(the fixed scorer, 0.9800) is above pixels/ocsvm, pixels/gde_lw; "
    "not above none."
  ) in text
  for baselines in part["baselines"].values():
    del baselines["pixels/gde_lw"]
  assert "predates the `gde_lw`" in "\n".join(
    bench._auroc_section("Title", part, "note")
  )


def test_rerun_section_compares_the_shared_classes_only():
  before = _part(1, [0.9, 1.0, 0.8], [0.95] * 3, "before")
  after = _part(1, [0.95, 0.9], [0.95] * 2, "after")
  after["runs"]["disaug"]["1"]["auroc"]["pool/nn"] = 0.7
  del after["runs"]["disaug"]["0"]  # Only class 1 finished.
  after["partial"] = True
  text = "\n".join(bench._rerun_section("digits.fix", before, after))
  assert "## Rerun of `digits` after `fix`" in text
  assert "Stopped early" in text
  # Class 1 only: before 1.0, after 0.9.
  assert (
    f"| disaug | 1 | {bench.HEADLINE_SCORER} | 1.0000 | 0.9000 | -0.1000 |"
  ) in text
  assert "| disaug | 1 | pool/nn | - | 0.7000 | new |" in text


def test_an_ablation_rerun_is_compared_with_the_file_it_names():
  results = {
    "cifar10": _part(1, [0.5], [0.9], "old code"),
    "cifar10.fix": _part(1, [0.7], [0.9], "new code"),
    "cifar10.ablation": _part(1, [0.6], [0.9], 'new code "--set=k=v"'),
  }
  results["cifar10.ablation"]["compare_with"] = "cifar10.fix"
  text = "\n".join(bench._rerun_sections(results))
  assert "## Rerun of `cifar10` after `fix`" in text
  assert (
    f"| disaug | 0 | {bench.HEADLINE_SCORER} | 0.5000 | 0.7000 | +0.2000 |"
  ) in text
  ablation = text.split("after `ablation`")[1]
  assert "Before: `new code`" in ablation
  assert "Same settings except the --set flags." in ablation
  assert (
    f"| disaug | 0 | {bench.HEADLINE_SCORER} | 0.7000 | 0.6000 | -0.1000 |"
  ) in ablation


def _speed_run(points):
  return {
    "scorer": "s",
    "batch_size": 64,
    "views": 1,
    "load_before": "0 0 0",
    "load_after": "1 1 1",
    "train_seconds": 1.0,
    "points": [
      {"step": st, "train_seconds": t, "auroc": a, "num_test": 30}
      for st, t, a in points
    ],
  }


def test_speed_results_saved_before_merge_read_as_one_command(
  tmp_path, monkeypatch
):
  monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
  old = {
    "command": "speed --data=cifar.tar.gz --steps=600",
    "cpu": "c",
    "methods": ["dgad", "rotnet", "disaug"],
    "steps": 600,
    "eval_every": 100,
    "width": 32,
    "test_per_class": 3,
    "targets": [0.6, 0.7],
    "partial": True,
    "runs": {
      "0": {
        "dgad": _speed_run([(100, 50.0, 0.65)]),
        "rotnet": _speed_run([(100, 90.0, 0.55), (200, 180.0, 0.72)]),
      }
    },
  }
  (tmp_path / "dgad_speed.json").write_text(json.dumps(old))
  result = dgad_speed._previous()
  assert result["commands"] == ["speed --data=cifar.tar.gz --steps=600"]
  assert result["data"] == "cifar.tar.gz"
  assert result["runs"]["0"]["rotnet"]["steps"] == 600
  text = dgad_speed.render(result)
  assert "Stopped early" in text
  assert "| 0 | 0.6 | 50 s (step 100) | 180 s (step 200) | not run |" in text
  assert "| 0 | 0.7 | - | 180 s (step 200) | not run |" in text


def test_speed_steps_take_per_step_medians_and_render_without_torch():
  runs = [
    {
      "step_s_each": [0.3, 0.1],
      "step_cpu_s_each": [0.5, 0.2],
      "peak_rss_mb": 9,
    },
    {"step_s_each": [0.2], "step_cpu_s_each": [0.9], "peak_rss_mb": 7},
  ]
  assert speed._side(runs) == {"cpu_s": 0.5, "wall_s": 0.2, "peak_rss_mb": 9}
  assert speed._side([])["cpu_s"] is None
  steps = {
    "command": "python experiments/speed.py steps --rows=disaug",
    "cpu_model": "c",
    "cores": 2,
    "jaxlib": "0.1",
    "uptime": "u",
    "rows": {
      "disaug": {
        "ours_cpu_s": 0.5,
        "torch_cpu_s": None,
        "ours_wall_s": 0.2,
        "torch_wall_s": None,
        "load_1min": 1.0,
      },
      "ganomaly": {
        "ours_cpu_s": 0.1,
        "torch_cpu_s": 0.4,
        "ours_wall_s": 0.05,
        "torch_wall_s": 0.1,
        "load_1min": 2.0,
        "ours_peak_rss_mb": 800.4,
        "torch_peak_rss_mb": 1200.0,
      },
    },
  }
  text = "\n".join(speed._steps_table(steps))
  assert "| disaug | 500 | - | 200 | - | - | - | - | 1.0 |" in text
  assert (
    "| ganomaly | 100 | 400 | 50 | 100 | 2.00x | 800 | 1200 | 2.0 |" in text
  )


def test_speed_names_where_a_merged_script_lives_now():
  assert speed._was_run_as(
    "python experiments/inference_benchmark.py --models=x", "note"
  ) == (
    "`python experiments/inference_benchmark.py --models=x` (since merged "
    "into `python experiments/speed.py` as `inference`; note)"
  )
  assert speed._was_run_as("python experiments/speed.py device") == (
    "`python experiments/speed.py device`"
  )


def test_steps_counts_the_paths_auto_chose():
  paths = {
    "forward lhs=(8, 8, 8, 4) rhs=(3, 3, 4, 4) float32": "xla",
    "forward lhs=(8, 4, 4, 8) rhs=(3, 3, 8, 8) float32": "im2col",
    "weight_grad lhs=(8, 8, 8, 4) rhs=(3, 3, 4, 4) float32": "xla",
  }
  assert speed.conv_path_counts(paths) == {
    "forward": {"im2col": 1, "xla": 1},
    "weight_grad": {"xla": 1},
  }


def _fake_run(calls):
  """speed._run's stand-in: fixed per-step figures by side, no process."""

  def run(command, env=None):
    ours = "_ours_step" in command
    calls.append(("ours" if ours else "torch", env))
    step = 0.1 if ours else 0.3
    return {
      "step_s_each": [step, step + 0.1, step + 0.2],
      "step_cpu_s_each": [2 * step] * 3,
      "peak_rss_mb": 500.0 + len(calls) if ours else 900.0,
      "load_before": float(len(calls)),
    }

  return run


def test_speed_steps_alternate_fresh_processes_and_write_the_json(
  tmp_path, monkeypatch
):
  calls = []
  monkeypatch.setattr(speed, "_run", _fake_run(calls))
  monkeypatch.setattr(
    speed.measure,
    "machine",
    lambda: {
      "cpu": "Fake CPU",
      "cores": 2,
      "uptime": "up",
      "load_average": [1],
    },
  )
  torch_python = tmp_path / "python"
  torch_python.touch()
  out = tmp_path / "steps.json"
  args = speed._parser().parse_args(
    [
      "steps",
      "--rows=rotnet,ganomaly",
      "--rounds=2",
      f"--torch_python={torch_python}",
      f"--json={out}",
    ]
  )
  assert not speed._save(args, "unused", speed.part_steps(args))
  sides = [side for side, _ in calls]
  assert sides == ["ours", "torch"] * 4
  assert all(
    env == {"OMP_WAIT_POLICY": "PASSIVE"} for s, env in calls if s == "torch"
  )
  result = json.loads(out.read_text())
  assert result["cpu_model"] == "Fake CPU"
  assert result["jaxlib"]
  assert set(result["rows"]) == {"rotnet", "ganomaly"}
  row = result["rows"]["rotnet"]
  assert {k: v for k, v in row.items() if k != "runs"} == {
    "ours_cpu_s": 0.2,
    "torch_cpu_s": 0.6,
    "ours_wall_s": 0.2,
    "torch_wall_s": 0.4,
    "ours_peak_rss_mb": 503.0,
    "torch_peak_rss_mb": 900.0,
    "load_1min": 3.0,
  }
  assert [len(r["step_s_each"]) for r in row["runs"]["torch"]] == [3, 3]


def test_speed_torch_twin_has_our_heads():
  for method, dims in speed.HEAD_DIMS.items():
    config = common.config_with(method, "cifar10")
    assert tuple(config.model.head_dims) == dims
  command = speed._torch_command(
    "rotnet", speed._parser().parse_args(["steps"]), "python"
  )
  assert "--head_dims=" + ",".join(["512"] * 8) in command


def _sweep_run(aurocs, scorer="latent/gde", grid=None):
  """A saved sweep: {class: {seed: AUROC}} as its members."""
  return {
    "results": {
      "headline_scorer": scorer,
      "members": [
        {
          "class": c,
          "seed": s,
          "grid": grid or {},
          "scorer": scorer,
          "auroc": {scorer: a},
        }
        for c, per_seed in aurocs.items()
        for s, a in per_seed.items()
      ],
    }
  }


def test_paper_tables_average_seeds_per_class_and_spread_over_seeds():
  run = _sweep_run({0: {0: 0.6, 1: 0.8}, 1: {0: 0.4, 1: 0.4}})
  per_class = paper_comparisons._aurocs(run)  # pylint: disable=protected-access
  mean, std = paper_comparisons.overall(per_class)
  # Class means 0.7 and 0.4; seed means 0.5 and 0.6.
  assert (round(mean, 6), round(std, 6)) == (0.55, round(0.1 / 2**0.5, 6))
  lines = paper_comparisons.class_table({"A": per_class}, ("x", "y"))
  assert lines[2:] == [
    "| 0 (x) | 70.0 |",
    "| 1 (y) | 40.0 |",
    "| **mean** | **55.0 ± 7.1** |",
  ]
  grid = _sweep_run({0: {0: 0.9}}, grid={"model.padding": "zeros"})
  saved = {"runs": {"dgad": run}, "padding": {"run": grid}}
  table = "\n".join(paper_comparisons.variant_table(saved))
  assert "| DGAD, model.padding=zeros | 90.0 | **90.0** |" in table
  assert "| DGAD (default: circular, adversarial_weight 1) | 60.0 |" in table


def test_sweep_benchmark_table_names_config_choice_and_ratio():
  from experiments import sweep_benchmark  # pylint: disable=g-import-not-at-top

  line = sweep_benchmark._combine_line(
    "Training...\n--combine=auto: one step of 3 members took vmap 9.0 ms, "
    "unrolled 7.0 ms; using unrolled (faster).\nDone.\n"
  )
  assert line.endswith("using unrolled (faster).")
  result = {
    "name": "cifar10_disaug",
    "config": "configs/disaug.py:folder,folder=/c",
    "settings": ["model.width=32"],
    "classes": [0, 1],
    "seed": 1,
    "steps": 100,
    "combine": "auto",
    "combine_choice": line,
    "cpu": "x",
    "jaxlib": "0",
    "load_before": "0",
    "load_after": "0",
    "sweep": {"wall_seconds": 50.0, "cpu_seconds": 90.0},
    "sequential": {"wall_seconds": 100.0, "cpu_seconds": 99.0},
    "scorer": "pool/gde",
    "auroc": {"sweep": {"0": 0.9, "1": 0.8}, "single": {"0": 0.9, "1": 0.75}},
  }
  text = sweep_benchmark.markdown(result)
  assert "(cifar10_disaug)" in text and "`--config.model.width=32`" in text
  assert "| ratio (runs / sweep) | 2.00 | 1.10 |" in text
  assert "using unrolled (faster)" in text
  assert "| 1 | 0.8000 | 0.7500 | +0.0500 |" in text


def _few_shot_row(image, pixel):
  return {"image_auroc": image, "pixel_auroc": pixel, "aupro": 0.1}


def test_few_shot_parts_are_named_per_category_and_summed_up():
  assert paper_comparisons.few_shot_part("automobile", 0) == "few_shot"
  assert paper_comparisons.few_shot_part("automobile", 2) == "few_shot_seed2"
  assert paper_comparisons.few_shot_part("horse", 0) == "few_shot_horse"
  assert paper_comparisons.few_shot_part("horse", 2) == "few_shot_horse_seed2"
  variants = paper_comparisons.FEW_SHOT_VARIANTS
  first = {"runs": {v: {"1": _few_shot_row(0.4, 0.6)} for v in variants}}
  second = {"runs": {v: {"1": _few_shot_row(0.6, 0.8)} for v in variants}}
  second["runs"][variants[0]]["2"] = _few_shot_row(0.9, 0.9)
  lines = paper_comparisons.few_shot_summary([first, second, {}])
  assert "over the 2 (category, seed) runs" in lines[0]
  # K=2 exists in one run of two only: no mean for it.
  assert f"| {variants[0]} | 0.500 / 0.700 | - |" in lines
  assert paper_comparisons.few_shot_summary([first]) == []


def test_matched_localisation_table_averages_seeds_and_categories():
  from experiments import localization_quality as lq  # pylint: disable=g-import-not-at-top

  def rd_run(pixel):
    return {
      "auroc": {"map_max": 0.5},
      "localization": {"anomaly_map": {"pixel_auroc": pixel, "aupro": 0.2}},
      "step": 7,
      "cpu_seconds": 100.0,
    }

  result = {
    "command": "c",
    "budget_cpu_s": 60.0,
    "calibration": {"reverse_distillation": {"cpu_s_per_step": 0.3}},
    "runs": {
      "reverse_distillation": {
        "a": {"1": rd_run(0.6), "2": rd_run(0.8)},
        "b": {"1": rd_run(0.4)},
      }
    },
  }
  text = lq.render_matched(result)
  assert (
    "| reverse_distillation | 0.300 | 7 | a | 1,2 | 0.500 ± 0.000 | "
    "0.700 ± 0.100 | 0.200 ± 0.000 | 100 |"
  ) in text
  # The mean weighs each run once: (0.6 + 0.8 + 0.4) / 3.
  assert (
    "| **reverse_distillation** | | | mean | | **0.500** | **0.600** |" in text
  )


def test_dgad_curve_rows_give_every_checkpoint_from_the_untrained_network():
  def run(*aurocs):
    return {
      "points": [
        {"step": 100 * i, "auroc": a, "train_seconds": 1.0}
        for i, a in enumerate(aurocs)
      ],
      "cpu_seconds": 12.0,
    }

  saved = {
    "command": "c",
    "class": 0,
    "overrides": {"num_train_steps": 100},
    "runs": {"default": run(0.7, 0.6), "padding=zeros": run(0.65)},
  }
  lines = paper_comparisons.render_dgad_curve(saved)
  assert "| variant | step 0 | step 100 | CPU-s |" in lines
  assert "| default | 0.700 | 0.600 | 12 |" in lines
  assert "| padding=zeros | 0.650 | - | 12 |" in lines


def test_training_gain_is_the_trained_mean_minus_the_untrained_mean():
  columns = {
    "DGAD (circular, default)": {0: {0: 0.6, 1: 0.6}},
    "GANomaly": {0: {0: 0.5}},
    "DGAD untrained": {0: {0: 0.7, 1: 0.7}},
  }
  lines = paper_comparisons._training_gain_lines(columns, ("DGAD", "GANomaly"))  # pylint: disable=protected-access
  # GANomaly has no untrained column: no figure for it.
  assert lines[0].endswith("DGAD -10.0 AUROC points.")


def test_a_tagged_two_stage_run_compares_only_its_own_classes_and_seeds(
  monkeypatch,
):
  monkeypatch.setattr(
    paper_comparisons,
    "_untrained_column",
    lambda method, subset: {0: {0: 0.5, 1: 0.9}, 1: {0: 0.9}},
  )
  run = {**_sweep_run({0: {0: 0.6}}), "steps": 5, "cpu_s": 1.0, "wall_s": 1.0}
  saved = {
    "runs": {"disaug": run},
    "tag": "budget200",
    "budget_cpu_s": 200,
    "seeds": "0",
    "classes": "0",
    "test_per_class": 100,
  }
  lines = paper_comparisons.render_two_stage(saved)
  assert lines[0].startswith("#### (b) at 200 CPU-s per member, classes 0")
  assert "--tag=budget200`." in lines[2]
  # Only class 0, seed 0 of the untrained network: 0.5, not 0.9.
  assert "| **mean** | **60.0 ± 0.0** | **50.0 ± 0.0** |" in lines
  assert any(line.endswith("DisAug CLR +10.0 AUROC points.") for line in lines)


def _category_run(aurocs, pixel=None):
  """A saved MVTec sweep: {category: {seed: AUROC}}, every member class 0."""
  run = _sweep_run({0: {}})
  run["results"]["members"] = [
    {
      "class": 0,
      "seed": s,
      "grid": {"data.category": category},
      "scorer": "latent/gde",
      "auroc": {"latent/gde": a},
      **(
        {"localization": {"map": {"pixel_auroc": pixel, "aupro": 0.1}}}
        if pixel
        else {}
      ),
    }
    for category, per_seed in aurocs.items()
    for s, a in per_seed.items()
  ]
  return {**run, "steps": 4, "cpu_s": 8.0, "wall_s": 5.0, "method": "dgad"}


def test_mvtec_gan_table_has_a_row_per_category_and_the_untrained_column(
  monkeypatch,
):
  calibration = {
    "rows": {
      "dgad@64px": {"cpu_s_per_step": 1.5},
      "ganomaly@64px": {"cpu_s_per_step": 0.5},
    }
  }
  monkeypatch.setattr(
    paper_comparisons,
    "_load",
    lambda part: calibration if part == "calibrate" else {},
  )
  saved = {
    "runs": {
      "dgad": _category_run(
        {"automobile": {0: 0.6, 1: 0.8}, "horse": {0: 0.5, 1: 0.5}},
        pixel=0.7,
      ),
      "ganomaly": {
        **_category_run({"automobile": {0: 0.5, 1: 0.5}, "horse": {0: 0.4}}),
        "method": "ganomaly",
      },
    },
    "untrained": {
      "dgad": {
        "automobile": {"0": {"scorer": "s", "auroc": {"s": 0.9}}},
        "horse": {"0": {"scorer": "s", "auroc": {"s": 0.7}}},
      }
    },
    "budget_cpu_s": 6,
    "seeds": "0,1",
    "categories": "automobile,horse",
  }
  lines = paper_comparisons.render_gan_mvtec(saved)
  header = "| category | DGAD (circular, default) | GANomaly | DGAD untrained |"
  assert header in lines
  assert "| automobile | 70.0 | 50.0 | 90.0 |" in lines
  assert "| horse | 50.0 | 40.0 | 70.0 |" in lines
  # DGAD 60.0 - GANomaly 45.0; the untrained DGAD 80.0.
  assert "DGAD - GANomaly: +15.0 AUROC points (paper, MVTec AD: +2)." in lines
  assert any(line.endswith("DGAD -20.0 AUROC points.") for line in lines)
  assert "| automobile | 70.0 |" in lines  # The pixel AUROC table.
  assert "| DGAD (circular, default) | 1.500 | 4 | 2 | 5 |" in lines
  assert "| GANomaly | 0.500 | 4 | 3 | 5 |" in lines


def test_added_members_join_the_saved_run_and_a_budget_change_is_refused():
  def run(aurocs, steps=5):
    return {**_sweep_run(aurocs), "steps": steps, "cpu_s": 2.0, "wall_s": 1.0}

  old = {**run({0: {0: 0.6}, 1: {0: 0.4}}), "command": "a"}
  new = {**run({0: {1: 0.8}, 1: {0: 0.5}}), "command": "b"}
  merged = paper_comparisons.merge_runs(old, new)
  # Class 1 seed 0 ran again: the new figure replaces the old one.
  assert paper_comparisons._aurocs(merged) == {0: {0: 0.6, 1: 0.8}, 1: {0: 0.5}}  # pylint: disable=protected-access
  assert (merged["cpu_s"], merged["wall_s"], merged["command"]) == (
    4.0,
    2.0,
    "a; b",
  )
  assert paper_comparisons.union("0", "2,1") == "0,1,2"
  assert paper_comparisons.union("0,1", "all") == "all"
  try:
    paper_comparisons.merge_runs(old, {**new, "steps": 6})
  except SystemExit as error:
    assert "--budget_cpu_s" in str(error)
  else:
    raise AssertionError("a run of other steps was merged")


def test_an_unknown_mvtec_gan_row_is_refused_before_any_run(capsys):
  args = paper_comparisons.argparse.Namespace(only="dgad,wgan")
  try:
    paper_comparisons.part_gan_mvtec(args)
  except SystemExit as error:
    assert error.code == 2
  else:
    raise AssertionError("an unknown row ran")
  assert "unknown --only ['wgan']" in capsys.readouterr().err
