"""RotNet + one-class classifiers (Sohn et al. 2021, Sec. 3; reference
script/run_rotation.sh).

  python -m jax_oneclass.main --config=configs/rotnet.py:digits --workdir=/tmp/rotnet
  python -m jax_oneclass.main --config=configs/rotnet.py:cifar10,normal_class=3 --workdir=...
  # Localisation on MVTec AD (patch mode, docs/two_stage.md#patch-mode):
  python -m jax_oneclass.main --config=configs/rotnet.py:mvtec_patch,folder=/data/mvtec_anomaly_detection,category=bottle --workdir=...
"""

from jax_oneclass import config as config_lib
from jax_oneclass.methods.two_stage import defaults


def get_config(arg=None):
  config = defaults.two_stage_config("rotnet")
  config.batch_size = 64  # run_rotation.sh: 64 images = 256 rotated inputs.
  config.data.num_views = 4  # One augmented view per rotation.
  # 8 layers of 512; the last one ('embed', with bias) feeds the 4 logits.
  config.model.head_dims = (512,) * 8
  config.eval.scorer = "pool/gde/rot_avg"  # Fixed a priori.
  config_lib.apply_arg(config, arg, defaults.small_run, defaults.PRESETS)
  return config
