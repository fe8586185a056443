"""Where a row lives: the one module that knows about devices.

A row (one class of one group) is ordered as a whole, but its pixels may be
spread over devices: in batch mode a data-parallel batch splits every row
over the batch's mesh axes. ``row_weights`` takes rows of keys wherever they
are and returns each pixel's weight where the pixel is, and each row's loss:

- rows whole on their device (``per_image``, or one device): the rows are
  ordered (or counted) where they are; nothing crosses devices.
- histogram mode, rows split: each device counts its own pixels into the
  ``[rows, 2K + 1]`` slot histogram, one all-reduce sums the counts, and each
  device weighs its own pixels from the global counts. That all-reduce (and
  nothing else) crosses devices.
- exact mode, rows split: an all-to-all gives each of the N devices whole
  rows (rows are padded with void rows to a multiple of N), each orders its
  rows, and a second all-to-all sends every pixel's weight back to its
  device; the row losses are summed in an all-reduce of one scalar per row.
  Per-device work and memory fall as 1/N when there are at least N rows.
  With fewer rows than devices (binary or multi-label losses with few
  channels), the rows land on as many devices as there are rows and the
  other devices wait: memory per busy device is one whole row.

Three ways of running on several devices reach the same code:

- ``axis_name`` (inside ``shard_map``): the keys are the local blocks, and
  the rows are split over the named mesh axes.
- explicit sharding (``jax.make_mesh``'s default axis types): the keys'
  type says how they are sharded, so the work is wrapped in a ``shard_map``
  over the keys' mesh (also when their spec is empty: a replicated array,
  or one example inside ``jax.vmap`` over a sharded axis).
- automatic sharding (or none): the partitioner decides shardings when it
  compiles, so a ``custom_partitioning`` rule reads the keys' sharding then
  and picks one of the cases above. On one device it is inlined. With a
  mesh in context (``jax.set_mesh``), batch-mode rows are split over its
  automatic axes as inside ``shard_map``, padded with void pixels (key 0)
  to a multiple of the devices.

The metrics follow the same rule with ``reduce_counts``: each device counts
its own block, and only the counts cross devices (one all-reduce).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.custom_batching
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lovasz_jax import _cpu
from lovasz_jax import _extension
from lovasz_jax import _order
from lovasz_jax import _sharding


def axis_names(axis_name: Any) -> tuple[str, ...]:
  """``axis_name`` (None, a name, or a tuple of names) as a tuple."""
  if axis_name is None:
    return ()
  if isinstance(axis_name, (tuple, list)):
    return tuple(axis_name)
  return (axis_name,)


def _axis_size(axes: tuple[str, ...]) -> int:
  return math.prod(lax.axis_size(a) for a in axes)


def _histogram(keys, num_bins, axes):
  """Histogram mode: each pixel's weight and each row's loss; the counts are
  summed over ``axes``, the devices that split the rows (if any)."""
  counts = _order.histogram_counts(keys, num_bins)
  if axes:
    counts = lax.psum(counts, axes)
  omega, losses = _order.slot_weights(counts, num_bins, _extension.float_dtype(keys))
  return _order.slot_lookup(omega, keys), losses


def _whole_rows(keys: jax.Array, num_bins: int) -> tuple[jax.Array, jax.Array]:
  """Weights and losses of rows that are whole on this device."""
  if not num_bins:
    return _order.exact_weights(keys)
  return _histogram(keys, num_bins, ())


def _exact_split(keys, axes):
  n = _axis_size(axes)
  lead, pixels = keys.shape[:-1], keys.shape[-1]
  rows = math.prod(lead)
  per = -(-rows // n)  # rows per device after the all-to-all
  padded = jnp.pad(keys.reshape(rows, pixels), ((0, per * n - rows), (0, 0)))
  whole = lax.all_to_all(padded, axes, 0, 1, tiled=True)   # [per, n * pixels]
  w, losses = _order.exact_weights(whole)
  w = lax.all_to_all(w, axes, 1, 0, tiled=True)             # [per * n, pixels]
  # Each device holds the losses of its `per` rows; one all-reduce of a
  # scalar per row gives every device all of them.
  mine = lax.dynamic_update_slice(
      jnp.zeros(per * n, losses.dtype), losses, (lax.axis_index(axes) * per,))
  losses = lax.psum(mine, axes)
  return w[:rows].reshape(keys.shape), losses[:rows].reshape(lead)


def split_rows(keys: jax.Array, num_bins: int,
               axes: tuple[str, ...]) -> tuple[jax.Array, jax.Array]:
  """Weights (local pixels) and losses (whole rows) of rows split over ``axes``.

  Runs on the local blocks of the keys (inside ``shard_map`` or a
  ``custom_partitioning`` rule); with no axes the rows are whole.
  """
  if not axes:
    return _whole_rows(keys, num_bins)
  # (An axis of size 1 takes the same route: its collectives are trivial,
  # and the losses come out typed as the same on every device.)
  if num_bins:
    return _histogram(keys, num_bins, axes)
  return _exact_split(keys, axes)


def _spec(sharding, ndim: int) -> tuple:
  spec = tuple(getattr(sharding, "spec", ()))
  return (spec + (None,) * ndim)[:ndim]


@functools.cache
def _native_partitioned(num_bins: int):
  """The CPU kernel's rows, with a rule that tells XLA where they live.

  XLA cannot partition a custom call by itself (it would gather every row to
  every device), so a ``custom_partitioning`` rule reads the keys' sharding
  when the program is compiled and runs ``split_rows`` over the mesh axes
  that split the pixel axis. Only the CPU branch uses it: XLA's TPU backend
  does not run these rules (jax-ml/jax#38196), and the portable path is
  plain XLA operations that the partitioner handles itself.
  """

  def shardings(mesh, spec):
    return (NamedSharding(mesh, P(*spec)), NamedSharding(mesh, P(*spec[:-1])))

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    return shardings(mesh, _spec(arg_shapes[0].sharding, arg_shapes[0].ndim))

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    spec = _spec(arg_shapes[0].sharding, arg_shapes[0].ndim)
    lower = functools.partial(split_rows, num_bins=num_bins,
                              axes=axis_names(spec[-1]))
    return (mesh, lower, shardings(mesh, spec),
            (NamedSharding(mesh, P(*spec)),))

  def whole(keys):
    return _whole_rows(keys, num_bins)

  partitioned = custom_partitioning(whole)
  partitioned.def_partition(
      infer_sharding_from_operands=infer, partition=partition,
      sharding_rule="... p -> ... p, ...")

  # custom_partitioning has no batching rule; under vmap the mapped axis is
  # one more leading axis of rows.
  @jax.custom_batching.custom_vmap
  def batchable(keys):
    return partitioned(keys)

  @batchable.def_vmap
  def _(axis_size, in_batched, keys):
    del axis_size
    return batchable(keys), (in_batched[0], in_batched[0])

  return batchable


def _by_partitioner(keys: jax.Array,
                    num_bins: int) -> tuple[jax.Array, jax.Array]:
  """Rows whose layout the partitioner decides (automatic sharding, or none).

  Whole rows sharded over their leading axes stay where they are: the
  portable path's sorts run along the pixel axis and its scatters and
  gathers have batching dimensions, which XLA partitions along the rows. In
  histogram mode a row split over devices is counted where its pixels are
  (XLA partitions the scatter-add into local counts and one all-reduce). An
  exact row split over devices is gathered by the partitioner; with a mesh
  in context (``jax.set_mesh``) ``row_weights`` avoids that.
  """
  if _order.native_ok():
    return lax.platform_dependent(
        keys, cpu=_native_partitioned(num_bins),
        default=functools.partial(_whole_rows, num_bins=num_bins))
  return _whole_rows(keys, num_bins)


def _context_axes() -> tuple[Any, tuple[str, ...]]:
  """The mesh set with ``jax.set_mesh`` (if any) and its automatic axes."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return None, ()
  auto = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
               if kind == jax.sharding.AxisType.Auto)
  return mesh, auto


def _shard_map(fn, mesh, in_specs, out_specs):
  """``jax.shard_map`` of ``fn`` over the explicit axes of ``mesh``.

  With no automatic axes, ``axis_names`` is left empty so that ``shard_map``
  takes every axis but those that an enclosing ``jax.vmap`` over a sharded
  axis already maps (its batching rule keeps that axis split).
  """
  auto = jax.sharding.AxisType.Auto
  manual = frozenset(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                     if kind != auto)
  if len(manual) == len(mesh.axis_names):
    manual = frozenset()
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       axis_names=manual)


def _pad_to_devices(x: jax.Array, spec: tuple, mesh) -> jax.Array:
  """``x`` padded with zeros so that each split axis divides its devices.

  Zero is a void pixel's key and a void pixel's mask, so padding changes
  nothing that is computed; callers slice the padding off the results.
  """
  pads = []
  for size, entry in zip(x.shape, spec):
    n = math.prod(mesh.shape[a] for a in axis_names(entry))
    pads.append((0, -size % n))
  return jnp.pad(x, pads) if any(p for _, p in pads) else x


def row_weights(keys: jax.Array, num_bins: int, axis_name: Any = None,
                spans_batch: bool = False) -> tuple[jax.Array, jax.Array]:
  """Each pixel's Lovász weight (where the pixel is) and each row's loss.

  Args:
    keys: ``encode_keys`` keys (``num_bins == 0``, exact) or ``encode_bins``
      keys (histogram mode) ``[..., P]``.
    num_bins: 0, or the number of bins of ``encode_bins``.
    axis_name: inside ``shard_map``, the mesh axes over which each row's
      pixels are split (the keys are the local block); None otherwise.
    spans_batch: whether the pixel axis holds several images (batch mode),
      so that a data-parallel batch splits every row over devices.

  Returns:
    The weights ``[..., P]`` (0 at void pixels) and the row losses ``[...]``
    (of whole rows; with ``axis_name``, the same on every device).
  """
  axes = axis_names(axis_name)
  if axes:
    return split_rows(keys, num_bins, axes)
  mesh = _sharding.explicit_mesh(keys)
  if mesh is not None:
    # Explicit sharding: the mesh and the layout are in the type (an empty
    # spec too: a replicated array, or one example inside jax.vmap over a
    # sharded axis, whose batching rule keeps that axis split).
    spec = _sharding.spec_of(keys)
  else:
    mesh, auto = _context_axes()
    if not (spans_batch and auto):
      return _by_partitioner(keys, num_bins)
    # Batch-mode rows under automatic sharding, with a mesh in context: split
    # the pixels over the mesh's automatic axes (a local slice of a batch
    # sharded over them), and handle the split rows as inside shard_map.
    spec = (None,) * (keys.ndim - 1) + (auto,)
  padded = _pad_to_devices(keys, spec, mesh)
  fn = functools.partial(split_rows, num_bins=num_bins,
                         axes=axis_names(spec[-1]))
  w, losses = _shard_map(fn, mesh, P(*spec), (P(*spec), P(*spec[:-1])))(padded)
  if padded.shape != keys.shape:
    w = w[tuple(slice(0, n) for n in keys.shape)]
    losses = losses[tuple(slice(0, n) for n in keys.shape[:-1])]
  return w, losses


# The passes between the softmax losses' pixels and their class rows
# (``_extension.encode_rows`` and ``rows_grad``, and in histogram mode
# ``histogram_table`` and ``rows_grad`` with slot weights) run wherever the
# pixels are: only the class axis must be whole. Their operands' layouts,
# after the leading (group) axes: "p" is the pixel axis, "c" the class axis,
# "s" the slots of a row's histogram. A result without "p" from operands
# with it ("table") is a sum over the pixels: each device sums its own, and
# the devices that split the pixels add theirs up (one all-reduce).
_PIXELWISE = {"encode": (("pc", "pc", "p"), ("cp", "p", "p")),
              "grad": (("pc", "pc", "p", "p", "cp", "c"), ("pc",)),
              "table": (("pc", "pc", "p"), ("cs", "c", "p", "p")),
              "grad_table": (("pc", "pc", "p", "p", "cs", "c"), ("pc",)),
              # (The logits only give the layout and the number of classes.)
              "classes": (("pc", "p"), ("c",))}


def _table_fns(num_bins: int, softmax: bool, axes: tuple[str, ...]):
  """Histogram mode's forward pass: (logits, masked, labels) -> (slot
  weights, row losses, log-sum-exp, out-of-range flags), natively (the keys
  are counted as they are computed, never stored) and in XLA. The counts
  are summed over ``axes`` before the slots are weighed."""

  def weigh(slots_fn, counts, lse, bad):
    if axes:
      counts = lax.psum(counts, axes)
    omega, losses = slots_fn(counts, num_bins, lse.dtype)
    return omega, losses, lse, bad

  def native(x, masked, labels):
    del masked
    return weigh(_cpu.slot_weights, *_cpu.encode_counts(x, labels, num_bins, softmax))

  def portable(x, masked, labels):
    del x
    keys, lse, bad = _extension.encode_rows(masked, labels, num_bins, softmax)
    return weigh(_extension.slot_weights, _order.count_slots(keys, num_bins), lse, bad)

  return native, portable


def _class_fns(axes: tuple[str, ...]):
  """(logits, labels) -> pixels per class ``[..., C]`` (int32; labels
  outside ``[0, C)`` count for none; XLA's version counts at most 1 per
  class), summed over ``axes``."""

  def total(counts):
    return (lax.psum(counts, axes) if axes else counts,)

  def native(x, labels):
    return total(_cpu.class_counts(labels, x.shape[-1]))

  def portable(x, labels):
    # (Whether each class occurs, 0 or 1: a sum of int32s over the pixels
    # would make XLA materialise them, [..., P, C] of them.)
    classes = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return total(jnp.any(labels[..., None] == classes, axis=-2).astype(jnp.int32))

  return native, portable


def _pixelwise_fns(kind: str, static: tuple, axes: tuple[str, ...] = ()):
  """The native and portable functions of one pass (tuples of results).

  Both take the logits as the loss got them and the same with void pixels
  zeroed: the native passes skip void pixels themselves and read the
  first, XLA's formulas read the second. A program compiled for one
  platform keeps only one of the two. ``axes``: the mesh axes that split
  the pixels, over which the "table" pass sums its counts.
  """
  if kind == "encode":
    return (lambda x, masked, *a: _cpu.encode_rows(x, *a, *static),
            lambda x, masked, *a: _extension.encode_rows(masked, *a, *static))
  if kind == "table":
    num_bins, softmax = static
    return _table_fns(num_bins, softmax, axes)
  if kind == "classes":
    return _class_fns(axes)
  if kind == "grad_table":
    num_bins, softmax = static
    # Both recompute each pixel's key as their own forward pass computed it
    # (the native pass bit for bit: the same code), rather than keep them.
    return (lambda x, masked, lse, labels, omega, ct: (
        _cpu.rows_grad_table(x, labels, omega, ct, softmax),),
            lambda x, masked, lse, labels, omega, ct: (_extension.rows_grad(
                masked, lse, labels, _order.gather_rows(omega, _extension.row_keys(
                    masked, lse, labels, num_bins, softmax)), ct, softmax),))
  return (lambda x, masked, *a: (_cpu.rows_grad(x, *a, *static),),
          lambda x, masked, *a: (_extension.rows_grad(masked, *a, *static),))


def _pixelwise_specs(kind: str, spec: tuple) -> tuple[list[tuple], list[tuple]]:
  """Operand and result specs, laid out like logits of spec ``spec``."""
  ins, outs = _PIXELWISE[kind]
  lead, pixel = tuple(spec[:-2]), spec[-2]
  layout = lambda letters: lead + tuple(pixel if ch == "p" else None
                                        for ch in letters)  # c, s: whole
  return [layout(letters) for letters in ins], [layout(letters) for letters in outs]


@functools.cache
def _native_pixelwise(kind: str, static: tuple):
  """The native pass, with a rule that runs it where the pixels are."""
  native, _ = _pixelwise_fns(kind, static)

  def shardings(mesh, arg_shapes):
    ins, outs = _pixelwise_specs(
        kind, _spec(arg_shapes[0].sharding, arg_shapes[0].ndim))
    return ([NamedSharding(mesh, P(*s)) for s in ins],
            tuple(NamedSharding(mesh, P(*s)) for s in outs))

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    return shardings(mesh, arg_shapes)[1]

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    ins, outs = shardings(mesh, arg_shapes)
    spec = _spec(arg_shapes[0].sharding, arg_shapes[0].ndim)
    local, _ = _pixelwise_fns(kind, static, axis_names(spec[-2]))
    return mesh, local, outs, tuple(ins)

  partitioned = custom_partitioning(native)
  ins, outs = _PIXELWISE[kind]
  rule = (", ".join("... " + " ".join(letters) for letters in ins) + " -> "
          + ", ".join("... " + " ".join(letters) for letters in outs))
  partitioned.def_partition(
      infer_sharding_from_operands=infer, partition=partition,
      sharding_rule=rule,
      need_replication_factors=tuple(ch for ch in "cs" if ch in rule))

  # custom_partitioning has no batching rule; under vmap the mapped axis is
  # one more leading axis of every operand.
  @jax.custom_batching.custom_vmap
  def batchable(*args):
    return partitioned(*args)

  @batchable.def_vmap
  def _batched(axis_size, in_batched, *args):
    args = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
            for a, b in zip(args, in_batched)]
    return batchable(*args), (True,) * len(outs)

  return batchable


def _pixelwise(kind: str, static: tuple, *args: jax.Array,
               axis_name: Any = None) -> tuple[jax.Array, ...]:
  """Runs one pixelwise pass where the pixels are (see ``_PIXELWISE``).

  ``axis_name``: inside ``shard_map``, the mesh axes that split the pixels.
  """
  native_ok = _order.native_ok()
  axes = axis_names(axis_name)
  mesh = None if axes else _sharding.explicit_mesh(args[0])
  if mesh is None:
    native, portable = _pixelwise_fns(kind, static, axes)
    if not native_ok:
      return portable(*args)
    # One device, automatic sharding (the rule splits the work), or inside
    # shard_map (with axis_name, which the rule cannot see).
    return lax.platform_dependent(
        *args, cpu=native if axes else _native_pixelwise(kind, static),
        default=portable)
  # Explicit sharding: each device runs the pass on its own pixels (XLA's
  # formulas too: the histogram's gathers and scatters have no explicit
  # sharding rule of their own).
  spec = _sharding.spec_of(args[0])
  native, portable = _pixelwise_fns(kind, static, axis_names(spec[-2]))
  ins, outs = _pixelwise_specs(kind, spec)
  args = tuple(_sharding.reshard(a, s, like=args[0])
               if _sharding.spec_of(a) != tuple(s) else a
               for a, s in zip(args, ins))
  local = ((lambda *a: lax.platform_dependent(*a, cpu=native, default=portable))
           if native_ok else portable)
  return _shard_map(local, mesh, tuple(P(*s) for s in ins),
                    tuple(P(*s) for s in outs))(*args)


def encode_rows(x: jax.Array, masked: jax.Array, labels: jax.Array, num_bins: int,
                softmax: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``_extension.encode_rows``, on the pixels' devices (native on CPU).

  ``x`` as the loss got it, and ``masked``, the same with void pixels zeroed
  (they are checked alike: void pixels are never out of range). Nothing is
  differentiated through the results (the keys are integers, and the
  log-sum-exp serves only the hand-written VJP).
  """
  x, masked = lax.stop_gradient((x, masked))
  keys, lse, bad = _pixelwise("encode", (num_bins, softmax), x, masked, labels)
  return keys, lse, bad


def histogram_table(x: jax.Array, masked: jax.Array, labels: jax.Array,
                    num_bins: int, softmax: bool, axis_name: Any = None
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Histogram mode's rows, from the pixels, on the pixels' devices.

  ``x`` and ``masked`` as for ``encode_rows``. Each row's keys
  (``encode_rows``) are counted per slot where its pixels are (natively on
  CPU, without storing them), the counts summed over the devices that split
  the row (``axis_name`` inside ``shard_map``, or the mesh axes of an
  explicitly or automatically sharded pixel axis), and weighed.

  Returns:
    The slot weights ``[..., C, 2K + 1]`` and losses ``[..., C]`` of whole
    rows, the log-sum-exp and the out-of-range flags ``[..., P]``.
  """
  x, masked = lax.stop_gradient((x, masked))
  omega, losses, lse, bad = _pixelwise("table", (num_bins, softmax), x, masked,
                                       labels, axis_name=axis_name)
  return omega, losses, lse, bad


def class_counts(x: jax.Array, labels: jax.Array, axis_name: Any = None) -> jax.Array:
  """Which classes occur: int32 ``[..., C]``, positive where some pixel of
  the int32 labels ``[..., P]`` carries the class (natively the number of
  such pixels; a label outside ``[0, C)``, void included, counts for none),
  summed over the devices that split the pixels, like
  ``histogram_table``'s counts. ``x``: the logits ``[..., P, C]``, which
  give the layout."""
  return _pixelwise("classes", (), lax.stop_gradient(x), labels,
                    axis_name=axis_name)[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7))
def rows_grad(x: jax.Array, masked: jax.Array, lse: jax.Array, labels: jax.Array,
              w: jax.Array, ct: jax.Array, softmax: bool,
              num_bins: int = 0) -> jax.Array:
  """``_extension.rows_grad``, on the pixels' devices (native on CPU).

  ``x`` as the loss got it, and ``masked``, the same with void pixels zeroed
  (what XLA's formula reads; the native pass skips void pixels itself).
  ``w``: the weights ``[..., C, P]``; in histogram mode (``num_bins``), the
  slot weights ``[..., C, 2K + 1]`` of ``histogram_table``, each pixel's
  weight being its slot's (its key recomputed from ``x``).
  Differentiable (Hessian-vector products differentiate the losses' backward
  pass): its derivative is that of the XLA formula.
  """
  if num_bins:
    return _pixelwise("grad_table", (num_bins, softmax), x, masked, lse, labels, w,
                      ct)[0]
  return _pixelwise("grad", (softmax,), x, masked, lse, labels, w, ct)[0]


@rows_grad.defjvp
def _rows_grad_jvp(softmax, num_bins, primals, tangents):
  x, masked, lse, labels, w, ct = primals
  _, t_masked, t_lse, _, t_w, t_ct = tangents
  weights, t_weights = w, t_w
  if num_bins:  # linear in the slot weights
    keys = _extension.row_keys(masked, lse, labels, num_bins, softmax)
    weights, t_weights = (_order.gather_rows(o, keys) for o in (w, t_w))
  formula = lambda a, b, v, c: _extension.rows_grad(a, b, labels, v, c, softmax)
  _, tangent = jax.jvp(formula, (masked, lse, weights, ct),
                       (t_masked, t_lse, t_weights, t_ct))
  return rows_grad(x, masked, lse, labels, w, ct, softmax, num_bins), tangent


def reduce_counts(fn: Any, arrays: tuple, *, keep: int = 0,
                  axis_name: Any = None) -> jax.Array:
  """Integer counts of ``arrays``, summed over the devices that split them.

  The metrics' one rule: each device counts its own block, and only the
  counts cross devices (one all-reduce); no pixel is gathered.

  Args:
    fn: ``fn(*blocks)`` counts the blocks of ``arrays`` (same-shaped arrays,
      or None) into an integer array whose first ``keep`` axes are the
      blocks' first ``keep`` axes (0: a total; 1: one count per image).
    arrays: the inputs, all of one shape.
    keep: how many leading axes the counts keep.
    axis_name: inside ``shard_map``, the mesh axes to sum over (the axes
      that split the counted pixels).

  Returns:
    The counts of the whole arrays: with ``axis_name``, the same on every
    device over those axes; on an explicit mesh, laid out like the arrays'
    first ``keep`` axes; otherwise as the partitioner lays them out.
  """
  axes = axis_names(axis_name)
  if axes:
    return lax.psum(fn(*arrays), axes)
  present = [a for a in arrays if a is not None]
  like = present[0]
  mesh = _sharding.explicit_mesh(like)
  if mesh is None:  # one device, automatic sharding, or none
    return fn(*arrays)
  spec = next((s for s in map(_sharding.spec_of, present) if any(s)),
              _sharding.spec_of(like))
  present = [_sharding.match(a, spec, like) for a in present]
  summed = tuple(a for entry in spec[keep:] for a in axis_names(entry))
  # (Explicit shardings always divide their axes: nothing to pad.)
  slots = [a is not None for a in arrays]

  def local(*blocks):
    it = iter(blocks)
    counts = fn(*(next(it) if s else None for s in slots))
    return lax.psum(counts, summed) if summed else counts

  counts = _shard_map(local, mesh, tuple(P(*spec) for _ in present),
                      P(*spec[:keep]))(*present)
  return counts


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def row_losses(errors: jax.Array, fg: jax.Array, valid: jax.Array,
               num_bins: int = 0, axis_name: Any = None,
               spans_batch: bool = False) -> jax.Array:
  """Lovász extension of the Jaccard loss for each row ``[..., P] -> [...]``.

  The derivative with respect to ``errors`` is each pixel's weight (0 at
  void pixels): the extension is linear once the order is fixed, so nothing
  is differentiated through the sort. With ``num_bins > 0`` the errors
  (which must lie in [0, 1]) are quantised to that many bins first
  (histogram mode, no sort; the value moves by at most ``1 / (2 num_bins)``).
  With ``axis_name`` (inside ``shard_map``) each row's pixels are split over
  those mesh axes; the losses are those of the whole rows.
  """
  keys = _extension.encode(errors, fg, valid, num_bins)
  return row_weights(keys, num_bins, axis_name, spans_batch)[1]


@row_losses.defjvp
def _row_losses_jvp(num_bins, axis_name, spans_batch, primals, tangents):
  errors, fg, valid = primals
  keys = _extension.encode(errors, fg, valid, num_bins)
  w, losses = row_weights(keys, num_bins, axis_name, spans_batch)
  # A plain reduce, not _extension.row_dot: these rows may be sharded over
  # their pixels on an explicit mesh, where a reduce is summed over the
  # devices but row_dot's blocks would cut across them.
  tangent = jnp.sum(tangents[0] * w, axis=-1)
  if axis_name is not None:  # each device holds a part of every row
    tangent = lax.psum(tangent, axis_name)
  return losses, tangent
