"""ImageNet weights download: a local HTTP server stands in for torchvision's."""

import hashlib
import http.server
import socket
import threading
import types

from flax import traverse_util
import jax
import numpy as np
import pytest

from jax_oneclass.components import pretrained, weights_cache
from jax_oneclass.errors import CheckpointError, ConfigError
from jax_oneclass.methods.two_stage import family as two_stage
from tests.conftest import load_config


class _Server:
  """Serves `files` on 127.0.0.1 with Range support; the first `truncate`
  responses stop after half their body (the connection then closes)."""

  def __init__(self):
    self.files, self.truncate, self.ranges = {}, 0, []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # pylint: disable=invalid-name
        body = outer.files.get(self.path.rsplit("/", 1)[-1])
        if body is None:
          self.send_error(404)
          return
        start = 0
        header = self.headers.get("Range")
        outer.ranges.append(header)
        if header:
          start = int(header.split("=")[1].rstrip("-"))
          if start >= len(body):
            self.send_error(416)
            return
          self.send_response(206)
          self.send_header(
            "Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}"
          )
        else:
          self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        rest = body[start:]
        if outer.truncate:
          outer.truncate -= 1
          rest = rest[: len(rest) // 2]
          self.close_connection = True
        self.wfile.write(rest)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/models"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


def _state_dict_bytes(tmp_path, with_layer4=False):
  """A resnet18 state dict through layer3, or layer4 (float16, as .npz
  bytes)."""
  rng = np.random.default_rng(0)
  shapes = pretrained._variable_shapes("resnet18", with_layer4)  # pylint: disable=protected-access
  state = {}
  for path, shape in shapes.items():
    if path[-1] == "kernel":
      shape = (shape[3], shape[2], shape[0], shape[1])
    value = (
      rng.uniform(0.5, 1.0, shape)
      if path[-1] == "var"
      else (rng.standard_normal(shape) * 0.05)
    )
    state[pretrained._torch_key(path[1:])] = value.astype(np.float16)  # pylint: disable=protected-access
  np.savez(tmp_path / "state.npz", **state)
  return (tmp_path / "state.npz").read_bytes(), state


@pytest.fixture(params=[False])
def server(request, tmp_path, monkeypatch):
  """The server holding resnet18's file (through layer4 when the fixture is
  parametrised with True), the env pointing at it, a fresh cache, and
  resnet18's published entry replaced by the file's sha256."""
  body, state = _state_dict_bytes(tmp_path, request.param)
  name = weights_cache.WEIGHTS["resnet18"].file_name
  srv = _Server()
  srv.files[name] = body
  srv.state = state
  monkeypatch.setenv(weights_cache.BASE_URL_ENV, srv.url)
  monkeypatch.setenv(weights_cache.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setitem(
    weights_cache.WEIGHTS,
    "resnet18",
    weights_cache.Weights(name, hashlib.sha256(body).hexdigest()),
  )
  yield srv
  srv.close()


def test_published_table_names_carry_their_hash_prefix():
  for arch, weights in weights_cache.WEIGHTS.items():
    assert weights.file_name.startswith(arch + "-")
    prefix = weights.file_name.rsplit("-", 1)[1].split(".")[0]
    assert weights.sha256.startswith(prefix), arch
    assert len(weights.sha256) in (8, 64), arch


def test_download_then_reuse_the_cache(server, tmp_path):
  path = weights_cache.fetch("resnet18")
  assert path == tmp_path / "cache" / "resnet18-f37072fd.pth"
  assert path.read_bytes() == server.files[path.name]
  assert not path.with_name(path.name + ".part").exists()
  server.files.clear()  # A second fetch must not touch the server.
  assert weights_cache.fetch("resnet18") == path
  assert server.ranges == [None]


def test_imagenet_pretrained_loads_the_downloaded_file(server):
  variables = pretrained.load_or_announce_random(
    "imagenet", "resnet18", "Backbone"
  )
  np.testing.assert_array_equal(
    variables["params"]["layer2_0"]["conv1"]["kernel"],
    server.state["layer2.0.conv1.weight"]
    .astype(np.float32)
    .transpose(2, 3, 1, 0),
  )


def test_truncated_download_resumes_with_a_range_request(server, tmp_path):
  server.truncate = 1
  path = weights_cache.fetch("resnet18")
  assert path.read_bytes() == server.files[path.name]
  half = len(server.files[path.name]) // 2
  assert server.ranges == [None, f"bytes={half}-"]


def test_interrupted_run_leaves_a_part_file_the_next_run_resumes(
  server, tmp_path
):
  server.truncate = 3  # Every attempt of the first call breaks off.
  with pytest.raises(CheckpointError, match="resumes"):
    weights_cache.fetch("resnet18")
  part = tmp_path / "cache" / "resnet18-f37072fd.pth.part"
  assert 0 < part.stat().st_size < len(server.files["resnet18-f37072fd.pth"])
  assert not (tmp_path / "cache" / "resnet18-f37072fd.pth").exists()
  path = weights_cache.fetch("resnet18")
  assert path.read_bytes() == server.files[path.name]
  assert server.ranges[-1].startswith("bytes=")


def test_wrong_hash_is_refused_and_deleted(server, tmp_path, monkeypatch):
  name = "resnet18-f37072fd.pth"
  monkeypatch.setitem(
    weights_cache.WEIGHTS, "resnet18", weights_cache.Weights(name, "f37072fd")
  )
  with pytest.raises(CheckpointError, match="sha256 .* expected f37072fd"):
    weights_cache.fetch("resnet18")
  assert not list((tmp_path / "cache").iterdir())


def test_corrupt_cached_file_is_fetched_again(server, tmp_path):
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / "resnet18-f37072fd.pth").write_bytes(b"damaged")
  path = weights_cache.fetch("resnet18")
  assert path.read_bytes() == server.files[path.name]


def test_no_server_names_url_file_and_directory(tmp_path, monkeypatch):
  with socket.socket() as s:  # A port nothing listens on.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setenv(weights_cache.BASE_URL_ENV, f"http://127.0.0.1:{port}/m")
  monkeypatch.setenv(weights_cache.CACHE_ENV, str(tmp_path / "c"))
  with pytest.raises(CheckpointError) as info:
    weights_cache.fetch("wide_resnet50_2")
  message = str(info.value)
  assert f"http://127.0.0.1:{port}/m/wide_resnet50_2-95faca4d.pth" in message
  assert str(tmp_path / "c" / "wide_resnet50_2-95faca4d.pth") in message
  assert "\n" not in message


def test_missing_file_on_the_server_and_unknown_arch(server):
  server.files.clear()
  with pytest.raises(CheckpointError, match="HTTP 404"):
    weights_cache.fetch("resnet18")
  with pytest.raises(CheckpointError, match="resnet101"):
    weights_cache.fetch("resnet101")


def _two_stage(pretrained_value, arch="resnet18"):
  config = load_config("disaug", "digits")
  config.model.arch = arch
  config.model.pretrained = pretrained_value
  info = types.SimpleNamespace(
    image_shape=(16, 16, 1), num_train=64, epoch_size=256
  )
  return two_stage.TwoStageMethod(config, info)


@pytest.mark.parametrize("server", [True], indirect=True)
def test_two_stage_backbone_starts_from_imagenet_weights(server):
  state = _two_stage("imagenet").init_state(jax.random.PRNGKey(0), (16, 16, 1))
  backbone = traverse_util.flatten_dict(state.params["backbone"])
  for path in (
    ("conv1", "kernel"),
    ("layer2_0", "conv1", "kernel"),
    ("layer4_1", "conv2", "kernel"),
  ):
    np.testing.assert_array_equal(
      backbone[path],
      server.state[pretrained._torch_key(path)]
      .astype(np.float32)  # pylint: disable=protected-access
      .transpose(2, 3, 1, 0),
    )
  np.testing.assert_array_equal(
    state.batch_stats["backbone"]["bn1"]["var"],
    server.state["bn1.running_var"].astype(np.float32),
  )
  # Another seed changes the heads only: they start random.
  other = _two_stage("imagenet").init_state(jax.random.PRNGKey(1), (16, 16, 1))
  np.testing.assert_array_equal(
    other.params["backbone"]["conv1"]["kernel"], backbone[("conv1", "kernel")]
  )
  assert not np.array_equal(
    other.params["head"]["dense1"]["kernel"],
    state.params["head"]["dense1"]["kernel"],
  )


def test_two_stage_pretrained_needs_a_torchvision_arch(tmp_path):
  with pytest.raises(ConfigError, match="model.arch=resnet18"):
    _two_stage("imagenet", arch="cifar")
  with pytest.raises(ConfigError, match="is a directory"):
    _two_stage(str(tmp_path))
