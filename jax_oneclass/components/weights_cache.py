"""torchvision's ImageNet weights, downloaded once into a local cache.

`fetch(arch)` returns the path of the torchvision IMAGENET1K_V1 state-dict
file of `arch` (see `WEIGHTS`), downloading it on first use:

- from `$JAX_ONECLASS_WEIGHTS_URL/<file name>` (default
  `https://download.pytorch.org/models`, torchvision's own host);
- into `$JAX_ONECLASS_CACHE` (default `~/.cache/jax_oneclass`);
- through `<file name>.part`: an interrupted download resumes with an HTTP
  Range request, and the file takes its final name (an atomic rename) only
  once its sha256 matches;
- a cached file is re-hashed before use; one that does not match is
  deleted and fetched again.

Only the standard library (urllib) is used. Offline, the error names the URL,
the file name and the directory to put the file in.
"""

import dataclasses
import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from jax_oneclass import logging_utils
from jax_oneclass.errors import CheckpointError

DEFAULT_BASE_URL = "https://download.pytorch.org/models"
BASE_URL_ENV = "JAX_ONECLASS_WEIGHTS_URL"
CACHE_ENV = "JAX_ONECLASS_CACHE"
_CHUNK = 1 << 20
_ATTEMPTS = 3  # Downloads tried (each resuming the last) before giving up.


@dataclasses.dataclass(frozen=True)
class Weights:
  """One published file: its name and its sha256 (full, or the first hex
  digits where only those are published, as in torchvision's file names)."""

  file_name: str
  sha256: str


# torchvision's IMAGENET1K_V1 weights (the ones RD4AD and anomalib's
# defaults use). torchvision publishes the first 8 hex digits of each file's
# sha256 in its name (`torch.hub` checks only those); resnet18's full digest
# is as recorded by a third-party project; the other two are checked by
# their published prefix.
WEIGHTS = {
  "resnet18": Weights(
    "resnet18-f37072fd.pth",
    "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec",
  ),
  "resnet50": Weights("resnet50-0676ba61.pth", "0676ba61"),
  "wide_resnet50_2": Weights("wide_resnet50_2-95faca4d.pth", "95faca4d"),
}


def cache_dir() -> Path:
  """`$JAX_ONECLASS_CACHE`, or `~/.cache/jax_oneclass`."""
  return Path(
    os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jax_oneclass"
  )


def url_of(arch: str) -> str:
  """Where `arch`'s file is downloaded from (`$JAX_ONECLASS_WEIGHTS_URL`)."""
  base = os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
  return f"{base.rstrip('/')}/{_weights(arch).file_name}"


def sha256_of(path) -> str:
  """Hex sha256 of a file, read in chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def fetch(arch: str, timeout: float = 60.0) -> Path:
  """The verified cached file of `arch`'s ImageNet weights, downloaded
  (or resumed) when it is not cached yet. Raises CheckpointError."""
  weights = _weights(arch)
  directory = cache_dir()
  target = directory / weights.file_name
  if target.is_file():
    if _matches(sha256_of(target), weights.sha256):
      return target
    logging_utils.info(
      f"{target} does not match its sha256; downloading it again."
    )
    target.unlink()
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise CheckpointError(
      f"Cannot create the weights cache {directory} ({e}); set "
      f"${CACHE_ENV} to a writable directory."
    ) from e
  url = url_of(arch)
  part = target.with_name(target.name + ".part")
  logging_utils.info(f"Downloading {url} to {target}.")
  for attempt in range(1, _ATTEMPTS + 1):
    try:
      _download(url, part, timeout)
      break
    except urllib.error.HTTPError as e:
      raise CheckpointError(
        f"Downloading {url} failed: HTTP {e.code} {e.reason}. "
        + _by_hand(url, weights, directory)
      ) from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
      if attempt == _ATTEMPTS or isinstance(e, urllib.error.URLError):
        reason = getattr(e, "reason", e)
        kept = (
          f" {_size(part)} bytes are in {part}, which the next run resumes."
          if _size(part)
          else ""
        )
        raise CheckpointError(
          f"Cannot download {url} ({reason}).{kept} "
          + _by_hand(url, weights, directory)
        ) from e
      logging_utils.info(f"Download interrupted ({e}); resuming.")
  digest = sha256_of(part)
  if not _matches(digest, weights.sha256):
    part.unlink()
    raise CheckpointError(
      f"{url} has sha256 {digest}, expected {weights.sha256}; the download "
      "was deleted. Check $"
      + BASE_URL_ENV
      + " or fetch it by hand. "
      + _by_hand(url, weights, directory)
    )
  os.replace(part, target)
  return target


def _weights(arch: str) -> Weights:
  if arch not in WEIGHTS:
    raise CheckpointError(
      f"No ImageNet weights are known for {arch!r}; choose one of "
      f"{sorted(WEIGHTS)} or pass a weights file as model.pretrained."
    )
  return WEIGHTS[arch]


def _matches(digest: str, expected: str) -> bool:
  return digest.startswith(expected.lower())


def _size(path: Path) -> int:
  return path.stat().st_size if path.is_file() else 0


def _by_hand(url: str, weights: Weights, directory: Path) -> str:
  return (
    f"Offline, download {url} elsewhere and put it at "
    f"{directory / weights.file_name} (set ${CACHE_ENV} to use "
    "another directory), or pass the file as "
    "--config.model.pretrained=/path/to/" + weights.file_name + "."
  )


def _download(url: str, part: Path, timeout: float) -> None:
  """Appends the rest of `url` to `part` (a Range request from its size);
  raises OSError when the body ends before its announced length."""
  have = _size(part)
  request = urllib.request.Request(url)
  if have:
    request.add_header("Range", f"bytes={have}-")
  try:
    response = urllib.request.urlopen(request, timeout=timeout)
  except urllib.error.HTTPError as e:
    if e.code == 416 and have:  # Nothing past `have`: already complete.
      return
    raise
  with response:
    if have and response.status != 206:  # Range ignored: start over.
      have = 0
    length = response.headers.get("Content-Length")
    expected = have + int(length) if length is not None else None
    with open(part, "ab" if have else "wb") as f:
      for chunk in iter(lambda: response.read(_CHUNK), b""):
        f.write(chunk)
  if expected is not None and _size(part) < expected:
    raise OSError(
      f"the connection closed after {_size(part)} of {expected} bytes"
    )
