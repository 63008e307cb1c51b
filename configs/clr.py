"""Contrastive learning (CLR) + one-class classifiers (Sohn et al. 2021,
Sec. 3; reference script/run_contrastive.sh).

  python -m jax_oneclass.main --config=configs/clr.py:digits --workdir=/tmp/clr
"""

from jax_oneclass import config as config_lib
from jax_oneclass.methods.two_stage import defaults


def get_config(arg=None):
  config = defaults.two_stage_config("clr")
  config.batch_size = 32  # run_contrastive.sh.
  config.data.num_views = 2
  config.temperature = 0.2  # run_contrastive.sh: --temperature=0.2.
  # 'cross_view' is the reference's loss (contrastive.py); 'nt_xent' is
  # SimCLR's symmetric NT-Xent.
  config.contrastive_loss = "cross_view"
  config.eval.scorer = "pool/gde/rot_avg"  # Fixed a priori.
  config_lib.apply_arg(config, arg, defaults.small_run, defaults.PRESETS)
  return config
