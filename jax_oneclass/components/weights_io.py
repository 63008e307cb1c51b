"""Reads torchvision state-dict files into {key: NumPy array}, without torch.

Formats (read from the file's content; the suffix is ignored):

- `.pth` / `.pt` written by `torch.save(model.state_dict(), path)`, in the
  zip format (torch >= 1.6) or the older single-stream format (torch < 1.6,
  as in older download files). Only tensors, storages and ordered dicts are
  unpickled; any other object raises instead of running code.
- `.safetensors` (e.g. timm's `wide_resnet50_2.tv_in1k`).
- `.npz` with one array per state-dict key (see `_NPZ_HINT` to make one).
"""

import collections
import functools
import io
import json
import os
import pickle
import struct
import tarfile
import zipfile

import ml_dtypes
import numpy as np

from jax_oneclass.errors import CheckpointError

_NPZ_HINT = (
  'Convert it where torch is installed with: python -c "import sys, numpy '
  "as np, torch; np.savez(sys.argv[2], **{k: v.float().numpy() for k, v in "
  "torch.load(sys.argv[1], map_location='cpu').items()})\" in.pth out.npz"
)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{key: array} from a torch .pth/.pt, .safetensors or .npz file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"No weights file at {path!r}.")
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if any(n.endswith("data.pkl") for n in names):
          state = _read_torch_zip(archive)
        else:
          with np.load(path, allow_pickle=False) as npz:
            state = {k: npz[k] for k in npz.files}
    else:
      with open(path, "rb") as f:
        head = f.read(9)
      if head[8:9] == b"{":
        state = _read_safetensors(path)
      elif head[:1] == b"\x80":
        state = _read_torch_legacy(path)
      elif tarfile.is_tarfile(path):
        raise CheckpointError("tar checkpoints (torch < 0.4) are not read.")
      else:
        raise CheckpointError("unknown file format.")
  except CheckpointError as e:
    raise CheckpointError(f"Cannot read {path!r}: {e} {_NPZ_HINT}") from e
  except (
    OSError,
    ValueError,
    KeyError,
    EOFError,
    pickle.UnpicklingError,
    struct.error,
  ) as e:
    raise CheckpointError(
      f"Cannot read {path!r} ({type(e).__name__}: {e}). {_NPZ_HINT}"
    ) from e
  if not isinstance(state, dict) or not all(
    isinstance(v, np.ndarray) for v in state.values()
  ):
    raise CheckpointError(
      f"{path!r} does not hold a flat state dict of tensors; save "
      "`model.state_dict()` itself."
    )
  return state


# torch.save's pickles. A storage is a flat buffer named by a key; a tensor
# is (storage, element offset, shape, strides). Tensors are kept as `_Tensor`
# records while unpickling and built from the storages' bytes afterwards,
# because the legacy format stores the bytes after the pickle.

_STORAGE_DTYPES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}

_Storage = collections.namedtuple("_Storage", "key dtype numel offset")
_Tensor = collections.namedtuple("_Tensor", "storage offset shape strides")


def _rebuild_tensor(storage, offset, shape, strides, *unused):
  return _Tensor(storage, offset, tuple(shape), tuple(strides))


def _rebuild_parameter(tensor, *unused):
  return tensor


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles tensors, storages and ordered dicts, and nothing else."""

  _GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  }

  def __init__(self, file):
    super().__init__(file)
    self.storages = {}  # key -> _Storage of the whole (root) storage.

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return np.dtype(_STORAGE_DTYPES[name])
    if (module, name) in self._GLOBALS:
      return self._GLOBALS[(module, name)]
    raise CheckpointError(f"the pickle holds {module}.{name}, not a tensor.")

  def persistent_load(self, pid):
    if pid[0] != "storage":
      raise CheckpointError(f"the pickle holds a {pid[0]!r}, not a tensor.")
    dtype, key, numel = pid[1], str(pid[2]), pid[4]
    view = pid[5] if len(pid) > 5 else None  # Legacy format only.
    self.storages[key] = _Storage(key, dtype, numel, 0)
    return _Storage(key, dtype, numel, view[1] if view else 0)


def _build(tree, storage_bytes, byte_order):
  """Replaces every `_Tensor` in a (nested) dict by its array."""
  if isinstance(tree, dict):
    return {k: _build(v, storage_bytes, byte_order) for k, v in tree.items()}
  if not isinstance(tree, _Tensor):
    return tree
  storage = tree.storage
  native = storage.dtype.newbyteorder("=")
  if 0 in tree.shape:
    return np.zeros(tree.shape, native)
  flat = np.frombuffer(
    storage_bytes(storage.key), storage.dtype.newbyteorder(byte_order)
  )
  start = storage.offset + tree.offset
  end = start + sum((n - 1) * s for n, s in zip(tree.shape, tree.strides))
  if start < 0 or end >= flat.size:
    raise CheckpointError(f"a tensor runs past its storage {storage.key}.")
  array = np.lib.stride_tricks.as_strided(
    flat[start:], tree.shape, [s * flat.itemsize for s in tree.strides]
  )
  return array.astype(native)


def _read_torch_zip(archive):
  """torch >= 1.6: <prefix>/data.pkl, and <prefix>/data/<key> per storage."""
  pkl = min((n for n in archive.namelist() if n.endswith("data.pkl")), key=len)
  prefix = pkl[: -len("data.pkl")]
  byte_order = "<"
  if prefix + "byteorder" in archive.namelist():
    byte_order = "<" if archive.read(prefix + "byteorder") == b"little" else ">"
  tree = _TorchUnpickler(io.BytesIO(archive.read(pkl))).load()
  storage_bytes = functools.lru_cache(maxsize=None)(
    lambda key: archive.read(f"{prefix}data/{key}")
  )
  return _build(tree, storage_bytes, byte_order)


def _read_torch_legacy(path):
  """torch < 1.6: magic, version, sys info, the pickle, storage keys, bytes.

  Each storage's bytes follow in key order, after an int64 element count;
  both are little-endian.
  """
  with open(path, "rb") as f:
    magic, version = _TorchUnpickler(f).load(), _TorchUnpickler(f).load()
    if magic != 0x1950A86A20F9469CFC6C or version != 1001:
      raise CheckpointError("not a torch.save file.")
    _TorchUnpickler(f).load()  # System info: byte order, type sizes.
    unpickler = _TorchUnpickler(f)
    tree = unpickler.load()
    data = {}
    for key in _TorchUnpickler(f).load():
      storage = unpickler.storages[str(key)]
      (count,) = struct.unpack("<q", f.read(8))
      if count != storage.numel:
        raise CheckpointError(
          f"storage {key} has {count} elements, not {storage.numel}."
        )
      data[storage.key] = f.read(count * storage.dtype.itemsize)
  return _build(tree, data.__getitem__, "<")


_SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


def _read_safetensors(path):
  """u64 header size, a JSON header of dtype/shape/offsets, then the bytes."""
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
  data = np.memmap(path, np.uint8, mode="r", offset=8 + size)
  state = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f"{key} has unsupported dtype {info['dtype']}.")
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
    begin, end = info["data_offsets"]
    array = data[begin:end].view(dtype).reshape(info["shape"])
    state[key] = np.array(array, dtype.newbyteorder("="))  # Off the file.
  return state
