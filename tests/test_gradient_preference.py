"""Gradient preference: chunked nearest neighbours, per-point gradient norms,
the selector, patch features, and the training step's phases."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jax_oneclass.errors import ConfigError
from jax_oneclass.methods.gradient_preference import method as gp
from jax_oneclass.methods.gradient_preference import repository
from jax_oneclass.components import backbones
from jax_oneclass.methods.gradient_preference import center_mlp
from jax_oneclass.components.knn import (
  build_bank,
  nearest_distance,
  nearest_neighbors,
)
from tests.conftest import load_config


def _brute_force(queries, bank, k):
  full = np.sqrt(((queries[:, None] - bank[None]) ** 2).sum(-1))
  index = np.argsort(full, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(full, index, axis=1), index


@pytest.mark.parametrize(
  "k,query_chunk,bank_chunk", [(1, 64, 100), (3, 7, 33), (2, 1000, 5000)]
)
def test_chunked_nearest_neighbours_equal_brute_force(
  k, query_chunk, bank_chunk
):
  rng = np.random.default_rng(0)
  # Sizes that are not multiples of the chunks exercise the padding.
  queries = rng.normal(size=(301, 12)).astype(np.float32)
  bank = rng.normal(size=(1001, 12)).astype(np.float32)
  distances, indices = nearest_neighbors(
    queries, bank, k=k, query_chunk=query_chunk, bank_chunk=bank_chunk
  )
  want_distances, want_indices = _brute_force(queries, bank, k)
  np.testing.assert_array_equal(np.asarray(indices), want_indices)
  np.testing.assert_allclose(distances, want_distances, atol=1e-5)
  np.testing.assert_allclose(
    nearest_distance(
      build_bank(bank, bank_chunk), queries, k=k, query_chunk=query_chunk
    ),
    want_distances.mean(1),
    atol=1e-5,
  )


def test_nearest_distances_are_exact_far_from_the_origin():
  # |q|^2 - 2q.b + |b|^2 cancels badly here; the winners are recomputed.
  rng = np.random.default_rng(1)
  offset = np.full(8, 1e3, np.float32)
  bank = offset + rng.normal(size=(50, 8)).astype(np.float32) * 1e-2
  queries = bank[:5] + 1e-3
  distances, indices = nearest_neighbors(queries, bank, k=1)
  want_distances, want_indices = _brute_force(
    queries.astype(np.float64), bank.astype(np.float64), 1
  )
  np.testing.assert_array_equal(np.asarray(indices), want_indices)
  np.testing.assert_allclose(distances, want_distances, rtol=1e-4)


def test_nearest_neighbours_reject_bad_shapes():
  with pytest.raises(ValueError, match="k=3 needs"):
    nearest_neighbors(np.zeros((2, 4)), np.zeros((2, 4)), k=3)
  with pytest.raises(ValueError, match="dimension 4 but the bank has 5"):
    nearest_neighbors(np.zeros((2, 4)), np.zeros((6, 5)))


def test_per_point_gradient_norms_equal_autodiff_per_point():
  rng = jax.random.key(0)
  weights = center_mlp.init_mlp(rng, 6, (5, 4, 3))
  points = jax.random.normal(jax.random.key(1), (9, 6))
  center = jnp.array([0.3, -0.2, 0.5])

  def one_norm(x):
    grads = jax.grad(
      lambda w: jnp.sum((center_mlp.mlp_apply(w, x[None]) - center) ** 2)
    )(weights)
    return jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))

  np.testing.assert_allclose(
    center_mlp.per_point_gradient_norms(weights, center, points),
    jax.vmap(one_norm)(points),
    rtol=1e-5,
  )


def _bank(
  fraction,
  preferred_fraction,
  max_size=0,
  criterion="feature_gradient",
  prefer="largest",
  normalize=False,
):
  return ml_collections.ConfigDict(
    dict(
      fraction=fraction,
      preferred_fraction=preferred_fraction,
      max_size=max_size,
      criterion=criterion,
      prefer=prefer,
      normalize=normalize,
    )
  )


def test_feature_gradient_is_the_central_difference_magnitude():
  points = np.random.default_rng(0).normal(size=(2, 5, 6, 3))
  got = np.asarray(repository.feature_gradient(jnp.asarray(points), False))
  padded = np.pad(points, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  for b, i, j in [(0, 0, 0), (1, 2, 3), (0, 4, 5), (1, 0, 4)]:
    d_x = padded[b, i + 1, j + 2] - padded[b, i + 1, j]
    d_y = padded[b, i + 2, j + 1] - padded[b, i, j + 1]
    want = 0.5 * np.sqrt((d_x**2).sum() + (d_y**2).sum())
    np.testing.assert_allclose(got[b, i, j], want, rtol=1e-5)
  normalised = repository.feature_gradient(jnp.asarray(points), True)
  np.testing.assert_allclose(
    normalised, got / (np.linalg.norm(points, axis=-1) + 1e-6), rtol=1e-5
  )


def test_selector_keeps_the_preferred_points_then_samples_the_rest():
  # One image whose feature map is flat but for a bright 2x2 square: the
  # square and its ring have the largest spatial gradients.
  points = np.zeros((2, 8, 8, 4), np.float32)
  points[0, 3:5, 3:5] = 5.0
  points[1] = np.random.default_rng(1).normal(size=(8, 8, 4))
  scores = np.asarray(repository.feature_gradient(jnp.asarray(points), False))
  index = np.asarray(
    repository.select_indices(jnp.asarray(points), _bank(0.25, 0.5), seed=0)
  )
  assert index.shape == (2, 16)
  for b in range(2):
    assert len(set(index[b])) == 16  # No point twice.
    flat = scores[b].reshape(-1)
    np.testing.assert_allclose(
      np.sort(flat[index[b, :8]]), np.sort(flat)[-8:], rtol=1e-6
    )
  # The rest: the same seeded positions in every image, none preferred.
  rest = [set(index[b, 8:]) for b in range(2)]
  assert not rest[0] & set(index[0, :8])
  smallest = np.asarray(
    repository.select_indices(
      jnp.asarray(points), _bank(0.25, 1.0, prefer="smallest"), seed=0
    )
  )
  np.testing.assert_allclose(
    np.sort(scores[1].reshape(-1)[smallest[1]]),
    np.sort(scores[1].reshape(-1))[:16],
    rtol=1e-6,
  )
  uniform = np.asarray(
    repository.select_indices(
      jnp.asarray(points), _bank(0.25, 1.0, criterion="random"), seed=0
    )
  )
  np.testing.assert_array_equal(uniform[0], uniform[1])
  np.testing.assert_array_equal(
    index,
    np.asarray(
      repository.select_indices(jnp.asarray(points), _bank(0.25, 0.5), seed=0)
    ),
  )
  selected = repository.select_points(
    jnp.asarray(points), _bank(0.25, 0.5), seed=0
  )
  np.testing.assert_array_equal(selected[1], points[1].reshape(-1, 4)[index[1]])
  assert len(repository.cap(100, 7, seed=0)) == 7
  np.testing.assert_array_equal(repository.cap(5, 7, seed=0), np.arange(5))


def test_patch_features_average_neighbourhoods_and_join_levels():
  rng = np.random.default_rng(0)
  features = {
    "layer2": jnp.asarray(rng.normal(size=(2, 4, 4, 3))),
    "layer3": jnp.asarray(rng.normal(size=(2, 2, 2, 5))),
  }
  joined = backbones.patch_features(features, ("layer2", "layer3"), 3)
  assert joined.shape == (2, 4, 4, 8)
  layer2 = np.asarray(features["layer2"])
  # A corner averages the 2x2 pixels inside the image, an inner pixel 3x3.
  np.testing.assert_allclose(
    joined[:, 0, 0, :3], layer2[:, :2, :2].mean((1, 2)), rtol=1e-5
  )
  np.testing.assert_allclose(
    joined[:, 1, 2, :3], layer2[:, 0:3, 1:4].mean((1, 2)), rtol=1e-5
  )
  with pytest.raises(ConfigError, match="non-empty subset"):
    backbones.patch_features(features, ("layer4",))


def _method(**overrides):
  config = load_config("gradient_preference", "digits")
  config.model.mlp_widths = (16, 8)
  config.center_steps = 2
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  info = types.SimpleNamespace(
    image_shape=(16, 16, 1), num_train=64, epoch_size=64
  )
  return gp.Method(config, info)


def test_step_phases_centre_then_training_then_early_stop():
  # min_delta 1 makes any improvement too small: stop after `patience`.
  method = _method(
    **{"early_stopping.patience": 2, "early_stopping.min_delta": 1.0}
  )
  state = method.init_state(jax.random.key(0), (16, 16, 1))
  images = jax.random.uniform(jax.random.key(1), (3, 4, 1, 16, 16, 1))
  step = jax.jit(method.train_step)
  outputs = []
  history = [state]
  for i in range(6):
    state, metrics = step(state, {"image": images[i % 3]}, jax.random.key(2))
    history.append(state)
    outputs.append(metrics)
  same = lambda a, b: all(
    np.array_equal(x, y)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params))
  )
  # Steps 0-1 estimate the centre: the mean output over both batches.
  assert same(history[0], history[2])

  def mean_output(batch):
    # The centre is the mean over the selected (repository) points only.
    points = method._selected(history[0].backbone, batch[:, 0])  # pylint: disable=protected-access
    grid = method._points(history[0].backbone, batch[:, 0]).shape[1:3]  # pylint: disable=protected-access
    assert (
      points.shape[1]
      == round(method.config.bank.fraction * grid[0] * grid[1])
      < grid[0] * grid[1]
    )
    return np.asarray(
      center_mlp.mlp_apply(
        history[0].params, points.reshape(-1, points.shape[-1])
      )
    ).mean(0)

  np.testing.assert_allclose(
    history[2].center,
    (mean_output(images[0]) + mean_output(images[1])) / 2,
    rtol=1e-4,
  )
  # Steps 2-3 train (the first sets the best average, the second does not
  # improve on it by min_delta); step 4 reaches patience and keeps its
  # weights, and so does every step after it.
  assert not same(history[2], history[3])
  assert not same(history[3], history[4])
  assert [float(m["stop_training"]) for m in outputs] == [0, 0, 0, 0, 1, 1]
  assert same(history[4], history[5]) and same(history[4], history[6])
  np.testing.assert_array_equal(history[6].center, history[2].center)


def test_bad_configs_fail_with_clear_messages():
  with pytest.raises(ConfigError, match="multiple of 16"):
    gp.Method(
      load_config("gradient_preference", "digits"),
      types.SimpleNamespace(image_shape=(40, 40, 1), num_train=8, epoch_size=8),
    )
  with pytest.raises(ConfigError, match="feature_layers"):
    _method(**{"model.feature_layers": ("layer2", "layer5")})
  with pytest.raises(ConfigError, match="bank.fraction"):
    _method(**{"bank.fraction": 0.0})
  with pytest.raises(ConfigError, match="center_steps must be >= 1"):
    _method(center_steps=0)
  with pytest.raises(ConfigError, match="bank.criterion='sobel'"):
    _method(**{"bank.criterion": "sobel"})
  with pytest.raises(ConfigError, match="bank.prefer"):
    _method(**{"bank.prefer": "most"})


def test_old_bank_configs_get_the_selector_defaults():
  old = ml_collections.ConfigDict(
    dict(fraction=0.1, preferred_fraction=0.5, max_size=0)
  )
  settings = repository.bank_settings(old)
  assert (settings.criterion, settings.prefer, settings.normalize) == (
    "feature_gradient",
    "largest",
    False,
  )
  assert settings.preferred_fraction == 0.5


def test_no_mlp_widths_is_a_plain_repository_of_the_selected_points():
  method = _method(**{"model.mlp_widths": (), "bank.fraction": 1.0})
  state = method.init_state(jax.random.key(0), (16, 16, 1))
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 1))
  points = method._points(state.backbone, images)  # pylint: disable=protected-access
  assert state.params == {} and state.center.shape == (points.shape[-1],)
  features = method.embed(state, {"image": images})["features"]
  np.testing.assert_allclose(
    np.sort(np.asarray(features).reshape(-1)),
    np.sort(np.asarray(points).reshape(-1)),
    rtol=1e-6,
  )
  fitted = method.fit({"features": features})
  scores = method.score(state, fitted, {"image": images})
  # Training images are their own nearest entries: distance 0 everywhere.
  np.testing.assert_allclose(scores.maps["anomaly_map"], 0.0, atol=1e-3)
