"""Discriminative feature learning with gradient preference (Xu et al. 2022,
arXiv 2204.11014): a repository of selected patch features mapped by a
centre-constrained MLP, scored by nearest-neighbour distance.

The concrete design is ours, made to follow the abstract's order (select,
build the repository, map the repository, score against it):

1. Multi-level features: layer2 and layer3 of a frozen ImageNet ResNet
   (`model.backbone`, weights from `model.pretrained`, random and logged as
   such without), each averaged over a 3x3 neighbourhood and resized to
   layer2's grid, concatenated (`model.feature_layers`, `neighbourhood`).
2. Gradient-preference selector and repository (`repository.py`): per
   normal image, `bank.fraction` of its patch points, ranked by the
   spatial gradient of the feature map (`bank.criterion`), by default
   those with the smallest gradients (`bank.prefer`), all of the kept
   points by it (`bank.preferred_fraction` 1; below 1 the rest is a seeded
   uniform sample of the image's other positions). The criterion needs no
   trained network, so it runs first; the repository is the selected
   points of every training image (capped at `bank.max_size`). The
   direction and share were chosen by a study (synthetic set, random
   backbone; `git show 225ab88:experiments/gp_selector_study.py`):
   smallest-first gave the best pixel AUROC and an image AUROC level with
   the other per-image rules.
3. Centre-constrained discriminative learning on the repository: a
   bias-free MLP (`model.mlp_widths`; () = no mapping, a plain
   nearest-neighbour repository) maps the selected points towards a
   centre c, loss mean ||f(x) - c||^2. Each training step selects the
   points of its batch's images, so it trains on exactly the repository's
   points. c is the mean of the initial network's outputs over the first
   `center_steps` batches, during which the weights do not move (Deep
   SVDD's recipe); it then stays fixed.
4. Early stopping: the loss of each incoming batch, taken before the step
   that uses it, estimates the held-out loss (exactly so in the first
   epoch, when no batch has been trained on yet); when its moving average
   (`early_stopping.decay`) has not improved by a relative
   `early_stopping.min_delta` for `early_stopping.patience` steps, the
   weights freeze and the step reports `stop_training`, on which the
   trainer stops (this happens inside the state, so a resumed run agrees).

Scoring: the repository mapped by the trained MLP (`fit`) is searched for
each test patch's nearest entries in the MLP's space (`eval.k`, chunked and
jit-compiled: `components.knn`); the distances are upsampled to the image
(align corners) and smoothed (sigma `eval.map_sigma`) into 'anomaly_map'.
Image scores: 'nn_max' (the map's maximum, the main score), 'nn_mean', and
'center_max' (the largest patch distance to c, no repository).

Not used: ranking points by the trained MLP's per-point gradient norms
(`center_mlp.per_point_gradient_norms`). That criterion needs the trained
MLP, so it cannot come first, and chosen over all images' points at once it
gave a weak repository (image AUROC 0.43 with only the preferred points):
the largest gradients (far from c, large feature norm) sit in about a fifth
of the images, which leaves the others' normal patches uncovered. Per
image, the same criterion is level with the others; it is kept only in the
study (experiments/RESULTS.md).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jax_oneclass import optim
from jax_oneclass.components import anomaly_map, backbones, knn, pretrained
from jax_oneclass.components import conv as conv_lib
from jax_oneclass.errors import ConfigError
from jax_oneclass.methods import interface
from jax_oneclass.methods.gradient_preference import center_mlp
from jax_oneclass.methods.gradient_preference import repository


@flax.struct.dataclass
class GPState:
  """Frozen backbone, MLP weights and optimiser, centre, early stopping."""

  step: jax.Array
  backbone: Any
  params: Any
  opt_state: Any
  center: jax.Array
  loss_average: jax.Array
  best_loss_average: jax.Array
  stale_steps: jax.Array
  stopped: jax.Array  # int32 0/1.


class Method:
  """Gradient-preference repository + centre-constrained MLP."""

  def __init__(self, config, info):
    self.config = config
    model = config.model
    self.backbone = backbones.build(
      model.backbone, conv_settings=conv_lib.settings(config)
    )
    self.layers = tuple(model.feature_layers)
    if not set(self.layers) <= {"layer1", "layer2", "layer3"}:
      raise ConfigError(
        f"model.feature_layers must name layer1..layer3, "
        f"got {list(self.layers)}."
      )
    if info.image_shape[0] % 16:
      raise ConfigError(
        "The backbone's layer3 is at 1/16 of the input: "
        f"config.data.image_size must be a multiple of 16, got "
        f"{info.image_shape[0]}."
      )
    if config.center_steps < 1:
      raise ConfigError(
        "center_steps must be >= 1: the centre is the mean output over "
        "those first batches (a zero centre lets the bias-free MLP "
        "collapse by shrinking its weights)."
      )
    self.bank = repository.bank_settings(config.bank)
    self.tx = optim.make_optimizer(config, info)
    self.pretrained = pretrained.load_or_announce_random(
      model.pretrained, model.backbone, "Backbone"
    )

  @property
  def gradcam_layer(self) -> str:
    """The last block of the deepest feature layer (layer3 by default)."""
    stage = int(max(self.layers)[-1])
    return f"{max(self.layers)}_{self.backbone.stage_sizes[stage - 1] - 1}"

  def init_state(self, rng, image_shape) -> GPState:
    """Backbone variables, MLP weights; the centre is set while training."""
    b_rng, m_rng = jax.random.split(rng)
    example = jnp.zeros((1,) + tuple(image_shape[:2]) + (3,))
    variables = self.pretrained or self.backbone.init(b_rng, example)
    in_dim = self._points(variables, example).shape[-1]
    widths = tuple(self.config.model.mlp_widths)
    params = center_mlp.init_mlp(m_rng, in_dim, widths)
    scalar = lambda v, dtype=jnp.float32: jnp.asarray(v, dtype)
    return GPState(
      step=scalar(0, jnp.int32),
      backbone=variables,
      params=params,
      opt_state=self.tx.init(params),
      center=jnp.zeros((widths[-1] if widths else in_dim,)),
      loss_average=scalar(jnp.inf),
      best_loss_average=scalar(jnp.inf),
      stale_steps=scalar(0, jnp.int32),
      stopped=scalar(0, jnp.int32),
    )

  def _points(self, variables, images) -> jax.Array:
    """[B, h, w, D] multi-level patch features of the frozen backbone."""
    features = backbones.frozen_features(self.backbone, variables, images)
    return backbones.patch_features(
      features, self.layers, self.config.model.neighbourhood
    )

  def _selected(self, variables, images) -> jax.Array:
    """[B, m, D] the repository points the selector keeps per image."""
    return repository.select_points(
      self._points(variables, images), self.bank, int(self.config.seed)
    )

  def train_step(self, state, batch, rng):
    """Centre estimation for `center_steps` steps, then centre-loss Adam
    steps until early stopping freezes the weights, on the selected
    (repository) points of the batch's images."""
    del rng  # The selection is a fixed function of each image.
    points = self._selected(state.backbone, batch["image"][:, 0])
    points = points.reshape(-1, points.shape[-1])
    warmup = int(self.config.center_steps)
    in_warmup = state.step < warmup
    outputs_mean = jnp.mean(center_mlp.mlp_apply(state.params, points), 0)
    center = jnp.where(
      in_warmup,
      state.center + (outputs_mean - state.center) / (state.step + 1),
      state.center,
    )

    loss, grads = jax.value_and_grad(center_mlp.center_loss)(
      state.params, center, points
    )
    params, opt_state = optim.apply_gradients(
      self.tx, state.params, state.opt_state, grads
    )

    # Early stopping on the moving average of the pre-update batch losses.
    stopping = self.config.early_stopping
    tracking = jnp.logical_and(~in_warmup, state.stopped == 0)
    average = jnp.where(
      state.step == warmup,
      loss,
      stopping.decay * state.loss_average + (1 - stopping.decay) * loss,
    )
    improved = jnp.logical_or(
      jnp.isinf(state.best_loss_average),
      average < state.best_loss_average * (1 - stopping.min_delta),
    )
    stale = jnp.where(improved, 0, state.stale_steps + 1)
    stopped = jnp.where(
      tracking,
      (stopping.patience > 0) & (stale >= stopping.patience),
      state.stopped > 0,
    ).astype(jnp.int32)
    # The weights move only after the centre is set and before stopping;
    # the step that decides to stop does not apply its update.
    training = jnp.logical_and(~in_warmup, stopped == 0)
    pick = lambda cond, new, old: jax.tree.map(
      lambda n, o: jnp.where(cond, n, o), new, old
    )
    new_state = state.replace(
      step=state.step + 1,
      center=center,
      stopped=stopped,
      params=pick(training, params, state.params),
      opt_state=pick(training, opt_state, state.opt_state),
      loss_average=pick(tracking, average, state.loss_average),
      best_loss_average=pick(
        tracking & improved, average, state.best_loss_average
      ),
      stale_steps=pick(tracking, stale, state.stale_steps),
    )
    return new_state, {
      "loss": loss,
      "grad_norm": optim.global_norm(grads),
      "stop_training": new_state.stopped.astype(jnp.float32),
    }

  def _mapped(self, state, images) -> jax.Array:
    """[B, h, w, d] patch features in the MLP's space."""
    points = self._points(state.backbone, images)
    return center_mlp.mlp_apply(state.params, points)

  def embed(self, state, batch):
    """Per training image: its repository points [m, d], mapped by the
    trained MLP."""
    return {
      "features": center_mlp.mlp_apply(
        state.params, self._selected(state.backbone, batch["image"])
      )
    }

  def fit(self, embeddings):
    """The mapped repository (capped at `bank.max_size`), laid out once for
    the chunked search."""
    features = np.asarray(embeddings["features"], np.float32)
    features = features.reshape(-1, features.shape[-1])
    chosen = repository.cap(
      len(features), int(self.bank.max_size), int(self.config.seed)
    )
    if len(chosen) < self.config.eval.k:
      raise ConfigError(
        f"The repository holds {len(chosen)} points but eval.k is "
        f"{self.config.eval.k}; raise bank.fraction or lower eval.k."
      )
    bank = knn.build_bank(
      features[chosen], bank_chunk=self.config.eval.bank_chunk
    )
    return {"bank": flax.serialization.to_state_dict(bank)}

  @staticmethod
  def scorer_names(config) -> tuple[str, ...]:
    del config
    return ("center_max", "nn_max", "nn_mean")

  def score(self, state, fitted, batch) -> interface.Scores:
    """Image scores and {'anomaly_map': [B, H, W]} from one pass."""
    images = batch["image"]
    mapped = self._mapped(state, images)
    grid = mapped.shape[:3]
    flat = mapped.reshape(-1, mapped.shape[-1])
    distances = knn.nearest_distance(
      knn.Bank(**fitted["bank"]),
      flat,
      k=self.config.eval.k,
      query_chunk=self.config.eval.query_chunk,
    ).reshape(grid)
    smoothed = anomaly_map.anomaly_map(
      distances, images.shape[1:3], sigma=self.config.eval.map_sigma
    )
    to_center = jnp.linalg.norm(mapped - state.center, axis=-1)
    scores = {
      "nn_max": anomaly_map.image_scores(smoothed),
      "nn_mean": jnp.mean(smoothed, axis=(1, 2)),
      "center_max": jnp.max(to_center, axis=(1, 2)),
    }
    return interface.Scores(scores, {"anomaly_map": smoothed})
