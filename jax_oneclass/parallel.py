"""Devices and hosts, handled in one place.

Every jitted computation runs over a one-axis `Mesh` named 'data' that spans
all devices of all hosts. Batches are split over that axis and the state is
replicated, so `jax.jit` sees global arrays: BatchNorm statistics and
contrastive negatives cover the whole global batch without collectives in
the method code.
"""

import contextlib

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_oneclass.errors import ConfigError

DATA_AXIS = "data"
_host_local = False  # Within `host_local()`: see there.


@contextlib.contextmanager
def host_local():
  """Within it, this process acts as a one-host job on its own devices.

  A sweep under several processes gives each host its own members: their
  runs see one process (index 0) and this host's devices, read all of
  their data, write their own files and meet no other host in a barrier.
  """
  global _host_local
  before, _host_local = _host_local, True
  try:
    yield
  finally:
    _host_local = before


def is_host_local() -> bool:
  """Whether this process runs inside `host_local()`."""
  return _host_local


def process_count() -> int:
  """Processes this job spans (1 inside `host_local()`)."""
  return 1 if _host_local else jax.process_count()


def process_index() -> int:
  """This process's index in the job (0 inside `host_local()`)."""
  return 0 if _host_local else jax.process_index()


def devices() -> list:
  """The job's devices (this host's inside `host_local()`)."""
  return jax.local_devices() if _host_local else jax.devices()


def device_count() -> int:
  return len(devices())


# Random bits then depend only on the key and the shape, not on how an array
# is split over devices, so 1 device and 8 devices draw the same numbers.
jax.config.update("jax_threefry_partitionable", True)


def initialize_distributed(
  coordinator_address=None, num_processes=None, process_id=None
) -> None:
  """Starts `jax.distributed` when launched as several processes.

  With no arguments nothing happens unless the cluster is auto-detectable
  (JAX_COORDINATOR_ADDRESS set, SLURM, TPU pod), in which case JAX finds the
  coordinator itself.
  """
  if coordinator_address is None and num_processes is None:
    import os  # pylint: disable=g-import-not-at-top

    if not os.environ.get("JAX_COORDINATOR_ADDRESS"):
      return
  # CPU processes exchange arrays through gloo; GPUs and TPUs ignore this.
  # (Asking for the backend here would start XLA before initialize.)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
  )


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every process."""
  return Mesh(np.asarray(devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, name: str = "batch_size") -> None:
  """Global batches must split evenly over devices and hosts."""
  num_devices, hosts = device_count(), process_count()
  if batch_size <= 0 or batch_size % num_devices or batch_size % hosts:
    raise ConfigError(
      f"config.{name}={batch_size} must be a positive multiple of the "
      f"number of devices ({num_devices}) and hosts ({hosts})."
    )


def shard_batch(mesh: Mesh, local_batch: dict) -> dict:
  """Host-local numpy batch -> global arrays split over the 'data' axis."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch
  )


def replicate(mesh: Mesh, tree):
  """Host values identical on every process -> replicated global arrays."""
  sharding = replicated(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
    tree,
  )


def to_host(tree):
  """Replicated global arrays -> numpy, on every process."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _identity(tree):
  return tree


def put_global(tree, sharding: NamedSharding):
  """Arrays with the same value on every process -> global arrays laid out
  by `sharding` (also from another mesh's global arrays, and PRNG keys).

  One process: `jax.device_put`. Several: `device_put` refuses shardings
  over other hosts' devices, so host values go through
  `make_array_from_callback` and global arrays through a jitted copy.
  """
  if process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.jit(_identity, out_shardings=sharding)(x)
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      data = np.asarray(jax.random.key_data(x))
      spec = P(*sharding.spec, None)
      return jax.random.wrap_key_data(
        put_global(data, NamedSharding(sharding.mesh, spec)),
        impl=jax.random.key_impl(x),
      )
    value = np.asarray(x)
    return jax.make_array_from_callback(
      value.shape, sharding, lambda index: value[index]
    )

  return jax.tree.map(put, tree)
