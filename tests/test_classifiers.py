"""Tests for jax_oneclass.components.oneclass against NumPy / scikit-learn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from scipy.special import logsumexp
from sklearn.covariance import LedoitWolf
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import KernelDensity
from sklearn.svm import OneClassSVM

from jax_oneclass.components import oneclass as clf_lib
from jax_oneclass.errors import ConfigError, DataError
from jax_oneclass.metrics import auroc


def _data(n=50, m=20, d=8, seed=0):
  rng = np.random.default_rng(seed)
  train = rng.normal(size=(n, d)).astype(np.float32)
  test = rng.normal(size=(m, d)).astype(np.float32)
  return train, test


def _np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_l2_normalize_unit_norm_and_zero_row():
  x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  y = clf_lib.l2_normalize(x)
  np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)


def test_reference_gamma_rule():
  train, _ = _data()
  bank = _np_normalize(train)
  expected = 10.0 / (bank.var() * bank.shape[1])
  params = clf_lib.kde_fit(train)
  np.testing.assert_allclose(params["gamma"], expected, rtol=1e-5)


def test_kde_matches_numpy_loop():
  train, test = _data()
  params = clf_lib.kde_fit(train)
  gamma = float(params["gamma"])
  bank, queries = _np_normalize(train), _np_normalize(test)
  expected = []
  for q in queries:
    d2 = np.sum((bank - q) ** 2, axis=1)
    expected.append(-(logsumexp(-gamma * d2) - np.log(len(bank))))
  got = clf_lib.kde_score(params, test)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_kde_matches_sklearn_kernel_density():
  train, test = _data()
  params = clf_lib.kde_fit(train, gamma=2.0)
  # exp(-gamma d^2) is a Gaussian with 2 sigma^2 = 1 / gamma; sklearn's
  # log-density adds the normalising constant -D/2 log(2 pi sigma^2).
  sigma = np.sqrt(1.0 / (2 * 2.0))
  kde = KernelDensity(kernel="gaussian", bandwidth=sigma)
  kde.fit(_np_normalize(train))
  log_dens = kde.score_samples(_np_normalize(test))
  const = -0.5 * train.shape[1] * np.log(2 * np.pi * sigma**2)
  got = clf_lib.kde_score(params, test)
  np.testing.assert_allclose(got, -(log_dens - const), rtol=1e-4, atol=1e-4)


def test_gde_matches_sklearn_gaussian_mixture():
  train, test = _data(n=200)
  params = clf_lib.gde_fit(train)
  gmm = GaussianMixture(
    n_components=1, covariance_type="full", init_params="kmeans", random_state=0
  )
  gmm.fit(_np_normalize(train))
  expected = -gmm.score_samples(_np_normalize(test))
  got = clf_lib.gde_score(params, test)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_gde_mahalanobis_matches_scipy():
  train, test = _data(n=200)
  params = clf_lib.gde_fit(train, reg_covar=1e-3, normalize=False)
  x = train.astype(np.float64)
  cov = np.cov(x, rowvar=False, bias=True) + 1e-3 * np.eye(x.shape[1])
  inv = np.linalg.inv(cov)
  np.testing.assert_allclose(params["precision"], inv, rtol=1e-4, atol=1e-4)
  expected = [mahalanobis(t, x.mean(0), inv) ** 2 for t in test]
  got = clf_lib.mahalanobis_sq(params, test)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_gde_ledoit_wolf_matches_sklearn_with_fewer_rows_than_dims():
  # 20 images, 32 dimensions: the MLE covariance is singular here.
  train, test = _data(n=20, d=32)
  params = clf_lib.gde_fit(train, shrinkage="ledoit_wolf", reg_covar=0.0)
  lw = LedoitWolf().fit(_np_normalize(train))
  np.testing.assert_allclose(
    clf_lib.mahalanobis_sq(params, test),
    lw.mahalanobis(_np_normalize(test)),
    rtol=1e-3,
    atol=1e-3,
  )


def test_gde_fixed_shrinkage_interpolates_to_scaled_identity():
  train, test = _data(n=100)
  plain = clf_lib.gde_fit(train, normalize=False, reg_covar=0.0)
  unshrunk = clf_lib.gde_fit(
    train, normalize=False, reg_covar=0.0, shrinkage=0.0
  )
  np.testing.assert_allclose(unshrunk["precision"], plain["precision"])
  spherical = clf_lib.gde_fit(
    train, normalize=False, reg_covar=0.0, shrinkage=1.0
  )
  x = train.astype(np.float64)
  variance = np.trace(np.cov(x, rowvar=False, bias=True)) / x.shape[1]
  expected = np.sum((test - x.mean(0)) ** 2, axis=1) / variance
  np.testing.assert_allclose(
    clf_lib.mahalanobis_sq(spherical, test), expected, rtol=1e-4
  )


@pytest.mark.parametrize("shrinkage", ["oas", -0.1, 1.5])
def test_gde_bad_shrinkage(shrinkage):
  train, _ = _data()
  with pytest.raises(ConfigError, match="shrinkage"):
    clf_lib.gde_fit(train, shrinkage=shrinkage)


def test_named_variants_fit_and_score_as_their_classifier():
  train, test = _data(n=20, d=32)
  hparams = clf_lib.checked_hparams(
    {"gde": {}, "gde_lw": {"classifier": "gde", "shrinkage": "ledoit_wolf"}}
  )
  scores = clf_lib.score_each(clf_lib.fit_each(train, hparams), test, hparams)
  expected = clf_lib.gde_score(
    clf_lib.gde_fit(train, shrinkage="ledoit_wolf"), test
  )
  np.testing.assert_allclose(scores["gde_lw"], expected, rtol=1e-6)
  assert not np.allclose(scores["gde"], scores["gde_lw"])


def test_named_variant_of_unknown_classifier_raises():
  with pytest.raises(ConfigError, match="no_such_classifier"):
    clf_lib.checked_hparams({"mine": {"classifier": "no_such_classifier"}})


@pytest.mark.parametrize(
  "hparams",
  [
    {},
    {"nu": 0.1, "gamma": 0.7},
    {"kernel": "linear"},
  ],
)
def test_ocsvm_matches_sklearn_decision_function(hparams):
  train, test = _data()
  params = clf_lib.ocsvm_fit(train, **hparams)
  kernel = hparams.get("kernel", "rbf")
  x_tr, x_te = train.astype(np.float64), test.astype(np.float64)
  if kernel == "rbf":
    x_tr, x_te = _np_normalize(train), _np_normalize(test)
    gamma = hparams.get("gamma", 10.0 / (x_tr.var() * x_tr.shape[1]))
    svm = OneClassSVM(kernel="rbf", nu=hparams.get("nu", 0.5), gamma=gamma)
  else:
    svm = OneClassSVM(kernel="linear", nu=0.5)
  svm.fit(x_tr)
  expected = -svm.decision_function(x_te)
  got = clf_lib.ocsvm_score(params, test)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_nn_is_one_minus_the_largest_cosine_similarity():
  train, test = _data()
  cos = _np_normalize(test) @ _np_normalize(train).T
  got = clf_lib.nn_score(clf_lib.nn_fit(train), test)
  np.testing.assert_allclose(got, 1.0 - cos.max(axis=1), rtol=1e-5, atol=1e-6)


def test_nn_raw_is_half_the_squared_nearest_distance():
  train, test = _data()
  d2 = ((test[:, None, :].astype(np.float64) - train[None]) ** 2).sum(-1)
  got = clf_lib.nn_score(clf_lib.nn_fit(train, normalize=False), test)
  np.testing.assert_allclose(got, 0.5 * d2.min(axis=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["kde", "ocsvm", "nn"])
def test_chunking_matches_unchunked(name):
  train, test = _data(n=53)
  clf = clf_lib.get_classifier(name)
  params = clf.fit(train)
  n_bank = len(params.get("bank", params.get("support_vectors")))
  assert n_bank % 7 != 0
  full = clf.score(params, test, chunk_size=10_000)
  for chunk in (1, 7, n_bank):
    np.testing.assert_allclose(
      clf.score(params, test, chunk_size=chunk), full, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("name", sorted(clf_lib.CLASSIFIERS))
def test_score_jits_and_params_are_arrays(name):
  train, test = _data()
  clf = clf_lib.get_classifier(name)
  params = clf.fit(train)
  assert all(isinstance(v, np.ndarray) for v in params.values())
  jitted = jax.jit(clf.score, static_argnames="chunk_size")
  got = jitted(
    jax.tree.map(jnp.asarray, params), jnp.asarray(test), chunk_size=16
  )
  assert got.shape == (test.shape[0],)
  np.testing.assert_allclose(got, clf.score(params, test), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(clf_lib.CLASSIFIERS))
def test_separable_data_gives_high_auroc(name):
  rng = np.random.default_rng(1)
  d = 16
  centre = np.zeros(d)
  centre[0] = 1.0
  normal = centre + 0.1 * rng.normal(size=(200, d))
  train, test_normal = normal[:150], normal[150:]
  test_anom = -centre + 0.1 * rng.normal(size=(50, d))
  test = np.concatenate([test_normal, test_anom]).astype(np.float32)
  labels = np.r_[np.zeros(50), np.ones(50)]
  clf = clf_lib.get_classifier(name)
  scores = clf.score(clf.fit(train.astype(np.float32)), test)
  assert auroc(scores, labels) > 0.99


def test_get_classifier_unknown_lists_names():
  with pytest.raises(ConfigError, match="gde.*kde.*ocsvm"):
    clf_lib.get_classifier("no_such_classifier")


@pytest.mark.parametrize("name", sorted(clf_lib.CLASSIFIERS))
def test_unknown_hparam_raises(name):
  train, _ = _data()
  with pytest.raises(ConfigError, match="bandwith"):
    clf_lib.get_classifier(name).fit(train, bandwith=1.0)


@pytest.mark.parametrize(
  "hparams", [{"kernel": "poly"}, {"nu": 0.0}, {"nu": 1.5}, {"gamma": -1.0}]
)
def test_ocsvm_bad_hparams(hparams):
  train, _ = _data()
  with pytest.raises(ConfigError):
    clf_lib.ocsvm_fit(train, **hparams)


@pytest.mark.parametrize("name", sorted(clf_lib.CLASSIFIERS))
@pytest.mark.parametrize(
  "features, match",
  [
    (np.zeros((0, 4), np.float32), "empty"),
    (np.array([[1.0, np.nan], [0.0, 1.0]], np.float32), "NaN"),
    (np.ones((4,), np.float32), "2-D"),
  ],
)
def test_fit_rejects_bad_features(name, features, match):
  with pytest.raises(DataError, match=match):
    clf_lib.get_classifier(name).fit(features)


def test_score_rejects_wrong_dim():
  train, _ = _data(d=8)
  params = clf_lib.kde_fit(train)
  with pytest.raises(DataError, match="shape"):
    clf_lib.kde_score(params, np.zeros((3, 5), np.float32))
