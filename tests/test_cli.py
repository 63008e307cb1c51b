"""The command line as a user runs it."""

import json
import subprocess
import sys

import pytest

from tests.conftest import GAN_METHODS, REPO

TINY = ["--config.num_train_steps=4", "--config.batch_size=16",
        "--config.data.image_size=8", "--config.model.stage_sizes=(1,1)",
        "--config.model.width=4", "--config.model.head_dims=(16,8)",
        "--config.eval.batch_size=128", "--config.log_every_steps=2",
        "--config.checkpoint_every_steps=2"]
TINY_GAN = TINY[:2] + ["--config.model.width=4",
                       "--config.model.latent_size=8"] + TINY[-3:]
EXPECTED_SCORERS = {
    "rotnet": {"pool/kde", "pool/gde", "pool/ocsvm", "embed/kde/rot_avg",
               "rotation_head", "rotation_head/rot_avg"},
    "clr": {"pool/kde", "pool/gde", "pool/ocsvm", "embed/kde/rot_avg"},
    "disaug": {"pool/kde", "pool/gde", "pool/ocsvm", "embed/kde/rot_avg",
               "pool/gde_lw/rot_avg"},
    "ganomaly": {"latent_mse", "latent_l1", "reconstruction_l1"},
    "dgad": {"pretext/generated", "pretext/real", "latent/gde", "latent/kde"},
}


def _main(*args):
  return subprocess.run([sys.executable, "-m", "jax_oneclass.main", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=400,
                        check=False)


@pytest.mark.parametrize("method", sorted(EXPECTED_SCORERS))
def test_each_method_trains_and_evaluates_from_the_command_line(
    method, tmp_path):
  config_arg = f"--config=configs/{method}.py:digits,normal_class=2"
  tiny = TINY_GAN if method in GAN_METHODS else TINY
  out = _main(config_arg, f"--workdir={tmp_path}", *tiny)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "step 4: 599 test images, 540 anomalous" in out.stdout
  assert "loss=" in out.stderr  # The progress bar.
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["normal_class"] == 2 and results["method"] == method
  assert EXPECTED_SCORERS[method] <= set(results["auroc"])
  assert all(0.0 <= v <= 1.0 for v in results["auroc"].values())
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["num_train_steps"] == 4 and config["batch_size"] == 16
  assert list((tmp_path / "tensorboard" / "train").glob("events.out.*"))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == ["2", "4"]
  if method in ("disaug", "dgad"):  # --mode=eval gives the same numbers.
    again = _main(config_arg, f"--workdir={tmp_path}", "--mode=eval", *tiny)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["auroc"] == (
        pytest.approx(results["auroc"], abs=1e-6))


@pytest.mark.parametrize("args, message", [
    (["--config=configs/disaug.py:imagenet"], "Unknown data set 'imagenet'"),
    (["--config=configs/disaug.py:digits", "--config.lr=1"],
     "unknown config key 'lr'"),
    (["--config=configs/disaug.py:digits", "--config.method=gan"],
     "Unknown method 'gan'"),
    (["--config=configs/disaug.py:folder,folder=/no/such/dir"],
     "does not exist"),
    (["--config=configs/rotnet.py:digits,normal_class=10"], "out of range"),
    (["--config=configs/clr.py:digits", "--config.data.channels=2"],
     "must be 1 or 3"),
    (["--config=configs/clr.py:digits", "--mode=eval"], "train first"),
    (["--config=configs/ganomaly.py:digits", "--config.data.image_size=24"],
     "power-of-two"),
    (["--config=configs/dgad.py:digits", "--config.transforms=shift"],
     "Unknown transforms 'shift'"),
])
def test_bad_input_gives_one_clear_line(tmp_path, args, message):
  is_gan = any(f"{m}.py" in args[0] for m in GAN_METHODS)
  out = _main(*args, f"--workdir={tmp_path / 'run'}",
              *(TINY_GAN if is_gan else TINY))
  assert out.returncode == 2
  assert message in out.stderr
  assert "Traceback" not in out.stderr
