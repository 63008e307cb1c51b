"""Reverse distillation (Deng & Li 2022, RD4AD): a frozen ImageNet teacher,
a trainable one-class bottleneck (OCBE) and a student decoder that must
rebuild the teacher's three feature maps from the bottleneck's code.

Training minimises the cosine distance between teacher and student maps,
flattened per example as the official code does (`loss_mode='flattened'`;
the paper's per-pixel form is `'per_pixel'`), with Adam 0.005 (0.5, 0.999).
At test time the per-scale maps 1 - cos(teacher, student) are upsampled to
the input size (align corners), summed and smoothed by a Gaussian of
sigma 4 ('anomaly_map'); the image score is its maximum ('map_max'), and
'map_mean' is offered too.

Teacher weights: `model.pretrained` names a torchvision state-dict file
(`components.pretrained` reads .pth, .safetensors or .npz without torch).
Without one the teacher is randomly initialised, which the log says: the
method then runs, but its features are not ImageNet features.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp

from jax_oneclass import optim
from jax_oneclass.components import anomaly_map, backbones, pretrained
from jax_oneclass.components import conv as conv_lib
from jax_oneclass.errors import ConfigError
from jax_oneclass.methods import interface
from jax_oneclass.methods.reverse_distillation import network as rd


@flax.struct.dataclass
class RDState:
  """The frozen teacher's variables and the trained OCBE + decoder."""

  step: jax.Array
  teacher: Any
  params: Any
  batch_stats: Any
  opt_state: Any


class Method(interface.NoFittedStage):
  """RD4AD: detection by the image maximum of the distillation map."""

  def __init__(self, config, info):
    self.config = config
    model = config.model
    self.teacher, self.ocbe, self.decoder = rd.build(
      model.backbone,
      model.get("ocbe_width_per_group") or None,
      conv_lib.settings(config),
    )
    if config.loss_mode not in rd.LOSS_MODES:
      raise ConfigError(
        f"loss_mode must be one of {rd.LOSS_MODES}, got {config.loss_mode!r}."
      )
    if info.image_shape[0] % 32:
      raise ConfigError(
        "Reverse distillation halves the image 5 times (teacher layer3 at "
        "1/16, the bottleneck at 1/32): config.data.image_size must be a "
        f"multiple of 32, got {info.image_shape[0]}."
      )
    self.map_fusion = anomaly_map.map_fusion(model.get("map_fusion", "sum"))
    self.tx = optim.make_optimizer(config, info)
    self.pretrained = pretrained.load_or_announce_random(
      model.pretrained, model.backbone, "Teacher"
    )

  @property
  def gradcam_layer(self) -> str:
    """The teacher's last layer3 block (the student decoder's blocks share
    the name; the teacher's is called first)."""
    return f"layer3_{self.teacher.stage_sizes[2] - 1}"

  def init_state(self, rng, image_shape) -> RDState:
    """Teacher variables (pretrained or random) and the student's state."""
    t_rng, o_rng, d_rng = jax.random.split(rng, 3)
    example = jnp.zeros((2,) + tuple(image_shape[:2]) + (3,))
    teacher = self.pretrained or self.teacher.init(t_rng, example)
    maps = rd.teacher_maps(self.teacher.apply(teacher, example))
    ocbe = self.ocbe.init(o_rng, maps)
    code = self.ocbe.apply(ocbe, maps)
    decoder = self.decoder.init(d_rng, code)
    params = {"ocbe": ocbe["params"], "decoder": decoder["params"]}
    return RDState(
      step=jnp.zeros((), jnp.int32),
      teacher=teacher,
      params=params,
      batch_stats={
        "ocbe": ocbe["batch_stats"],
        "decoder": decoder["batch_stats"],
      },
      opt_state=self.tx.init(params),
    )

  def _teacher_maps(self, state, images):
    return rd.teacher_maps(
      backbones.frozen_features(self.teacher, state.teacher, images)
    )

  def _student_maps(self, params, batch_stats, maps, train: bool):
    mutable = ["batch_stats"] if train else False
    ocbe_vars = {"params": params["ocbe"], "batch_stats": batch_stats["ocbe"]}
    dec_vars = {
      "params": params["decoder"],
      "batch_stats": batch_stats["decoder"],
    }
    if not train:
      code = self.ocbe.apply(ocbe_vars, maps)
      return self.decoder.apply(dec_vars, code), batch_stats
    code, ocbe_upd = self.ocbe.apply(
      ocbe_vars, maps, train=True, mutable=mutable
    )
    student, dec_upd = self.decoder.apply(
      dec_vars, code, train=True, mutable=mutable
    )
    return student, {
      "ocbe": ocbe_upd["batch_stats"],
      "decoder": dec_upd["batch_stats"],
    }

  def gradients(self, state, teacher_maps):
    """((loss, new batch_stats), gradients) of the train-mode loss with
    respect to OCBE + decoder, for the frozen teacher's maps."""

    def objective(params):
      student, stats = self._student_maps(
        params, state.batch_stats, teacher_maps, train=True
      )
      return rd.reverse_distillation_loss(
        teacher_maps, student, self.config.loss_mode
      ), stats

    return jax.value_and_grad(objective, has_aux=True)(state.params)

  def train_step(self, state, batch, rng):
    """One Adam step of OCBE + decoder; the teacher never changes."""
    del rng  # Augmentation happens in the input pipeline.
    teacher = self._teacher_maps(state, batch["image"][:, 0])
    (loss, stats), grads = self.gradients(state, teacher)
    params, opt_state = optim.apply_gradients(
      self.tx, state.params, state.opt_state, grads
    )
    return state.replace(
      step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state
    ), {"loss": loss, "grad_norm": optim.global_norm(grads)}

  @staticmethod
  def scorer_names(config) -> tuple[str, ...]:
    del config
    return ("map_max", "map_mean")

  def score(self, state, fitted, batch) -> interface.Scores:
    """Image scores and {'anomaly_map': [B, H, W]}, the upsampled, fused
    (`model.map_fusion`, summed by default) and smoothed distances, from
    one pass of both networks."""
    del fitted
    images = batch["image"]
    teacher = self._teacher_maps(state, images)
    student, _ = self._student_maps(
      state.params, state.batch_stats, teacher, train=False
    )
    smoothed = anomaly_map.anomaly_map(
      rd.cosine_distance_maps(teacher, student),
      images.shape[1:3],
      sigma=self.config.eval.map_sigma,
      fusion=self.map_fusion,
    )
    scores = {
      "map_max": anomaly_map.image_scores(smoothed),
      "map_mean": jnp.mean(smoothed, axis=(1, 2)),
    }
    return interface.Scores(scores, {"anomaly_map": smoothed})
