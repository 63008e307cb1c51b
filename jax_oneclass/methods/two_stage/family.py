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
"""

import jax
import jax.numpy as jnp

from jax_oneclass import optim
from jax_oneclass.components import backbones, oneclass, pretrained
from jax_oneclass.components import conv as conv_lib
from jax_oneclass.errors import ConfigError
from jax_oneclass.methods import interface
from jax_oneclass.methods.two_stage.network import SelfSupervisedNet

FEATURES = ("pool", "embed")
NUM_ROTATIONS = 4


def rotate(images: jax.Array, k: int) -> jax.Array:
  """Rotates [B, H, W, C] images by k * 90 degrees counter-clockwise."""
  return jnp.rot90(images, k, axes=(1, 2))


class TwoStageMethod:
  """Self-supervised network + one-class classifiers on its features."""

  num_rotation_classes = 0  # RotNet sets 4: the network gets a rotation head.

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
    self.tx = optim.make_optimizer(config, info)
    self.classifier_hparams = oneclass.checked_hparams(config.classifiers)

  # --- stage one -----------------------------------------------------------

  def init_state(self, rng, image_shape) -> interface.TrainState:
    """Initial parameters, BatchNorm statistics and optimiser state."""
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

  def embed(self, state, batch):
    """Features of each rotation: {'<feature>/rot<k>': [B, D]}."""
    out = {}
    for k in self._rotations():
      outputs = self.apply_eval(state, rotate(batch["image"], k))
      for feature in FEATURES:
        out[f"{feature}/rot{k}"] = outputs[feature]
    return out

  def fit(self, embeddings):
    """Fits every configured classifier on each feature and rotation."""
    return {
      key: oneclass.fit_each(features, self.classifier_hparams)
      for key, features in embeddings.items()
    }

  def score(self, state, fitted, batch) -> interface.Scores:
    """Classifier scores per feature, with and without rotation averaging."""
    return interface.Scores(self.classifier_scores(state, fitted, batch))

  def classifier_scores(self, state, fitted, batch) -> dict:
    """{'<feature>/<classifier>[/rot_avg]': [B]}."""
    rotations = self._rotations()
    outputs = {
      k: self.apply_eval(state, rotate(batch["image"], k)) for k in rotations
    }
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
