"""The interface every method implements, and the state most of them use.

A method module (registered in `jax_oneclass.methods`) defines a class
`Method`, built as `Method(config, info)` with the run's ConfigDict and the
data set's `DatasetInfo`. The trainer and the evaluator call only the
members of `Method` below, so they never branch on method names.
"""

from typing import Any, Protocol

import flax
import jax


@flax.struct.dataclass
class TrainState:
  """Parameters, BatchNorm statistics and optimiser state of one network."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


@flax.struct.dataclass
class Scores:
  """What `Method.score` returns for a batch of B images.

  `image`: {scorer: [B]}, higher meaning more anomalous. `maps`: {name:
  [B, H, W]} at the input's resolution, for methods that localise (empty
  otherwise); the evaluator reports pixel metrics for each.
  """

  image: dict[str, jax.Array]
  maps: dict[str, jax.Array] = flax.struct.field(default_factory=dict)


def headline_map(scorer: str, map_names) -> str | None:
  """The map drawn and exported beside image scorer `scorer`: the map
  whose name is `scorer` or a '/'-prefix of it (the longest), else the
  first by name; None without maps."""
  names = sorted(map_names)
  own = [m for m in names if scorer == m or scorer.startswith(m + "/")]
  if own:
    return max(own, key=len)
  return names[0] if names else None


class Method(Protocol):
  """What the trainer and evaluator call."""

  def init_state(self, rng: jax.Array, image_shape: tuple[int, int, int]):
    """A pytree of everything training changes (parameters, BatchNorm
    statistics, optimiser states, step; a GAN's two networks side by
    side)."""

  def train_step(self, state, batch: dict, rng: jax.Array):
    """(new state, metrics); pure and jit-able. `batch` holds global arrays
    ('image' [B, V, H, W, C] in [0, 1]); `rng` is the run's base key, which
    the step folds with `state.step`, so a resumed run draws the same
    numbers. `metrics` holds scalars, 'loss' among them; 'stop_training'
    > 0 says the method has frozen itself and the trainer should stop."""

  def embed(self, state, batch: dict) -> dict[str, jax.Array]:
    """Per-example arrays the non-gradient stage is fitted on, in eval mode;
    {} for methods without such a stage (the evaluator then skips the pass
    over the training images)."""

  def fit(self, embeddings: dict[str, Any]) -> dict:
    """The non-gradient stage, on the host, from the concatenated `embed`
    outputs of the normal training images: nested dicts of arrays ({} if
    none), which is how it is saved and restored."""

  def score(self, state, fitted, batch: dict) -> Scores:
    """Image scores and optional maps of 'image' [B, H, W, C]; pure and
    jit-able, in eval mode, so an image's scores never depend on its
    batch."""

  @staticmethod
  def scorer_names(config) -> tuple[str, ...]:
    """The keys of `Scores.image` that `score` returns for `config`, sorted,
    known without building networks (tests and checks ask for them)."""

  # Optional: a method may also define
  #
  #   gradcam_layer: str
  #
  # the module path GradCAM explains by default (`jax_oneclass.explain`):
  # a layer whose output is a feature map [B, h, w, C], or a module within
  # which the last such map is taken. And
  #
  #   prepare_batches: int = 1
  #   def prepare(self, state, batches) -> state
  #
  # a data-dependent initialisation (e.g. Deep SVDD's centre), run once on
  # the initial state before the first step, over an iterable of the first
  # `prepare_batches` training batches (global arrays, as `train_step` gets
  # them). It is not a step: `state.step` stays 0. A resumed run restores
  # the prepared state from its checkpoint instead; a run restarted from
  # step 0 prepares again from the same batches, with the same result.


class NoFittedStage:
  """Mixin for methods without a non-gradient stage: nothing to embed or
  fit."""

  def embed(self, state, batch):
    del state, batch
    return {}

  def fit(self, embeddings):
    del embeddings
    return {}


def step_key(rng: jax.Array, step: jax.Array) -> jax.Array:
  """The key for one training step: the base key folded with the step."""
  return jax.random.fold_in(rng, step)
