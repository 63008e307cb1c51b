"""Config of my_lab.deep_svdd, a method outside jax_oneclass.

  PYTHONPATH=/path/to/folder/holding/my_lab python -m jax_oneclass.main \
      --config=deep_svdd_config.py:digits --workdir=/tmp/svdd
"""

import ml_collections

from jax_oneclass import config as config_lib


def get_config(arg=None):
  config = config_lib.base_config("my_lab.deep_svdd")
  config.plugins = ("my_lab.classifiers",)  # Registers 'knn'.
  config.classifiers = ml_collections.ConfigDict(
    {"knn": {"k": 2}, "gde": {"shrinkage": "ledoit_wolf"}}
  )
  config.eval.scorer = "svdd"
  config_lib.apply_arg(config, arg)
  return config
