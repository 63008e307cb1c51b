"""Shared parts of the two-stage family (Sohn et al. 2021).

Stage one learns a representation with a self-supervised loss (RotNet, CLR,
DisAug CLR each define `loss`); stage two fits shallow one-class classifiers
(KDE, GDE, OC-SVM, ...; see `jax_oneclass.components.oneclass`) on the frozen,
L2-normalised features of the normal training images.

Scorers are named '<feature>/<classifier>' with feature 'pool' (pooled
backbone output) or 'embed' (head output), as the reference evaluates both.
With `config.eval.rotation_averaging` the classifiers are also fitted on the
90/180/270-degree rotated training images, each rotated test copy is scored
by the classifier of its rotation, and the four scores are averaged
('<feature>/<classifier>/rot_avg'). The reference code itself scores the
unrotated images only; the averaged scores are this library's addition.

Patch mode (`config.data.patch_size` = p > 0; our design, see `patches`
and docs/two_stage.md): the network trains on random p x p patches, the
classifiers are fitted on the features of the dense patches of the normal
training images (at most `eval.max_fit_patches`, a seeded sample), and a
test image's patches are scored in one batched computation. Each scorer
named in `eval.patch_maps` (all when empty) gives a map, the mean score of
the patches covering each pixel, and the image score '<scorer>/map_max',
its maximum. With `eval.whole_image_scores`, the same network also scores
the whole image resized to p x p with classifiers fitted on the resized
normal training images: 'whole/<scorer>'.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jax_oneclass import cli_checks, optim
from jax_oneclass.components import backbones, oneclass, pretrained
from jax_oneclass.components import conv as conv_lib
from jax_oneclass.errors import ConfigError
from jax_oneclass.methods import interface
from jax_oneclass.methods.two_stage import patches as patches_lib
from jax_oneclass.methods.two_stage.network import SelfSupervisedNet

FEATURES = ("pool", "embed")
NUM_ROTATIONS = 4
WHOLE = "whole/"  # Prefix of the whole-image classifiers and scorers.
MAP_MAX = "/map_max"  # Suffix of a patch map's maximum.


def rotate(images: jax.Array, k: int) -> jax.Array:
  """Rotates [B, H, W, C] images by k * 90 degrees counter-clockwise."""
  return jnp.rot90(images, k, axes=(1, 2))


class TwoStageMethod:
  """Self-supervised network + one-class classifiers on its features."""

  num_rotation_classes = 0  # RotNet sets 4: the network gets a rotation head.
  extra_scorers = ()  # Scorers beyond the classifiers' (RotNet's head).
  gradcam_layer = "backbone"  # Its last residual block's feature map.

  def __init__(self, config, info):
    self.config = config
    model_cfg = config.model
    if model_cfg.arch not in ("cifar", *backbones.ARCHS):
      raise ConfigError(
        f"Unknown model.arch {model_cfg.arch!r}; choose 'cifar' (the "
        f"paper's ResNet) or one of {sorted(backbones.ARCHS)}."
      )
    self.model = SelfSupervisedNet(
      stage_sizes=tuple(model_cfg.stage_sizes),
      width=model_cfg.width,
      head_dims=tuple(model_cfg.head_dims),
      num_rotations=self.num_rotation_classes,
      arch=model_cfg.arch,
      conv_settings=conv_lib.settings(config),
    )
    self.pretrained = None
    if model_cfg.get("pretrained"):
      if model_cfg.arch == "cifar":
        raise ConfigError(
          f"model.pretrained={model_cfg.pretrained!r} initialises a "
          "torchvision backbone, but model.arch is 'cifar' (the paper's "
          "ResNet, which has no ImageNet weights): add "
          "--config.model.arch=resnet18 (or resnet50, wide_resnet50_2)."
        )
      self.pretrained = pretrained.load_or_announce_random(
        model_cfg.pretrained, model_cfg.arch, "Backbone init", with_layer4=True
      )
    self.classifier_hparams = oneclass.checked_hparams(config.classifiers)
    self.patch, self.stride = cli_checks.patch_geometry(config)
    self.map_names = self._checked_patch_scorers() if self.patch else ()
    self.tx = optim.make_optimizer(config, info)

  @classmethod
  def image_scorer_names(cls, config) -> tuple[str, ...]:
    """The names `image_scores` returns, known before any data is seen."""
    suffixes = [""] + (["/rot_avg"] if config.eval.rotation_averaging else [])
    return tuple(
      f"{feature}/{name}{suffix}"
      for feature in FEATURES
      for name in config.classifiers
      for suffix in suffixes
    ) + tuple(cls.extra_scorers)

  @classmethod
  def scorer_names(cls, config) -> tuple[str, ...]:
    """`score`'s image scorers: `image_scorer_names`, or in patch mode the
    maps' maxima and the whole-image scorers."""
    names = cls.image_scorer_names(config)
    if not cli_checks.patch_geometry(config)[0]:
      return tuple(sorted(names))
    maps = tuple(config.eval.get("patch_maps", ()) or names)
    image = [m + MAP_MAX for m in maps]
    if config.eval.get("whole_image_scores", True):
      image += [WHOLE + n for n in names]
    return tuple(sorted(image))

  def _checked_patch_scorers(self) -> tuple[str, ...]:
    """The scorers that get maps (`eval.patch_maps`, all when empty),
    checked with `eval.scorer` before any training."""
    names = self.image_scorer_names(self.config)
    maps = tuple(self.config.eval.get("patch_maps", ()) or names)
    unknown = [m for m in maps if m not in names]
    if unknown:
      raise ConfigError(
        f"config.eval.patch_maps names {', '.join(unknown)}, not scorers of "
        f"{self.config.method}; choose among {', '.join(names)}."
      )
    image = [m + MAP_MAX for m in maps]
    if self.config.eval.get("whole_image_scores", True):
      image += [WHOLE + n for n in names]
    scorer = self.config.eval.get("scorer", "")
    if scorer and scorer not in image:
      raise ConfigError(
        f"config.eval.scorer={scorer!r} is not an image score of the patch "
        f"mode (data.patch_size={self.patch}); choose e.g. "
        f"{maps[0] + MAP_MAX!r} (a map's maximum) or {WHOLE + names[0]!r}."
      )
    return maps

  # --- stage one -----------------------------------------------------------

  def init_state(self, rng, image_shape) -> interface.TrainState:
    """Initial parameters, BatchNorm statistics and optimiser state."""
    if self.patch:  # The network sees patches.
      image_shape = (self.patch, self.patch, image_shape[-1])
    variables = self.model.init(rng, jnp.zeros((2,) + tuple(image_shape)))
    params, batch_stats = variables["params"], variables["batch_stats"]
    if self.pretrained:  # The backbone starts from the file; heads random.
      backbone = jax.tree.map(jnp.asarray, self.pretrained)
      params = {**params, "backbone": backbone["params"]}
      batch_stats = {**batch_stats, "backbone": backbone["batch_stats"]}
    return interface.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=self.tx.init(params),
    )

  def apply_train(self, params, batch_stats, images):
    """Forward pass in train mode; returns (outputs, new batch_stats)."""
    outputs, updates = self.model.apply(
      {"params": params, "batch_stats": batch_stats},
      images,
      train=True,
      mutable=["batch_stats"],
    )
    return outputs, updates["batch_stats"]

  def loss(self, params, batch_stats, batch, rng):
    """Returns (loss, (new_batch_stats, metrics)); defined per method."""
    raise NotImplementedError

  def train_step(self, state, batch, rng):
    """One optimiser step on a global batch; pure and jit-able."""
    rng = interface.step_key(rng, state.step)
    grad_fn = jax.value_and_grad(self.loss, has_aux=True)
    (loss, (batch_stats, metrics)), grads = grad_fn(
      state.params, state.batch_stats, batch, rng
    )
    params, opt_state = optim.apply_gradients(
      self.tx, state.params, state.opt_state, grads
    )
    metrics = dict(
      metrics,
      loss=loss,
      grad_norm=optim.global_norm(grads),
      param_norm=optim.global_norm(params),
    )
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
    )
    return new_state, metrics

  # --- stage two -----------------------------------------------------------

  def _rotations(self) -> tuple[int, ...]:
    if self.config.eval.rotation_averaging:
      return tuple(range(NUM_ROTATIONS))
    return (0,)

  def apply_eval(self, state, images):
    """Forward pass in eval mode (BatchNorm running statistics)."""
    return self.model.apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      images,
      train=False,
    )

  def _features(self, state, images) -> dict:
    """{'<feature>/rot<k>': [N, D]} of images [N, H, W, C]."""
    out = {}
    for k in self._rotations():
      outputs = self.apply_eval(state, rotate(images, k))
      for feature in FEATURES:
        out[f"{feature}/rot{k}"] = outputs[feature]
    return out

  def _patches(self, images):
    """The dense patches of images [B, H, W, C] as one batch [B * P, p, p,
    C], image-major."""
    x = patches_lib.extract(images, self.patch, self.stride)
    b, rows, cols = x.shape[:3]
    return x.reshape((b * rows * cols,) + x.shape[3:])

  def _whole(self, images):
    """Images [B, H, W, C] resized to the patch side the network learned."""
    return patches_lib.resize(images, self.patch)

  def embed(self, state, batch):
    """Features of each rotation: {'<feature>/rot<k>': [B, D]}; in patch
    mode [B, P, D] over the P dense patches, plus 'whole/...' [B, D]."""
    images = batch["image"]
    if not self.patch:
      return self._features(state, images)
    out = {
      key: v.reshape((images.shape[0], -1, v.shape[-1]))
      for key, v in self._features(state, self._patches(images)).items()
    }
    if self.config.eval.get("whole_image_scores", True):
      whole = self._features(state, self._whole(images))
      out.update({WHOLE + key: v for key, v in whole.items()})
    return out

  def _fit_rows(self, features) -> np.ndarray:
    """[N, D] features as they are; [N, P, D] patch features flattened and
    cut to a seeded sample of `eval.max_fit_patches` rows (the same rows
    for every key, since all have N * P rows)."""
    features = np.asarray(features)
    if features.ndim == 2:
      return features
    rows = features.reshape(-1, features.shape[-1])
    limit = int(self.config.eval.get("max_fit_patches", 20_000))
    if 0 < limit < len(rows):
      rng = np.random.default_rng(int(self.config.seed))
      rows = rows[np.sort(rng.choice(len(rows), limit, replace=False))]
    return rows

  def fit(self, embeddings):
    """Fits every configured classifier on each feature and rotation."""
    return {
      key: oneclass.fit_each(self._fit_rows(features), self.classifier_hparams)
      for key, features in embeddings.items()
    }

  def score(self, state, fitted, batch) -> interface.Scores:
    """Classifier scores per feature, with and without rotation averaging;
    in patch mode, maps and their maxima (see the module docstring)."""
    images = batch["image"]
    if not self.patch:
      return interface.Scores(self.image_scores(state, fitted, images))
    whole = {
      k[len(WHOLE) :]: v for k, v in fitted.items() if k.startswith(WHOLE)
    }
    per_patch = self.image_scores(
      state,
      {k: v for k, v in fitted.items() if not k.startswith(WHOLE)},
      self._patches(images),
    )
    b, h, w, _ = images.shape
    grid = (b,) + patches_lib.grid_shape(h, w, self.patch, self.stride)
    maps = {
      name: patches_lib.score_map(
        per_patch[name].reshape(grid), h, w, self.patch, self.stride
      )
      for name in self.map_names
    }
    scores = {name + MAP_MAX: m.max(axis=(1, 2)) for name, m in maps.items()}
    if whole:
      resized = self.image_scores(state, whole, self._whole(images))
      scores.update({WHOLE + k: v for k, v in resized.items()})
    return interface.Scores(scores, maps)

  def image_scores(self, state, fitted, images) -> dict:
    """{scorer: [N]} of images [N, H, W, C] (whole images, or patches in
    patch mode); RotNet adds its head's scores."""
    return self.classifier_scores(state, fitted, images)

  def classifier_scores(self, state, fitted, images) -> dict:
    """{'<feature>/<classifier>[/rot_avg]': [N]} of images [N, H, W, C]."""
    rotations = self._rotations()
    outputs = {k: self.apply_eval(state, rotate(images, k)) for k in rotations}
    scores = {}
    for feature in FEATURES:
      per_rotation = [
        oneclass.score_each(
          fitted[f"{feature}/rot{k}"],
          outputs[k][feature],
          self.classifier_hparams,
        )
        for k in rotations
      ]
      for name in self.classifier_hparams:
        scores[f"{feature}/{name}"] = per_rotation[0][name]
        if len(rotations) > 1:
          scores[f"{feature}/{name}/rot_avg"] = jnp.mean(
            jnp.stack([s[name] for s in per_rotation]), axis=0
          )
    return scores
