"""Exact k-nearest-neighbour search against a large memory bank, in chunks.

`search(build_bank(vectors), queries, k)` never builds the full [Q, M]
distance matrix: queries go through in blocks of `query_chunk` rows
(`lax.map`) and each block scans the bank in blocks of `bank_chunk` entries
(`lax.scan`), keeping a running top-k. Peak working memory is therefore about
`query_chunk * bank_chunk` floats beyond the bank itself, whatever the bank
size, so 10^5-10^6 entries fit on a laptop and the whole search is one
jit-compiled computation. `build_bank` lays the bank out once (centred,
padded, blocked), so repeated searches read it in place.

Ranking uses |q|^2 - 2 q.b + |b|^2 (one matmul per block, at `precision`)
on vectors centred on the bank's mean; the k winners' distances are then
recomputed directly from the vectors, so the returned distances carry no
cancellation error.
"""

import functools

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Bank:
  """A memory bank laid out for `search`: centred, padded, in blocks.

  Build it once with `build_bank` (e.g. in a method's `fit`) so that every
  search call reads it in place instead of copying it.
  """

  blocks: jax.Array  # [num_blocks, bank_chunk, D], vectors minus `shift`.
  block_sq: jax.Array  # [num_blocks, bank_chunk] squared norms; inf = pad.
  shift: jax.Array  # [D] the bank's mean.


def _pad_rows(x: jax.Array, multiple: int) -> jax.Array:
  extra = -x.shape[0] % multiple
  return jnp.pad(x, ((0, extra),) + ((0, 0),) * (x.ndim - 1))


def _merge_top_k(dist_a, index_a, dist_b, index_b, k: int):
  """The k smallest of two candidate sets (squared distances, indices)."""
  dist = jnp.concatenate([dist_a, dist_b], axis=1)
  index = jnp.concatenate([index_a, index_b], axis=1)
  neg_top, position = jax.lax.top_k(-dist, k)
  return -neg_top, jnp.take_along_axis(index, position, axis=1)


@functools.partial(jax.jit, static_argnames=("bank_chunk",))
def build_bank(vectors: jax.Array, bank_chunk: int = 8192) -> Bank:
  """[M, D] vectors as a `Bank` of blocks of `bank_chunk` entries."""
  vectors = jnp.asarray(vectors, jnp.float32)
  bank_chunk = min(bank_chunk, vectors.shape[0])
  # Distances do not change under a shift; centring on the bank's mean
  # keeps the norms, and so the expansion's cancellation error, small.
  shift = jnp.mean(vectors, axis=0)
  blocks = _pad_rows(vectors - shift, bank_chunk).reshape(
    -1, bank_chunk, vectors.shape[1]
  )
  index = jnp.arange(blocks.shape[0] * bank_chunk).reshape(blocks.shape[:2])
  block_sq = jnp.where(
    index < vectors.shape[0], jnp.sum(blocks**2, axis=-1), jnp.inf
  )
  return Bank(blocks=blocks, block_sq=block_sq, shift=shift)


@functools.partial(jax.jit, static_argnames=("k", "query_chunk", "precision"))
def search(
  bank: Bank,
  queries: jax.Array,
  k: int = 1,
  query_chunk: int = 1024,
  precision: str = "highest",
):
  """Euclidean distances and indices of each query's k nearest bank entries.

  Args:
    bank: from `build_bank`, holding at least k entries (padding would
      fill the rest, at infinite distance).
    queries: [Q, D] query vectors.
    k: neighbours per query.
    query_chunk: queries handled per block.
    precision: matmul precision for the ranking ('highest', 'high' or
      'default'; lower is faster on TPU/GPU at the cost of near-tie swaps).

  Returns:
    (distances [Q, k] ascending, indices [Q, k] into the bank's vectors).
  """
  num_queries, dim = queries.shape
  num_blocks, bank_chunk, bank_dim = bank.blocks.shape
  if bank_dim != dim:
    raise ValueError(
      f"Queries have dimension {dim} but the bank has {bank_dim}."
    )
  flat = bank.blocks.reshape(-1, dim)

  def rank(centred, query_sq, vectors, vectors_sq):
    """The k smallest |q - b|^2 of the query block against `vectors`."""
    dots = jnp.matmul(centred, vectors.T, precision=precision)
    neg_top, position = jax.lax.top_k(
      -(query_sq - 2.0 * dots + vectors_sq[None, :]), k
    )
    return -neg_top, position

  def search_block(query_block, one_pass: bool = False):
    centred = query_block.astype(jnp.float32) - bank.shift
    query_sq = jnp.sum(centred**2, axis=-1, keepdims=True)
    if one_pass:  # The whole bank at once, ranked by a sort (see below).
      squared = (
        query_sq
        - 2.0 * jnp.matmul(centred, flat.T, precision=precision)
        + bank.block_sq.reshape(1, -1)
      )
      best_index = jnp.argsort(squared, axis=1)[:, :k].astype(jnp.int32)
    else:
      start = (
        jnp.full((query_block.shape[0], k), jnp.inf),
        jnp.zeros((query_block.shape[0], k), jnp.int32),
      )

      def scan_bank(best, chunk):
        vectors, vectors_sq, offset = chunk
        squared, position = rank(centred, query_sq, vectors, vectors_sq)
        return _merge_top_k(*best, squared, offset + position, k), None

      offsets = jnp.arange(num_blocks, dtype=jnp.int32) * bank_chunk
      (_, best_index), _ = jax.lax.scan(
        scan_bank, start, (bank.blocks, bank.block_sq, offsets)
      )
    winners = flat[best_index]  # [query_block, k, D], centred too.
    exact = jnp.sqrt(jnp.sum((centred[:, None, :] - winners) ** 2, -1))
    order = jnp.argsort(exact, axis=1)
    return (
      jnp.take_along_axis(exact, order, axis=1),
      jnp.take_along_axis(best_index, order, axis=1),
    )

  if not isinstance(num_queries, int):
    # A symbolic number of queries (an exported model): one block against
    # the whole bank, without the loops and the top_k that ONNX and TF
    # SavedModel converters do not read.
    return search_block(queries, one_pass=True)
  query_chunk = min(query_chunk, num_queries)
  padded = _pad_rows(queries, query_chunk).reshape(-1, query_chunk, dim)
  distances, indices = jax.lax.map(search_block, padded)
  return (
    distances.reshape(-1, k)[:num_queries],
    indices.reshape(-1, k)[:num_queries],
  )


def nearest_neighbors(
  queries: jax.Array,
  vectors: jax.Array,
  k: int = 1,
  query_chunk: int = 1024,
  bank_chunk: int = 8192,
  precision: str = "highest",
):
  """`search` over `build_bank(vectors)`: for a one-off search.

  Raises ValueError when there are fewer than k vectors or the dimensions
  differ.
  """
  if vectors.shape[0] < k:
    raise ValueError(
      f"The bank has {vectors.shape[0]} entries; k={k} needs at least k."
    )
  return search(
    build_bank(vectors, bank_chunk),
    queries,
    k=k,
    query_chunk=query_chunk,
    precision=precision,
  )


def nearest_distance(
  bank: Bank, queries: jax.Array, k: int = 1, **kwargs
) -> jax.Array:
  """[Q] mean distance to the k nearest entries of `bank` (k=1: nearest)."""
  distances, _ = search(bank, queries, k=k, **kwargs)
  return jnp.mean(distances, axis=1)
