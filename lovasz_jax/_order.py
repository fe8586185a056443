"""How whole rows are ordered (exact mode) or counted (histogram mode), per backend.

This is the one module that knows what each backend does well. Everything
here works on rows that are whole on one device; ``_distribute`` decides
where rows live.

Exact mode puts each row of ``encode_keys`` keys in descending order, takes
the closed-form weights in that order (``_extension.sorted_weights``), and
puts the weights back in pixel order:

- CPU: the native kernel (``_cpu``), an LSD radix sort in C++. XLA's CPU sort
  calls a generic comparator for every comparison and is several times
  slower (see the performance page of the docs).
- CPU without the native kernel (no compiler, or ``LOVASZ_JAX_CPU_KERNEL=0``):
  "packed-rows", one single-operand sort of ``(~key << 32) | index`` in
  uint64 per row, one row at a time (``lax.map``), then a scatter back. On
  XLA's CPU sort that is the fastest variant (252 ms against the pair
  sort's 1845 ms at (2,256,256,21)), and one row at a time its buffers hold
  one row: compiled temp 1.55x the logits, where all rows at once ("packed")
  take 5.37x, over the 4x target.
- GPU, TPU: one stable ``lax.sort`` of
  (uint32 key, int32 pixel index) pairs, and a second sort keyed by the
  pixel index to put the weights back. Both are sorts of 32-bit pairs.
  TPUs rewrite 64-bit integer types into 32-bit operations
  (openxla/xla#26995 quotes that rewriter), and sort several operands
  natively (jax-ml/jax#5052). On GPUs, XLA's ``SortRewriter``
  (``xla/backends/gpu/transforms/sort_rewriter.cc``; flag
  ``xla_gpu_enable_cub_radix_sort``, on by default) sends one- or two-operand
  sorts along the minor axis whose comparator compares one integer operand
  to CUB's radix sort, a segmented one for several rows. Its radix passes
  scale with the key's bits: a 32-bit key needs half the passes of the
  packed 64-bit one. (Below sizes that depend on the GPU and the number of
  rows, XLA keeps its own sort; ``make bench-gpu`` measures what a given GPU
  does.) Putting the weights back with a second sort, rather than a scatter,
  needs no zero-filled target and no index column: compiled temp memory
  3.4x the logits at (2,256,256,21), where the scatter variant needs 4.4x.
- The alternatives stay selectable for the accelerator benchmark
  (``use_path``): "scatter" (a scatter of unique indices to put the weights
  back: one pass, and no atomics, since XLA's GPU emitter writes unique
  indices with plain stores) and "packed" (one single-operand sort of
  ``(~key << 32) | index`` in uint64; on XLA's CPU backend it is about 5x
  faster than the pair sort, a gap the native kernel makes moot there).

Histogram mode counts each row's ``2K + 1`` slots (the native kernel on CPU,
a scatter-add of int32 ones elsewhere; integer adds are deterministic, so
XLA's determinism flags add no sort to it), and then gives each pixel its
slot's weight from the small ``[rows, 2K + 1]`` table (a native lookup on
CPU, a gather elsewhere).

Scatters and gathers keep the images (and any vmapped axis) as batching
dimensions, which the SPMD partitioner keeps on their devices, and address
the rows of one image with flat int32 indices: XLA lowers each batching
dimension to one more index column (``BatchedGatherScatterNormalizer``), so
flat indices within an image need one column where ``[image, class, pixel]``
batching would need three.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lovasz_jax import _cpu
from lovasz_jax import _extension

# Which implementation runs, for tests and the benchmark: None (per
# backend, as above), or one of PATHS: "native" (the CPU kernel), "sort2"
# (pair sort, sort back: the accelerators' default), "scatter" (pair sort,
# scatter back) or "packed" (uint64 sort, scatter back). Histogram mode counts with the
# native kernel for "native" and with a scatter-add otherwise. It is read at
# trace time; ``use_path`` clears JAX's caches around it.
_FORCED: str | None = None
PATHS = ("native", "sort2", "scatter", "packed", "packed-rows")


@contextlib.contextmanager
def use_path(path: str | None) -> Iterator[None]:
  """Forces one implementation (tests and benchmarks only)."""
  global _FORCED  # pylint: disable=global-statement
  if path not in PATHS + (None,):
    raise ValueError(f"path must be one of {PATHS} or None, got {path!r}.")
  if path == "native" and not _cpu.available():
    raise RuntimeError("the native CPU kernel is not available")
  previous, _FORCED = _FORCED, path
  jax.clear_caches()
  try:
    yield
  finally:
    _FORCED = previous
    jax.clear_caches()


def native_ok() -> bool:
  """Whether the CPU branch may use the native kernel."""
  return _FORCED == "native" or (_FORCED is None and _cpu.available())


def _per_group(fn, ndim: int):
  """``fn`` on ``[rows, P]`` arrays, mapped over the ``ndim - 2`` leading axes.

  The leading axes (images, or a vmapped axis) become batching dimensions,
  which the SPMD partitioner keeps where they are; leading axes of size 1
  (batch mode) are dropped instead. Within a group the rows are addressed
  with flat indices ``row * width + i``: one int32 column per element,
  where batching dimensions would add one column each once XLA lowers them
  (``BatchedGatherScatterNormalizer``).
  """

  def mapped(*arrays):
    lead = arrays[0].shape[:-2]
    if len(arrays[0].shape) < 2:
      return fn(*(a[None] for a in arrays))[0]
    if math.prod(lead) == 1:
      out = fn(*(a.reshape(a.shape[-2:]) for a in arrays))
      return out.reshape(lead + out.shape)
    g = fn
    for _ in lead:
      g = jax.vmap(g)
    return g(*arrays)

  del ndim
  return mapped


# One-dimensional scatter and gather of single elements by flat int32 index
# (lax directly: jnp's indexing would add a select for negative indices).
_SCATTER_1D = lax.ScatterDimensionNumbers(
    update_window_dims=(), inserted_window_dims=(0,),
    scatter_dims_to_operand_dims=(0,))
_GATHER_1D = lax.GatherDimensionNumbers(
    offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,))


def _flat(index: jax.Array, width: int) -> jax.Array:
  """``row * width + index`` for ``[rows, P]`` indices (int32)."""
  rows = lax.broadcasted_iota(jnp.int32, index.shape, 0)
  return rows * width + index.astype(jnp.int32)


def _fits(rows: int, width: int) -> bool:
  """Whether flat int32 indices fit; not for symbolic sizes (jax.export)."""
  size = rows * width
  return isinstance(size, int) and size <= np.iinfo(np.int32).max


def pixel_index(shape: tuple[int, ...]) -> tuple[jax.Array, bool]:
  """Each element's index, flat within its ``[rows, P]`` group if that fits.

  Returns the int32 indices and whether they are flat (``row * P + i``;
  otherwise they are ``i``, the position in the row).
  """
  axis = len(shape) - 1
  col = lax.broadcasted_iota(jnp.int32, shape, axis)
  if axis and _fits(shape[-2], shape[-1]):
    return lax.broadcasted_iota(jnp.int32, shape, axis - 1) * shape[-1] + col, True
  return col, False


def scatter_rows(values: jax.Array, index: jax.Array, flat: bool,
                 target: jax.Array | None = None) -> jax.Array:
  """``out[index] = values`` within each row (unique indices).

  ``index`` holds positions in the row, or flat positions in the group when
  ``flat`` (see ``pixel_index``), which saves computing them here. When
  ``index`` is a permutation of every row, every element is written, so any
  ``target`` of the values' shape and dtype can receive them (a dead buffer
  saves a zero-filled one); otherwise the target is zeros.
  """

  def group(v, i, t):
    rows, width = i.shape
    if not (flat or _fits(rows, width)):
      return jax.vmap(group)(v[:, None], i[:, None], t[:, None])[:, 0]
    i = i if flat else _flat(i, width)
    out = lax.scatter(
        t.reshape(-1), i.reshape(-1, 1), v.reshape(-1), _SCATTER_1D,
        indices_are_sorted=False, unique_indices=True,
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    return out.reshape(rows, width)

  if target is None:
    target = jnp.zeros_like(values)
  return _per_group(group, values.ndim)(values, index, target)


def gather_rows(table: jax.Array, index: jax.Array) -> jax.Array:
  """``table[..., index[..., i]]`` along the last axis."""

  def group(t, i):
    rows, width = t.shape
    if not _fits(rows, width):
      return jax.vmap(group)(t[:, None], i[:, None])[:, 0]
    index = _flat(i, width)
    return lax.gather(
        t.reshape(-1), index[..., None], _GATHER_1D, slice_sizes=(1,),
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)

  return _per_group(group, index.ndim)(table, index)


def count_rows(index: jax.Array, width: int) -> jax.Array:
  """How often each value in ``[0, width)`` occurs in each row (int32).

  One row at a time (``lax.map`` over the rows of each image), each a
  one-dimensional scatter-add, so the scatter's index and update arrays
  hold one row, not all of them. When a row's pixels are spread over
  devices, the SPMD partitioner counts each device's pixels where they are
  and all-reduces the counts (flat indices over several rows would make it
  gather the pixels instead).
  """

  def row(i):
    return lax.scatter_add(
        jnp.zeros(width, jnp.int32), i.astype(jnp.int32)[:, None],
        jnp.ones(i.shape[0], jnp.int32), _SCATTER_1D,
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)

  return _per_group(lambda rows: lax.map(row, rows), index.ndim)(index)


def _unsort_scatter(w_sorted: jax.Array, perm: jax.Array, flat: bool,
                    dead: jax.Array) -> jax.Array:
  """Weights back to pixel order: one scatter of unique indices.

  ``perm`` permutes each row, so every element is written: the scatter goes
  into ``dead`` (the sorted keys, no longer needed) instead of a new
  zero-filled buffer.
  """
  # The barrier orders the row losses (which read the sorted keys) before
  # the scatter, so the keys' buffer is free by then.
  w_sorted, perm, dead = lax.optimization_barrier((w_sorted, perm, dead))
  target = lax.bitcast_convert_type(dead, w_sorted.dtype)
  return scatter_rows(w_sorted, perm, flat, target)


def _unsort_sort(w_sorted: jax.Array, perm: jax.Array, flat: bool,
                 dead: jax.Array) -> jax.Array:
  """Weights back to pixel order: a second sort, keyed by the pixel index."""
  del flat, dead  # flat indices order a row like positions do
  return lax.sort((perm, w_sorted), dimension=perm.ndim - 1, num_keys=1,
                  is_stable=False)[1]


def _sort_pairs(keys: jax.Array) -> tuple[jax.Array, jax.Array, bool]:
  """Keys sorted descending, their pixel indices, and whether those are flat."""
  index, flat = pixel_index(keys.shape)
  # ~key ascending is key descending; stability keeps pixel order at ties.
  neg_sorted, perm = lax.sort((~keys, index), dimension=keys.ndim - 1,
                              num_keys=1, is_stable=True)
  return ~neg_sorted, perm, flat


def _sort_packed(keys: jax.Array) -> tuple[jax.Array, jax.Array, bool]:
  """The same from one single-operand sort of ``(~key << 32) | index``."""
  index, flat = pixel_index(keys.shape)
  with jax.enable_x64(True):  # uint64 inside this function only
    index = lax.convert_element_type(index, np.uint64)
    packed = (lax.convert_element_type(~keys, np.uint64) << np.uint64(32)) | index
    packed = lax.sort(packed, dimension=keys.ndim - 1, is_stable=False)
    keys_sorted = ~lax.convert_element_type(packed >> np.uint64(32), np.uint32)
    perm = lax.convert_element_type(packed & np.uint64(0xFFFFFFFF), np.int32)
  return keys_sorted, perm, flat


def _portable(sort, unsort):
  def weights(keys):
    keys_sorted, perm, flat = sort(keys)
    w_sorted, losses = _extension.sorted_weights(keys_sorted)
    return unsort(w_sorted, perm, flat, keys_sorted), losses
  return weights


def _row_by_row(weights):
  """``weights`` of one ``[P]`` row at a time (``lax.map`` over the rows of
  each group; the groups, and any vmapped axis, stay batched), so that the
  sort's buffers hold one row, not all of them."""

  def run(keys):
    if keys.ndim == 1:
      return weights(keys)
    f = lambda rows: lax.map(weights, rows)
    for _ in range(keys.ndim - 2):
      f = jax.vmap(f)
    return f(keys)

  return run


def _packed_rows(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  if keys.dtype != jnp.uint32:  # 64-bit keys leave no room to pack
    return _row_by_row(_EXACT["sort2"])(keys)
  return _row_by_row(_EXACT["packed"])(keys)


_EXACT = {
    "scatter": _portable(_sort_pairs, _unsort_scatter),
    "sort2": _portable(_sort_pairs, _unsort_sort),
    "packed": _portable(_sort_packed, _unsort_scatter),
}
# XLA's CPU sort, where the native kernel is missing: one packed uint64
# sort per row (measured fastest there, within the memory target).
_EXACT["packed-rows"] = _packed_rows


def exact_weights(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each pixel's Lovász weight (pixel order) and each row's loss.

  Args:
    keys: ``encode_keys`` keys ``[..., P]``; every row whole.
  """
  if keys.shape[-1] == 0:
    dtype = _extension.float_dtype(keys)
    return jnp.zeros(keys.shape, dtype), jnp.zeros(keys.shape[:-1], dtype)
  if _FORCED is not None:
    if _FORCED == "native":
      return _cpu.exact_weights(keys)
    if _FORCED == "packed" and keys.dtype != jnp.uint32:
      return _EXACT["scatter"](keys)  # 64-bit keys leave no room to pack
    return _EXACT[_FORCED](keys)
  # CPU: the native kernel, or without it the fastest XLA variant there
  # that meets the memory target; GPU and TPU: the pair sort (until a GPU
  # measurement says otherwise, see the module docstring).
  cpu = _cpu.exact_weights if _cpu.available() else _EXACT["packed-rows"]
  return lax.platform_dependent(keys, cpu=cpu, default=_EXACT["sort2"])


def count_slots(keys: jax.Array, num_bins: int) -> jax.Array:
  """Pixels per slot ``[..., 2K + 1]`` of ``encode_bins`` keys, in XLA."""
  if keys.shape[-1] == 0:
    return jnp.zeros(keys.shape[:-1] + (2 * num_bins + 1,), jnp.int32)
  return count_rows(keys, 2 * num_bins + 1)


def histogram_counts(keys: jax.Array, num_bins: int) -> jax.Array:
  """Pixels per slot ``[..., 2K + 1]`` (int32) of ``encode_bins`` keys."""
  if keys.shape[-1] == 0:
    return jnp.zeros(keys.shape[:-1] + (2 * num_bins + 1,), jnp.int32)
  if _FORCED is not None:
    if _FORCED == "native":
      return _cpu.histogram_counts(keys, num_bins=num_bins)
    return count_slots(keys, num_bins)
  portable = functools.partial(count_slots, num_bins=num_bins)
  if not _cpu.available():
    return portable(keys)
  return lax.platform_dependent(
      keys, default=portable,
      cpu=functools.partial(_cpu.histogram_counts, num_bins=num_bins))


def slot_weights(counts: jax.Array, num_bins: int,
                 dtype) -> tuple[jax.Array, jax.Array]:
  """``_extension.slot_weights``: natively on CPU (a short loop per row,
  where XLA's version is an associative scan of many small passes)."""
  portable = functools.partial(_extension.slot_weights, num_bins=num_bins, dtype=dtype)
  native = functools.partial(_cpu.slot_weights, num_bins=num_bins, dtype=dtype)
  if _FORCED is not None:
    return (native if _FORCED == "native" else portable)(counts)
  if not _cpu.available():
    return portable(counts)
  return lax.platform_dependent(counts, cpu=native, default=portable)


def slot_lookup(omega: jax.Array, keys: jax.Array) -> jax.Array:
  """Each pixel's slot weight: ``omega[..., keys]``."""
  if keys.shape[-1] == 0:
    return jnp.zeros(keys.shape, omega.dtype)
  if _FORCED is not None:
    if _FORCED == "native":
      return _cpu.lookup(omega, keys)
    return gather_rows(omega, keys)
  if not _cpu.available():
    return gather_rows(omega, keys)
  return lax.platform_dependent(omega, keys, cpu=_cpu.lookup,
                                default=gather_rows)
