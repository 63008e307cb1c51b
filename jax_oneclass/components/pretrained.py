"""Backbone weights for `components.backbones.TorchResNet`: torchvision
files, or a self-supervised two-stage run (`load_self_supervised`).

`load_torchvision(path, arch)` reads a torchvision state-dict file (see
`weights_io` for the formats; torch is not needed) and returns Flax
variables {'params', 'batch_stats'}.

Conversion: the Flax path of a torch key joins each `<name>.<index>` pair
with an underscore (`layer1.0.downsample.1` -> `layer1_0/downsample_1`);
conv weights go OIHW -> HWIO into `kernel`; BN `weight`, `bias` -> `scale`,
`bias` in params and `running_mean`, `running_var` -> `mean`, `var` in
batch_stats. `num_batches_tracked`, `fc.*` and (unless the backbone builds
it) `layer4.*` are dropped.
"""

import functools
import json
import os
import re
from typing import Any, Mapping

from flax import traverse_util
import jax
import numpy as np

from jax_oneclass import checkpointing, logging_utils
from jax_oneclass.components import backbones, weights_cache
from jax_oneclass.components.weights_io import read_state_dict
from jax_oneclass.errors import CheckpointError, ConfigError

# Flax leaf name -> torch tensor name.
_TORCH_LEAF = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}


def load_torchvision(path: str, arch: str, with_layer4: bool = False):
  """Flax variables for `backbones.build(arch, with_layer4)` from a file."""
  return convert_state_dict(read_state_dict(path), arch, with_layer4)


# `model.pretrained` of a run restored from its checkpoint, which holds the
# backbone's weights: nothing is read.
FROM_CHECKPOINT = "<checkpoint>"
# `model.pretrained` naming torchvision's ImageNet weights of the backbone,
# downloaded once into the cache (`weights_cache.fetch`).
IMAGENET = "imagenet"


def load_or_announce_random(
  path: str, arch: str, role: str, with_layer4: bool = False
):
  """Variables from `path`, or None (random init) when `path` is empty.

  `path` is a torchvision weights file, `IMAGENET` (torchvision's file for
  `arch`, downloaded into the cache on first use), or the workdir of a
  two-stage run (rotnet, clr, disaug) trained with `model.arch=arch`, whose
  backbone becomes a self-supervised one. Either way the log says which, so
  a run with random or self-supervised features is never mistaken for one
  with ImageNet features. `FROM_CHECKPOINT` reads nothing (None).
  `with_layer4` keeps torchvision's layer4 (a two-stage workdir has no
  usable one for this: its backbone is read without layer4).
  """
  if path == FROM_CHECKPOINT:
    return None
  if path == IMAGENET:
    path = str(weights_cache.fetch(arch))
    logging_utils.info(f"{role}: {arch} ImageNet weights from {path}.")
    return load_torchvision(path, arch, with_layer4)
  if path and os.path.isdir(path):
    if with_layer4:
      raise ConfigError(
        f"model.pretrained={path} is a directory; here it takes "
        f"'{IMAGENET}' or a torchvision weights file of {arch} (a "
        "two-stage workdir initialises the localisation methods, not "
        "another self-supervised run)."
      )
    variables, origin = load_self_supervised(path, arch)
    logging_utils.info(
      f"{role}: {arch} SELF-SUPERVISED ({origin}) from "
      f"{path}; not ImageNet features."
    )
    return variables
  if path:
    logging_utils.info(f"{role}: {arch} from {path}.")
    return load_torchvision(path, arch, with_layer4)
  logging_utils.info(
    f"{role}: {arch} with RANDOM weights (no config.model.pretrained "
    "file); its features are not ImageNet features, so maps of real "
    "defects will be weak."
  )
  return None


def load_self_supervised(workdir: str, arch: str):
  """The backbone of a two-stage run's newest checkpoint, without layer4.

  Returns ({'params', 'batch_stats'} for `backbones.build(arch)`, a short
  description of the run). Raises CheckpointError when the workdir is not a
  two-stage run of that architecture or holds no complete checkpoint.
  """
  workdir = os.fspath(workdir)
  fix = (
    f"model.pretrained takes a torchvision weights file or the workdir "
    f"of a two-stage run (rotnet, clr, disaug) trained with "
    f"--config.model.arch={arch}"
  )
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      trained_arch = json.load(f).get("model", {}).get("arch")
  except (OSError, ValueError) as e:
    raise CheckpointError(
      f"{workdir} has no readable config.json: {fix}."
    ) from e
  if trained_arch != arch:
    raise CheckpointError(
      f"{workdir} was trained with model.arch={trained_arch!r}, but this "
      f"backbone is {arch!r}: {fix}."
    )
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(checkpoint_dir):
    raise CheckpointError(f"No checkpoints/ in {workdir}: {fix}.")
  checkpointer = checkpointing.Checkpointer(checkpoint_dir)
  step = checkpointer.latest_step()
  checkpointer.close()
  if step is None:
    raise CheckpointError(f"No complete checkpoint in {checkpoint_dir}.")
  state, meta = checkpointing.restore_parts(
    checkpoint_dir, step, [("params", "backbone"), ("batch_stats", "backbone")]
  )
  flat = traverse_util.flatten_dict(
    {c: state[c]["backbone"] for c in ("params", "batch_stats")}
  )
  shapes = _variable_shapes(arch, False)
  wrong = [
    p
    for p, shape in shapes.items()
    if p not in flat or tuple(np.shape(flat[p])) != shape
  ]
  if wrong:
    raise CheckpointError(
      f"The backbone in {checkpoint_dir}/{step} does not fit {arch}: "
      f"{len(wrong)} variable(s) missing or of another shape, e.g. "
      f"{'/'.join(wrong[0])}."
    )
  variables = traverse_util.unflatten_dict(
    {p: np.asarray(flat[p], np.float32) for p in shapes}
  )  # No layer4.
  return variables, (
    f"step {step} of {meta.get('method')} on {meta.get('data')}"
  )


def convert_state_dict(
  state_dict: Mapping[str, Any], arch: str, with_layer4: bool = False
):
  """torchvision state dict -> {'params', 'batch_stats'} of float32 arrays.

  Raises CheckpointError naming the offending keys when a tensor the
  backbone needs is missing, a tensor is left over, or a shape differs.
  """
  # {torch key: (Flax path, torch-layout shape)}, params first.
  targets = {}
  for path, shape in sorted(
    _variable_shapes(arch, with_layer4).items(),
    key=lambda item: item[0][0] != "params",
  ):
    if path[-1] == "kernel":  # HWIO here, OIHW in torch.
      shape = (shape[3], shape[2], shape[0], shape[1])
    targets[_torch_key(path[1:])] = (path, shape)
  missing = [k for k in targets if k not in state_dict]
  unexpected = [
    k for k in state_dict if k not in targets and not _ignored(k, with_layer4)
  ]
  if missing or unexpected:
    raise CheckpointError(
      f"The state dict does not fit {arch} (with_layer4={with_layer4}): "
      f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} "
      f"unexpected key(s) {unexpected[:5]}."
    )
  wrong = [
    f"{k} is {np.shape(state_dict[k])}, needs {shape}"
    for k, (_, shape) in targets.items()
    if np.shape(state_dict[k]) != shape
  ]
  if wrong:
    raise CheckpointError(
      f"{len(wrong)} tensor(s) have the wrong shape for {arch}: "
      + "; ".join(wrong[:5])
      + "."
    )
  flat = {}
  for key, (path, _) in targets.items():
    value = np.asarray(state_dict[key])
    if path[-1] == "kernel":
      value = value.transpose(2, 3, 1, 0)
    flat[path] = np.ascontiguousarray(value, dtype=np.float32)
  return traverse_util.unflatten_dict(flat)


def _torch_key(module_path) -> str:
  """('layer1_0', 'downsample_1', 'scale') -> 'layer1.0.downsample.1.weight'."""
  *modules, leaf = module_path
  names = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
  return ".".join(names + [_TORCH_LEAF[leaf]])


def _ignored(key: str, with_layer4: bool) -> bool:
  return (
    key.endswith("num_batches_tracked")
    or key.startswith("fc.")
    or (not with_layer4 and key.startswith("layer4."))
  )


@functools.lru_cache(maxsize=None)
def _variable_shapes(arch: str, with_layer4: bool):
  """{(collection, *module_path, leaf): shape} of the backbone's variables."""
  model = backbones.build(arch, with_layer4)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  return {
    path: tuple(leaf.shape)
    for path, leaf in traverse_util.flatten_dict(variables).items()
  }
