"""Exports a trained detector as one self-contained inference function.

The library behind `python -m jax_oneclass.export` (see export.py); its
functions are also reached as `jax_oneclass.export.<name>`.

The artefact maps raw uint8 images [N, H, W, C] (any N; H, W, C as the run
trained, see signature.json) to {'score', 'normalized_score',
'is_anomaly'} and, for localising methods, {'anomaly_map',
'normalized_map', 'mask'} [N, H, W]; pixel scaling, the network, the
fitted stage and the thresholds are all inside. Formats:
- jax: `jax.export` serialized StableHLO (model.jax); reload with
  `jax.export.deserialize(open(path, 'rb').read()).call(images)`;
- savedmodel: a TF SavedModel with a 'serving_default' signature (jax2tf);
- onnx: model.onnx (jax2onnx), for onnxruntime.
Images of other sizes: resize them first, or use `jax_oneclass.Detector`.
"""

import contextlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_oneclass import thresholds
from jax_oneclass.cli_checks import EXPORT_FORMATS as FORMATS
from jax_oneclass.errors import ConfigError, OneClassError
from jax_oneclass.methods import interface


class ExportError(OneClassError):
  """A detector cannot be written in the asked format."""


def inference_fn(detector):
  """fn(uint8 images [N, H, W, C]) -> dict of outputs (see module doc),
  with the detector's state, fitted stage and thresholds as constants."""
  method, state = detector.run.method, detector.state
  fitted = jax.device_get(detector.stage.fitted)
  state = jax.device_get(state)
  calib = detector.stage.calibration
  scorer = detector.scorer
  image_stats = calib["image"][scorer]
  map_name = interface.headline_map(scorer, calib["maps"])

  def fn(images):
    scores = method.score(
      state, fitted, {"image": images.astype(jnp.float32) / 255.0}
    )
    score = scores.image[scorer]
    normalized = thresholds.normalize(score, image_stats, xp=jnp)
    out = {
      "score": score,
      "normalized_score": normalized,
      "is_anomaly": score > image_stats["threshold"],
    }
    if map_name is not None:
      anomaly_map = scores.maps[map_name]
      map_stats = calib["maps"][map_name]
      out.update(
        anomaly_map=anomaly_map,
        normalized_map=thresholds.normalize(anomaly_map, map_stats, xp=jnp),
        mask=anomaly_map > map_stats["threshold"],
      )
    return out

  return fn


def _write_jax(fn, shape, output: Path) -> None:
  """model.jax: serialized StableHLO with a symbolic batch size."""
  (batch,) = jax.export.symbolic_shape("n")
  exported = jax.export.export(jax.jit(fn))(
    jax.ShapeDtypeStruct((batch,) + shape, jnp.uint8)
  )
  (output / "model.jax").write_bytes(exported.serialize())


def _write_savedmodel(fn, shape, output: Path) -> None:
  """savedmodel/: jax2tf's conversion behind a serving signature."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  h, w, c = shape
  converted = jax2tf.convert(
    fn, polymorphic_shapes=[f"(n, {h}, {w}, {c})"], with_gradient=False
  )
  module = tf.Module()
  module.serve = tf.function(
    lambda images: converted(images),
    autograph=False,
    input_signature=[tf.TensorSpec((None,) + shape, tf.uint8, name="images")],
  )
  tf.saved_model.save(
    module,
    str(output / "savedmodel"),
    signatures={"serving_default": module.serve},
  )


# flax.linen pooling functions and their parameters after `inputs`.
_POOLING_PARAMS = {
  "max_pool": ("window_shape", "strides", "padding"),
  "min_pool": ("window_shape", "strides", "padding"),
  "avg_pool": ("window_shape", "strides", "padding", "count_include_pad"),
}


@contextlib.contextmanager
def _keyword_pooling():
  """Within the block, flax's pooling functions take their parameters by
  position too: jax2onnx replaces them, while it traces, by functions that
  take only `inputs` positionally, so `nn.max_pool(x, (2, 2), (2, 2))` as
  researchers write it would fail."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  installed = {
    name: getattr(nn, name) for name in _POOLING_PARAMS if hasattr(nn, name)
  }

  def by_keyword(name, pool):
    def call(inputs, *args, **kwargs):
      kwargs.update(zip(_POOLING_PARAMS[name], args))
      return pool(inputs, **kwargs)

    return call

  for name, pool in installed.items():
    setattr(nn, name, by_keyword(name, pool))
  try:
    yield
  finally:
    for name, pool in installed.items():
      setattr(nn, name, pool)


def _unsupported_op(error: NotImplementedError) -> str:
  """The operation jax2onnx could not convert, as its error names it."""
  text = str(error).splitlines()[0] if str(error) else type(error).__name__
  if "for primitive '" in text:
    return text.split("for primitive '", 1)[1].split("'", 1)[0]
  return text


def _live_only(fn):
  """`fn` computing only what its outputs need. A method's `score` computes
  every scorer and the export keeps the headline's: jit drops the rest by
  itself, but jax2onnx converts every equation of the trace (six times the
  graph for the two-stage methods, and its conversion time grows faster
  than the graph). Without JAX's (private) dead-code elimination, `fn`
  itself."""
  try:
    from jax._src.interpreters import partial_eval as pe  # pylint: disable=g-import-not-at-top
  except ImportError:
    return fn
  eval_jaxpr = getattr(jax.core, "eval_jaxpr", None)
  if eval_jaxpr is None or not hasattr(pe, "dce_jaxpr"):
    return fn

  def live(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    jaxpr, used = pe.dce_jaxpr(
      closed.jaxpr, [True] * len(closed.jaxpr.outvars), instantiate=True
    )
    kept = [a for a, u in zip(jax.tree.leaves(args), used) if u]
    outs = eval_jaxpr(jaxpr, closed.consts, *kept)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return live


def _write_onnx(fn, shape, output: Path) -> list[str]:
  """model.onnx; returns the output names in the graph's order."""
  try:
    from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError(
      "ONNX export needs jax2onnx: pip install 'jax_oneclass[onnx]'."
    ) from e
  from jax2onnx.converter import conversion_api  # pylint: disable=g-import-not-at-top

  keys = sorted(
    jax.eval_shape(fn, jax.ShapeDtypeStruct((1,) + shape, jnp.uint8))
  )

  def as_list(images):
    with _keyword_pooling():  # Inside jax2onnx's own patches.
      # One trace: the graph holds the network once.
      out = _live_only(fn)(images)
    return [out[k] for k in keys]

  # jax2onnx 0.17's graph optimiser drops transposes a ResNet's residual
  # adds still need (wrong graphs for reverse distillation and gradient
  # preference) and is quadratic in the graph size; convert without it.
  optimize = conversion_api.optimize_graph
  conversion_api.optimize_graph = lambda model: None
  try:
    model = to_onnx(
      as_list,
      [jax.ShapeDtypeStruct(("N",) + shape, jnp.uint8)],
      model_name="jax_oneclass",
    )
  except NotImplementedError as e:
    raise ExportError(
      f"ONNX export cannot convert an operation of this model "
      f"({_unsupported_op(e)}); export --format=jax or savedmodel "
      "instead, or write that part with operations ONNX has."
    ) from e
  finally:
    conversion_api.optimize_graph = optimize
  _drop_unused_initializers(model.graph)
  (output / "model.onnx").write_bytes(model.SerializeToString())
  return keys


def _graph_inputs(graph) -> set[str]:
  """Every value name a node of `graph` (or of its subgraphs) reads."""
  names = {o.name for o in graph.output}
  for node in graph.node:
    names.update(node.input)
    for attr in node.attribute:
      for sub in [attr.g, *attr.graphs]:
        if sub is not None and sub.node:
          names |= _graph_inputs(sub)
  return names


def _drop_unused_initializers(graph) -> None:
  """Removes initializers no node reads: jax2onnx keeps each convolution's
  HWIO kernel next to the OIHW copy the Conv node uses (about twice the
  file size of a convolutional network)."""
  used = _graph_inputs(graph)
  kept = [init for init in graph.initializer if init.name in used]
  del graph.initializer[:]
  graph.initializer.extend(kept)


def export(detector, fmt: str, output) -> Path:
  """Writes `detector` in format `fmt` to the folder `output`; returns it."""
  if fmt not in FORMATS:
    raise ConfigError(
      f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}."
    )
  output = Path(output)
  output.mkdir(parents=True, exist_ok=True)
  shape = tuple(int(d) for d in detector.image_shape)
  fn = inference_fn(detector)
  writers = {
    "jax": _write_jax,
    "savedmodel": _write_savedmodel,
    "onnx": _write_onnx,
  }
  try:
    output_order = writers[fmt](fn, shape, output)
  except ExportError:
    raise
  except Exception as e:  # The converters raise many types.
    works = [f for f in FORMATS if f != fmt]
    raise ExportError(
      f"{detector.config.method} cannot be exported as {fmt}: "
      f"{type(e).__name__}: {str(e)[:300]}. Formats to try instead: "
      f"{', '.join(works)}."
    ) from e
  outputs = jax.eval_shape(fn, jax.ShapeDtypeStruct((1,) + shape, jnp.uint8))
  signature = {
    "format": fmt,
    "method": detector.config.method,
    "step": detector.step,
    "input": {"name": "images", "dtype": "uint8", "shape": ["N", *shape]},
    "outputs": {
      k: {"dtype": str(v.dtype), "shape": ["N", *v.shape[1:]]}
      for k, v in sorted(outputs.items())
    },
    "scorer": detector.scorer,
    "threshold": detector.stage.calibration["image"][detector.scorer][
      "threshold"
    ],
  }
  if output_order:  # ONNX outputs are positional.
    signature["output_order"] = output_order
  (output / "signature.json").write_text(json.dumps(signature, indent=2) + "\n")
  return output


def load(output):
  """A callable images -> {name: NumPy array} for an exported folder,
  whatever its format."""
  output = Path(output)
  signature = json.loads((output / "signature.json").read_text())
  fmt = signature["format"]
  if fmt == "jax":
    exported = jax.export.deserialize((output / "model.jax").read_bytes())
    return lambda images: jax.tree.map(np.asarray, exported.call(images))
  if fmt == "savedmodel":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    serve = tf.saved_model.load(str(output / "savedmodel")).signatures[
      "serving_default"
    ]
    return lambda images: {
      k: v.numpy() for k, v in serve(images=tf.constant(images)).items()
    }
  import onnxruntime  # pylint: disable=g-import-not-at-top

  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # Errors only: no notes per graph node.
  session = onnxruntime.InferenceSession(str(output / "model.onnx"), options)
  input_name = session.get_inputs()[0].name
  return lambda images: dict(
    zip(
      signature["output_order"],
      session.run(None, {input_name: np.asarray(images, np.uint8)}),
    )
  )
