"""Distribution-augmented contrastive learning (DisAug CLR) + one-class
classifiers (Sohn et al. 2021, Sec. 3.2; reference
script/run_contrastive_da.sh, distaug_type=rot).

  python -m jax_oneclass.main --config=configs/disaug.py:digits --workdir=/tmp/disaug
  python -m jax_oneclass.main --config=configs/disaug.py:cifar10,normal_class=3 --workdir=...
  # Localisation on MVTec AD (patch mode, docs/two_stage.md#patch-mode):
  python -m jax_oneclass.main --config=configs/disaug.py:mvtec_patch,folder=/data/mvtec_anomaly_detection,category=bottle --workdir=...
"""

from jax_oneclass import config as config_lib
from jax_oneclass.methods.two_stage import defaults


def get_config(arg=None):
  config = defaults.two_stage_config("disaug")
  config.batch_size = 32  # run_contrastive_da.sh.
  config.data.num_views = 2
  config.data.rotation_distaug = True  # 90/180/270 copies as new instances.
  config.temperature = 0.2
  config.contrastive_loss = "cross_view"
  config.eval.scorer = "pool/gde/rot_avg"  # Fixed a priori.
  config_lib.apply_arg(config, arg, defaults.small_run, defaults.PRESETS)
  return config
