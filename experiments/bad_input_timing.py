"""How fast the commands fail on bad input, each in a fresh process.

Every case runs `python -m jax_oneclass.<entry> ...` from the repository
root --repeats times as a new subprocess; the wall seconds (process start
to exit, Python start-up included) are timed around it. Writes
experiments/results/bad_input.md (case, command, exit code, median and
slowest seconds, stderr lines, the error line) and bad_input.json, with the
CPU model, the core count, jaxlib's version and the load averages.

  nice -n 10 python experiments/bad_input_timing.py --repeats=3 \
      [--baseline=<a checkout of the code to compare with>]

Standard library only (and measure.py): the script imports neither JAX nor
TensorFlow, so it does not load the machine it measures.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments import measure  # pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS_DIR = ROOT / "experiments" / "results"
PART = "bad_input"
_HELP = "--helpshort (reference)"

# (case, entry point, arguments); {name} is a path made by `_fixtures`.
CASES = (
  # Reference: Python start-up and flag parsing (absl's help exits 1).
  (_HELP, "main", ["--helpshort"]),
  ("unknown flag", "main", ["--bogus", "--workdir={new}"]),
  ("no config file", "main", ["--config=configs/nope.py", "--workdir={new}"]),
  ("config syntax error", "main", ["--config={syntax}", "--workdir={new}"]),
  ("exception in get_config", "main", ["--config={raises}", "--workdir={new}"]),
  (
    "unknown config key",
    "main",
    ["--config=configs/disaug.py:digits", "--config.lr=1", "--workdir={new}"],
  ),
  (
    "unknown method",
    "main",
    [
      "--config=configs/disaug.py:digits",
      "--config.method=gan",
      "--workdir={new}",
    ],
  ),
  (
    "unknown class index",
    "main",
    [
      "--config=configs/disaug.py:digits",
      "--config.data.normal_class=42",
      "--workdir={new}",
    ],
  ),
  (
    "missing data folder",
    "main",
    ["--config=configs/clr.py:folder,folder={missing}", "--workdir={new}"],
  ),
  (
    "unwritable workdir",
    "main",
    ["--config=configs/clr.py:digits", "--workdir={file}/run"],
  ),
  ("eval, workdir not a run", "main", ["--mode=eval", "--workdir={empty}"]),
  (
    "predict, unreadable input",
    "predict",
    ["--workdir={run}", "--input={missing}", "--output={new}"],
  ),
  (
    "predict, output a file",
    "predict",
    ["--workdir={run}", "--input={image}", "--output={file}"],
  ),
  (
    "export, workdir not a run",
    "export",
    ["--workdir={empty}", "--output={new}"],
  ),
  ("export, no output", "export", ["--workdir={run}"]),
)


def _fixtures(root: Path) -> dict:
  """The files and folders the cases name, under `root`."""
  (root / "empty").mkdir()
  (root / "a_file").write_text("")
  (root / "image.png").write_bytes(b"")  # Only its name is checked.
  (root / "syntax_error.py").write_text("def get_config(arg=None:\n  pass\n")
  (root / "raises.py").write_text(
    "def get_config(arg=None):\n  del arg\n  return 1 / 0\n"
  )
  run = root / "run"
  (run / "checkpoints" / "2").mkdir(parents=True)
  (run / "config.json").write_text(
    json.dumps({"method": "clr", "data": {"name": "digits", "normal_class": 1}})
  )
  return {
    "new": root / "new",
    "empty": root / "empty",
    "file": root / "a_file",
    "image": root / "image.png",
    "syntax": root / "syntax_error.py",
    "raises": root / "raises.py",
    "missing": root / "missing",
    "run": run,
  }


def _time_case(command: list[str], repo: Path):
  """(wall seconds, the finished process) of `command` run in `repo`."""
  start = time.perf_counter()
  done = subprocess.run(
    command, cwd=repo, capture_output=True, text=True, timeout=600, check=False
  )
  return time.perf_counter() - start, done


def _machine() -> dict:
  """measure.machine() (CPU model, cores, load) with the versions."""
  return {
    **measure.machine(),
    "jaxlib_version": importlib.metadata.version("jaxlib"),
    "python": platform.python_version(),
  }


def run_cases(repeats: int, repo: Path = ROOT) -> list[dict]:
  """Runs every case `repeats` times with the code of `repo`; a row of
  figures per case."""
  rows = []
  with tempfile.TemporaryDirectory(prefix="bad_input_") as tmp:
    paths = _fixtures(Path(tmp))
    for case, entry, args in CASES:
      args = [a.format(**paths) for a in args]
      command = [sys.executable, "-m", f"jax_oneclass.{entry}", *args]
      timed = [_time_case(command, repo) for _ in range(repeats)]
      seconds = [t for t, _ in timed]
      done = timed[-1][1]
      lines = [line for line in done.stderr.splitlines() if line.strip()]
      shown = " ".join(["python -m", f"jax_oneclass.{entry}", *args])
      rows.append(
        {
          "case": case,
          "command": shown.replace(tmp, "$TMP"),
          "exit_code": done.returncode,
          "median_s": statistics.median(seconds),
          "max_s": max(seconds),
          "seconds": seconds,
          "stderr_lines": len(lines),
          "line": (lines[-1] if lines else "").replace(tmp, "$TMP"),
        }
      )
      print(
        f"{repo.name}: {case}: exit {done.returncode}, "
        f"{statistics.median(seconds):.2f} s, {len(lines)} stderr "
        "lines",
        flush=True,
      )
  return rows


def _cell(text: str) -> str:
  return text.replace("|", "\\|")


def markdown(result: dict) -> str:
  """The results as a markdown section."""
  machine = result["machine"]
  before = {r["case"]: r for r in result.get("baseline_rows", [])}
  lines = [
    "# Bad input: how fast the commands fail",
    "",
    f"`{result['command']}` on {result['date']}: each case "
    f"{result['repeats']} times as a fresh process from the repository "
    "root; wall seconds from process start to exit (Python start-up "
    "included). Machine: "
    f"{machine['cpu']}, {machine['cores']} cores, load average "
    f"{' '.join(f'{x:.2f}' for x in machine['load_average'])} before and "
    f"{' '.join(f'{x:.2f}' for x in result['load_after'])} after; "
    f"jaxlib {machine['jaxlib_version']}, Python {machine['python']}.",
  ]
  if before:
    lines += [
      "",
      f"'before' columns: the same cases with the code at "
      f"{result['baseline']} (commit {result['baseline_commit']}), "
      "run in the same invocation, after this code's rows.",
    ]
  header = [
    "case",
    "command",
    "exit code",
    "median s",
    "max s",
    "stderr lines",
    "the line",
  ]
  if before:
    header[6:6] = [
      "before: exit code",
      "before: median s",
      "before: stderr lines",
    ]
  lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in result["rows"]:
    help_row = row["case"] == _HELP
    cells = [
      row["case"],
      f"`{row['command']}`",
      str(row["exit_code"]),
      f"{row['median_s']:.2f}",
      f"{row['max_s']:.2f}",
      str(row["stderr_lines"]),
      "(help text on stdout)" if help_row else _cell(row["line"]),
    ]
    old = before.get(row["case"])
    if old is not None:
      cells[6:6] = [
        str(old["exit_code"]),
        f"{old['median_s']:.2f}",
        str(old["stderr_lines"]),
      ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--out",
    default=str(RESULTS_DIR / PART),
    help="Path stem of the .md and .json written.",
  )
  parser.add_argument(
    "--baseline",
    default="",
    help="Another checkout (e.g. of the code before these "
    "checks) to run the same cases with, for comparison.",
  )
  args = parser.parse_args()
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  machine = _machine()
  print(
    f"CPU: {machine['cpu']} ({machine['cores']} cores); jaxlib "
    f"{machine['jaxlib_version']}; load average "
    f"{machine['load_average']}",
    flush=True,
  )
  result = {
    "machine": machine,
    "date": datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M UTC"
    ),
    "command": "python experiments/bad_input_timing.py "
    f"--repeats={args.repeats}",
    "repeats": args.repeats,
    "rows": run_cases(args.repeats),
  }
  if args.baseline:
    baseline = Path(args.baseline).resolve()
    result.update(
      baseline=str(baseline),
      baseline_commit=subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=baseline,
        capture_output=True,
        text=True,
        check=False,
      ).stdout.strip(),
      baseline_rows=run_cases(args.repeats, baseline),
    )
  result["load_after"] = list(os.getloadavg())
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(
    json.dumps(result, indent=2, sort_keys=True) + "\n"
  )
  out.with_suffix(".md").write_text(markdown(result))
  print(f"Wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}.")


if __name__ == "__main__":
  main()
