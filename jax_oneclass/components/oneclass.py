"""Shallow one-class classifiers fitted on frozen self-supervised features.

This is the second stage of Sohn et al. 2021, "Learning and Evaluating
Representations for Deep One-class Classification" (reference code:
google-research/deep_representation_one_class, `util/train.py`,
`BaseTrain.eval_embed`). Features of the normal training images are the
"bank"; each test feature gets a score where higher means more anomalous.

Every classifier is a pair of pure functions:

* `fit(train_features [N, D], **hparams) -> params` runs on the host (NumPy,
  scikit-learn for the OC-SVM solver) and returns a flat dict of NumPy arrays,
  so that params can be saved with Orbax.
* `score(params, features [M, D], chunk_size=...) -> [M]` is jitted jnp code.
  Kernel sums are computed over chunks of `chunk_size` bank rows, so the
  largest intermediate is [M, chunk_size] rather than [M, N].

Code outside the package adds classifiers with `register_classifier`.

A config names each classifier it wants: `{'gde': {}, 'gde_lw': {'classifier':
'gde', 'shrinkage': 'ledoit_wolf'}}` fits both variants, scored as 'gde' and
'gde_lw'; without a 'classifier' key the name is the classifier.

Defaults follow the reference (see each `*_DEFAULTS` dict):

* Features are L2-normalised (`tf.nn.l2_normalize` semantics) for KDE, GDE and
  the RBF OC-SVM; the linear OC-SVM uses raw features.
* RBF gamma = 10 / (var(normalised train features) * D), where var is over all
  entries of the [N, D] matrix (population variance).
* GDE = sklearn `GaussianMixture(n_components=1, covariance_type='full')`,
  i.e. the MLE mean/covariance plus sklearn's default `reg_covar=1e-6` ridge.
  With `shrinkage='ledoit_wolf'` the covariance is shrunk towards a scaled
  identity by the Ledoit-Wolf rule instead (as in Rippel et al. 2020,
  "Modeling the Distribution of Normal Data in Pre-Trained Deep Features for
  Anomaly Detection"); it matters when the bank has about as many or fewer
  rows than dimensions, where the MLE covariance is (near) singular.
* OC-SVM = sklearn `OneClassSVM` with its default `nu=0.5`; `kernel='linear'`
  is the reference's linear OC-SVM (`*.locsvm`, raw features).
* NN = the reference's `*.auc` score: 1 - the largest cosine similarity to a
  bank feature (the 1-nearest-neighbour cosine distance).
"""

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from sklearn.covariance import ledoit_wolf
from sklearn.svm import OneClassSVM

from jax_oneclass.errors import ConfigError, DataError

Params = dict[str, np.ndarray]

DEFAULT_CHUNK_SIZE = 1024
# Matches tf.nn.l2_normalize, which the reference uses: eps bounds the squared
# norm from below.
_L2_EPS = 1e-12

KDE_DEFAULTS: Mapping[str, Any] = {
  # None -> 10 / (var * D), as for the reference's `*.kde` metric.
  "gamma": None,
  "normalize": True,
}
GDE_DEFAULTS: Mapping[str, Any] = {
  # sklearn GaussianMixture's default, which the reference leaves unset.
  "reg_covar": 1e-6,
  # None: the MLE covariance (reference). 'ledoit_wolf': Ledoit-Wolf
  # shrinkage towards trace(C)/D * I. A number s in [0, 1]: that fixed
  # shrinkage, (1 - s) C + s trace(C)/D I.
  "shrinkage": None,
  "normalize": True,
}
OCSVM_DEFAULTS: Mapping[str, Any] = {
  "kernel": "rbf",
  # sklearn OneClassSVM's default, which the reference leaves unset.
  "nu": 0.5,
  # None -> 10 / (var * D) for 'rbf' (reference `*.kocsvm`); unused for
  # 'linear'.
  "gamma": None,
  # None -> True for 'rbf', False for 'linear' (reference `*.locsvm` fits on
  # raw features).
  "normalize": None,
  "tol": 1e-3,
}
NN_DEFAULTS: Mapping[str, Any] = {
  # True: cosine distance, as in the reference. False: half the squared
  # Euclidean distance to the nearest raw feature.
  "normalize": True,
}


class Classifier(NamedTuple):
  """A one-class classifier as a pair of pure functions."""

  fit: Callable[..., Params]
  score: Callable[..., jax.Array]


def l2_normalize(
  x: jax.Array, axis: int = -1, eps: float = _L2_EPS
) -> jax.Array:
  """Scales `x` to unit L2 norm along `axis` (any shape, e.g. [N, D]).

  Same as `tf.nn.l2_normalize`: x * rsqrt(max(sum(x**2), eps)), so all-zero
  rows stay zero instead of becoming NaN.
  """
  x = jnp.asarray(x)
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * lax.rsqrt(jnp.maximum(sq, eps))


def reference_gamma(features: np.ndarray) -> float:
  """RBF gamma of the reference: 10 / (var(features) * D) for [N, D] input.

  The variance is the population variance over all N * D entries. Call it on
  the features the kernel sees (normalised ones in the reference).
  """
  var = float(np.var(np.asarray(features, np.float64)))
  if not var > 0:
    raise DataError(
      "Cannot derive the RBF gamma: the train features have zero variance "
      "(all identical). Pass gamma explicitly."
    )
  return 10.0 / (var * features.shape[1])


def _resolve_hparams(
  name: str, defaults: Mapping[str, Any], hparams: Mapping[str, Any]
) -> dict[str, Any]:
  unknown = sorted(set(hparams) - set(defaults))
  if unknown:
    raise ConfigError(
      f"Unknown hyper-parameter(s) {unknown} for classifier {name!r}; "
      f"valid ones are {sorted(defaults)}."
    )
  return {**defaults, **hparams}


def _check_train_features(features: Any) -> np.ndarray:
  """Returns the features as float32 [N, D] or raises DataError."""
  x = np.asarray(features)
  if x.ndim != 2:
    raise DataError(
      f"Train features must be a 2-D [N, D] array, got shape {x.shape}."
    )
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise DataError(
      f"Train features are empty (shape {x.shape}); a one-class classifier "
      "needs at least one feature vector of non-zero dimension."
    )
  if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
    raise DataError(f"Train features must be real numbers, got {x.dtype}.")
  bad = ~np.isfinite(x)
  if bad.any():
    rows = np.flatnonzero(bad.any(axis=1))
    raise DataError(
      f"Train features contain NaN or inf in {rows.size} of {x.shape[0]} "
      f"rows (first: {rows[:5].tolist()}); check the feature extractor."
    )
  return x.astype(np.float32)


def _check_positive(name: str, key: str, value: Any) -> float:
  try:
    value = float(value)
  except (TypeError, ValueError) as e:
    raise ConfigError(
      f"{name}: {key} must be a positive number, got {value!r}."
    ) from e
  if not (math.isfinite(value) and value > 0):
    raise ConfigError(
      f"{name}: {key} must be a positive number, got {value!r}."
    )
  return value


# Fitting normalises host features outside any jit: one compiled program per
# feature shape rather than one per operation and shape.
_l2_normalize_jitted = jax.jit(l2_normalize)


def _maybe_normalize(x: np.ndarray, normalize: bool) -> np.ndarray:
  return np.asarray(_l2_normalize_jitted(x)) if normalize else x


def _score_input(
  params: Params, features: jax.Array, bank_key: str
) -> jax.Array:
  """Checks [M, D] against the params and applies the stored normalisation."""
  x = jnp.asarray(features, jnp.float32)
  dim = params[bank_key].shape[-1]
  if x.ndim != 2 or x.shape[1] != dim:
    raise DataError(
      f"Features to score must have shape [M, {dim}], got {x.shape}."
    )
  # `normalize` is an array so that params stay checkpointable; it is traced
  # under jit, hence `where` rather than a Python branch.
  return jnp.where(params["normalize"], l2_normalize(x), x)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  # HIGHEST keeps float32 accuracy on GPUs/TPUs, which would otherwise use
  # TF32/bf16 passes; ||x - b||^2 via dots cancels badly without it.
  return jnp.dot(a, b.T, precision=lax.Precision.HIGHEST)


def _sq_dists(x: jax.Array, bank: jax.Array) -> jax.Array:
  """Squared Euclidean distances [M, C] between x [M, D] and bank [C, D]."""
  d2 = (
    jnp.sum(x * x, axis=1)[:, None]
    + jnp.sum(bank * bank, axis=1)[None, :]
    - 2.0 * _dot(x, bank)
  )
  return jnp.maximum(d2, 0.0)


def _map_bank_chunks(
  fn: Callable[[jax.Array, jax.Array], jax.Array],
  bank: jax.Array,
  weights: jax.Array,
  pad_weight: float,
  chunk_size: int,
) -> jax.Array:
  """Applies fn(bank_chunk [C, D], weight_chunk [C]) -> [M] over the bank.

  The bank is zero-padded to a multiple of the chunk size; padded rows get
  `pad_weight`, which must make them contribute nothing. Returns
  [num_chunks, M] for the caller to reduce.
  """
  if chunk_size < 1:
    raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}.")
  n, d = bank.shape
  size = min(chunk_size, n)
  num_chunks = -(-n // size)
  pad = num_chunks * size - n
  bank = jnp.pad(bank, ((0, pad), (0, 0))).reshape(num_chunks, size, d)
  weights = jnp.pad(weights, (0, pad), constant_values=pad_weight)
  weights = weights.reshape(num_chunks, size)
  return lax.map(lambda args: fn(*args), (bank, weights))


# ----------------------------------------------------------------------------
# KDE


def kde_fit(features: np.ndarray, **hparams: Any) -> Params:
  """Fits a Gaussian KDE: stores the (normalised) bank [N, D] and gamma.

  Hyper-parameters (see KDE_DEFAULTS): gamma (None -> reference rule
  10 / (var * D) on the normalised bank), normalize (L2-normalise, default
  True as in the reference).
  """
  hp = _resolve_hparams("kde", KDE_DEFAULTS, hparams)
  bank = _maybe_normalize(
    _check_train_features(features), bool(hp["normalize"])
  )
  gamma = (
    reference_gamma(bank)
    if hp["gamma"] is None
    else _check_positive("kde", "gamma", hp["gamma"])
  )
  return {
    "bank": bank,
    "gamma": np.asarray(gamma, np.float32),
    "normalize": np.asarray(bool(hp["normalize"])),
  }


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def kde_score(
  params: Params, features: jax.Array, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> jax.Array:
  """KDE anomaly score [M] for features [M, D].

  score = -log mean_i exp(-gamma * ||x - b_i||^2). The reference uses
  -(1/gamma) * logsumexp(2 * gamma * <x, b_i>), which ranks identically on
  normalised features.
  """
  x = _score_input(params, features, "bank")
  gamma = params["gamma"]
  bank = jnp.asarray(params["bank"], jnp.float32)
  n = bank.shape[0]

  def chunk_lse(b, log_w):
    return jax.nn.logsumexp(-gamma * _sq_dists(x, b) + log_w[None, :], axis=1)

  per_chunk = _map_bank_chunks(
    chunk_lse, bank, jnp.zeros((n,), jnp.float32), -jnp.inf, chunk_size
  )
  return math.log(n) - jax.nn.logsumexp(per_chunk, axis=0)


# ----------------------------------------------------------------------------
# GDE


def gde_fit(features: np.ndarray, **hparams: Any) -> Params:
  """Fits one full-covariance Gaussian to features [N, D].

  Equivalent to the reference's sklearn GaussianMixture(n_components=1,
  covariance_type='full'): MLE mean, MLE (1/N) covariance plus reg_covar * I.
  Hyper-parameters (see GDE_DEFAULTS): reg_covar (default 1e-6, sklearn's),
  shrinkage (None, 'ledoit_wolf' or a number in [0, 1]), normalize (default
  True, as in the reference).

  Returns mean [D], precision [D, D] (inverse covariance), precision_cholesky
  [D, D] (P = L L^T, used for a stable Mahalanobis distance) and log_det_cov.
  """
  hp = _resolve_hparams("gde", GDE_DEFAULTS, hparams)
  x = _maybe_normalize(_check_train_features(features), bool(hp["normalize"]))
  reg = float(hp["reg_covar"])
  if not (math.isfinite(reg) and reg >= 0):
    raise ConfigError(f"gde: reg_covar must be >= 0, got {hp['reg_covar']!r}.")
  x = x.astype(np.float64)
  mean = x.mean(axis=0)
  centred = x - mean
  cov = _covariance(centred, hp["shrinkage"]) + reg * np.eye(x.shape[1])
  try:
    cov_chol = np.linalg.cholesky(cov)
  except np.linalg.LinAlgError as e:
    raise DataError(
      "gde: the feature covariance is singular; increase reg_covar."
    ) from e
  # P = C^-1 = (K K^T)^-1 = K^-T K^-1, so L = K^-T is a Cholesky factor of P.
  prec_chol = np.linalg.solve(cov_chol, np.eye(x.shape[1])).T
  return {
    "mean": mean.astype(np.float32),
    "precision": (prec_chol @ prec_chol.T).astype(np.float32),
    "precision_cholesky": prec_chol.astype(np.float32),
    "log_det_cov": np.asarray(
      2.0 * np.log(np.diag(cov_chol)).sum(), np.float32
    ),
    "normalize": np.asarray(bool(hp["normalize"])),
  }


def _covariance(centred: np.ndarray, shrinkage: Any) -> np.ndarray:
  """(1 - s) C + s * trace(C)/D * I, C the MLE covariance of centred [N, D]."""
  if shrinkage == "ledoit_wolf":
    return ledoit_wolf(centred, assume_centered=True)[0]
  cov = centred.T @ centred / centred.shape[0]
  if shrinkage is None:
    return cov
  try:
    s = float(shrinkage)
  except (TypeError, ValueError):
    s = math.nan
  if not 0.0 <= s <= 1.0:
    raise ConfigError(
      "gde: shrinkage must be None, 'ledoit_wolf' or a number in [0, 1], "
      f"got {shrinkage!r}."
    )
  target = np.trace(cov) / cov.shape[0]
  return (1.0 - s) * cov + s * target * np.eye(cov.shape[0])


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def gde_score(
  params: Params, features: jax.Array, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> jax.Array:
  """Gaussian negative log-likelihood [M] for features [M, D].

  Equals -GaussianMixture.score_samples (as in the reference); it ranks like
  the squared Mahalanobis distance. chunk_size is accepted for a uniform
  signature and unused (no bank-sized intermediate).
  """
  del chunk_size
  dim = params["mean"].shape[-1]
  return 0.5 * (
    mahalanobis_sq(params, features)
    + dim * math.log(2 * math.pi)
    + params["log_det_cov"]
  )


def mahalanobis_sq(params: Params, features: jax.Array) -> jax.Array:
  """Squared Mahalanobis distance [M] of features [M, D] under GDE params."""
  x = _score_input(params, features, "mean")
  z = _dot(x - params["mean"], params["precision_cholesky"].T)
  return jnp.sum(z * z, axis=1)


# ----------------------------------------------------------------------------
# OC-SVM


def ocsvm_fit(features: np.ndarray, **hparams: Any) -> Params:
  """Fits sklearn's OneClassSVM on features [N, D] and exports its arrays.

  Hyper-parameters (see OCSVM_DEFAULTS): kernel ('rbf' or 'linear'), nu
  (default 0.5, sklearn's, as in the reference), gamma (rbf only; None ->
  reference rule 10 / (var * D)), normalize (None -> True for rbf, False for
  linear, as in the reference), tol (libsvm stopping tolerance).

  Returns support_vectors [S, D], dual_coef [S], intercept, gamma, linear
  (bool) and normalize (bool).
  """
  hp = _resolve_hparams("ocsvm", OCSVM_DEFAULTS, hparams)
  kernel = hp["kernel"]
  if kernel not in ("rbf", "linear"):
    raise ConfigError(
      f"ocsvm: kernel must be 'rbf' or 'linear', got {kernel!r}."
    )
  nu = _check_positive("ocsvm", "nu", hp["nu"])
  if nu > 1:
    raise ConfigError(f"ocsvm: nu must be in (0, 1], got {nu}.")
  tol = _check_positive("ocsvm", "tol", hp["tol"])
  normalize = (
    (kernel == "rbf") if hp["normalize"] is None else bool(hp["normalize"])
  )
  x = _maybe_normalize(_check_train_features(features), normalize)
  if kernel == "rbf":
    gamma = (
      reference_gamma(x)
      if hp["gamma"] is None
      else _check_positive("ocsvm", "gamma", hp["gamma"])
    )
    svm = OneClassSVM(kernel="rbf", nu=nu, gamma=gamma, tol=tol)
  else:
    gamma = 0.0
    svm = OneClassSVM(kernel="linear", nu=nu, tol=tol)
  svm.fit(x.astype(np.float64))
  return {
    "support_vectors": svm.support_vectors_.astype(np.float32),
    "dual_coef": svm.dual_coef_.ravel().astype(np.float32),
    "intercept": np.asarray(svm.intercept_[0], np.float32),
    "gamma": np.asarray(gamma, np.float32),
    "linear": np.asarray(kernel == "linear"),
    "normalize": np.asarray(normalize),
  }


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def ocsvm_score(
  params: Params, features: jax.Array, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> jax.Array:
  """Negated OneClassSVM.decision_function [M] for features [M, D].

  score = -(sum_j dual_coef_j * k(x, sv_j) + intercept). The reference uses
  -score_samples, which differs by a constant (same ranking).
  """
  x = _score_input(params, features, "support_vectors")
  gamma = params["gamma"]
  linear = params["linear"]

  def chunk_sum(sv, coef):
    dots = _dot(x, sv)
    d2 = jnp.maximum(
      jnp.sum(x * x, axis=1)[:, None]
      + jnp.sum(sv * sv, axis=1)[None, :]
      - 2.0 * dots,
      0.0,
    )
    k = jnp.where(linear, dots, jnp.exp(-gamma * d2))
    return jnp.sum(k * coef[None, :], axis=1)

  per_chunk = _map_bank_chunks(
    chunk_sum,
    jnp.asarray(params["support_vectors"], jnp.float32),
    jnp.asarray(params["dual_coef"], jnp.float32),
    0.0,
    chunk_size,
  )
  return -(jnp.sum(per_chunk, axis=0) + params["intercept"])


# ----------------------------------------------------------------------------
# 1-nearest neighbour


def nn_fit(features: np.ndarray, **hparams: Any) -> Params:
  """Stores the (L2-normalised) bank [N, D] for nearest-neighbour scoring.

  Hyper-parameters (see NN_DEFAULTS): normalize (default True: cosine, as
  the reference's 1-NN score).
  """
  hp = _resolve_hparams("nn", NN_DEFAULTS, hparams)
  bank = _maybe_normalize(
    _check_train_features(features), bool(hp["normalize"])
  )
  return {"bank": bank, "normalize": np.asarray(bool(hp["normalize"]))}


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def nn_score(
  params: Params, features: jax.Array, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> jax.Array:
  """min_i ||x - b_i||^2 / 2 [M] for features [M, D].

  On normalised features this is 1 - max_i cos(x, b_i), the reference's
  `1 - top_k(similarity, 1)`.
  """
  x = _score_input(params, features, "bank")
  bank = jnp.asarray(params["bank"], jnp.float32)

  def chunk_min(b, pad):
    return jnp.min(0.5 * _sq_dists(x, b) + pad[None, :], axis=1)

  per_chunk = _map_bank_chunks(
    chunk_min,
    bank,
    jnp.zeros((bank.shape[0],), jnp.float32),
    jnp.inf,
    chunk_size,
  )
  return jnp.min(per_chunk, axis=0)


# ----------------------------------------------------------------------------
# Registry

CLASSIFIERS: dict[str, Classifier] = {
  "kde": Classifier(fit=kde_fit, score=kde_score),
  "gde": Classifier(fit=gde_fit, score=gde_score),
  "ocsvm": Classifier(fit=ocsvm_fit, score=ocsvm_score),
  "nn": Classifier(fit=nn_fit, score=nn_score),
}


def register_classifier(
  name: str,
  fit: Callable[..., Params],
  score: Callable[..., jax.Array],
  replace: bool = False,
) -> None:
  """Registers a one-class classifier for configs to name.

  `fit(features [N, D], **hparams) -> params` runs on the host and returns a
  flat dict of NumPy arrays (saved with the run); `score(params, features
  [M, D]) -> [M]` (higher: more anomalous) must be pure jnp code, as it is
  traced inside the method's jitted `score`. Registering a taken name is an
  error unless `replace`. Call it from a module listed in `config.plugins`,
  so that every process reading the run registers it (docs/extending.md).
  """
  if not isinstance(name, str) or not name:
    raise ConfigError(
      f"A classifier name must be a non-empty string, got {name!r}."
    )
  if not callable(fit) or not callable(score):
    raise ConfigError(f"Classifier {name!r}: fit and score must be functions.")
  if name in CLASSIFIERS and not replace:
    raise ConfigError(
      f"One-class classifier {name!r} is already registered; pass "
      "replace=True to replace it."
    )
  CLASSIFIERS[name] = Classifier(fit=fit, score=score)


def get_classifier(name: str) -> Classifier:
  """Returns the registered classifier `name` or raises ConfigError."""
  try:
    return CLASSIFIERS[name]
  except KeyError:
    raise ConfigError(
      f"Unknown one-class classifier {name!r}; valid names are "
      f"{sorted(CLASSIFIERS)}. A classifier of your own is registered "
      "with oneclass.register_classifier in a module listed in "
      "config.plugins (docs/extending.md)."
    ) from None


def checked_hparams(
  config_classifiers: Mapping[str, Mapping[str, Any]],
) -> dict[str, dict[str, Any]]:
  """{name: hparams} from a config, failing early on an unknown classifier.

  Each entry's 'classifier' key (default: its name) picks the classifier, so
  one config can hold several variants of it under different names.
  """
  checked = {}
  for name, hparams in config_classifiers.items():
    hparams = dict(hparams)
    get_classifier(hparams.setdefault("classifier", name))
    checked[name] = hparams
  return checked


def _split_kind(
  name: str, hparams: Mapping[str, Any]
) -> tuple[Classifier, dict[str, Any]]:
  hparams = dict(hparams)
  return get_classifier(hparams.pop("classifier", name)), hparams


def fit_each(
  features: np.ndarray, hparams_by_name: Mapping[str, Mapping[str, Any]]
) -> dict[str, Params]:
  """Fits every named classifier on the same features: {name: params}."""
  features = np.asarray(features)
  fitted = {}
  for name, hparams in hparams_by_name.items():
    classifier, hparams = _split_kind(name, hparams)
    fitted[name] = classifier.fit(features, **hparams)
  return fitted


def score_each(
  fitted: Mapping[str, Params],
  features: jax.Array,
  hparams_by_name: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, jax.Array]:
  """Scores features with every classifier `fit_each` fitted: {name: [M]}.

  Pass the same `hparams_by_name` as to `fit_each` when it names variants.
  """
  hparams_by_name = hparams_by_name or {}
  return {
    name: _split_kind(name, hparams_by_name.get(name, {}))[0].score(
      params, features
    )
    for name, params in fitted.items()
  }
