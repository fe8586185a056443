"""Validation and canonical form of loss inputs, shared by every loss.

Everything here runs at trace time, on shapes, dtypes and Python option
values, so errors are raised before anything is compiled. The checks that
need values (labels outside ``[0, C)``, probabilities outside ``[0, 1]``,
class weights that are negative, not finite or all zero) run only when the
values are concrete; under ``jax.jit`` the loss reports them with a NaN loss
and a NaN gradient instead (``poison``).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def as_float(x: jax.typing.ArrayLike, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}.")
  return x


def as_int(x: jax.typing.ArrayLike, name: str) -> jax.Array:
  """An integer array (booleans become int32); the dtype is kept otherwise."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.int32)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(
        f"{name} must be an integer array, got dtype {x.dtype}. Cast them "
        f"with {name}.astype(jnp.int32).")
  return x


def _no_bool(value: Any, name: str, what: str) -> None:
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be {what}, got {value!r}.")


def compute_dtype(dtype) -> Any:
  """At least float32: bfloat16 and float16 inputs are computed in float32."""
  return jnp.promote_types(dtype, jnp.float32)


def check_axis(axis: Any, ndim: int, name: str = "axis") -> int:
  _no_bool(axis, name, "an int")
  try:
    axis = operator.index(axis)
  except TypeError:
    raise TypeError(f"{name} must be an int, got {axis!r}.") from None
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"{name}={axis} is out of range for logits with {ndim} dimensions.")
  return axis % ndim


def check_static_bool(value: Any, name: str) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a Python bool, got {value!r}.")
  return bool(value)


def check_positive_int(value: Any, name: str) -> int:
  _no_bool(value, name, "a positive int")
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(f"{name} must be a positive int, got {value!r}.") from None
  if value < 1:
    raise ValueError(f"{name} must be a positive int, got {value}.")
  return value


def check_method(method: Any, num_bins: Any) -> int:
  """Validates ``method``/``num_bins``; returns the bins to use (0 = exact).

  ``num_bins`` only matters for ``method="histogram"``; with ``"sort"`` it
  is ignored (any value).
  """
  if method not in ("sort", "histogram"):
    raise ValueError(f'method must be "sort" or "histogram", got {method!r}.')
  if method == "sort":
    return 0
  num_bins = check_positive_int(num_bins, "num_bins")
  if num_bins > 2**24:
    raise ValueError(f"num_bins must be at most 2**24, got {num_bins}.")
  return num_bins


def check_ignore_index(ignore_index: Any) -> int | None:
  if ignore_index is None:
    return None
  _no_bool(ignore_index, "ignore_index", "an int or None")
  try:
    return operator.index(ignore_index)
  except TypeError:
    raise TypeError(
        f"ignore_index must be an int or None, got {ignore_index!r}.") from None


def check_classes(classes: Any, num_classes: int) -> str | tuple[int, ...]:
  """``"present"``, ``"all"`` or a tuple of distinct class ids in [0, C)."""
  if isinstance(classes, str):
    if classes not in ("present", "all"):
      raise ValueError(
          f'classes must be "present", "all" or a sequence of class ids, got '
          f"{classes!r}.")
    return classes
  if isinstance(classes, jax.Array | np.ndarray):
    if isinstance(classes, jax.core.Tracer):
      raise TypeError(
          "classes must be static (a Python sequence of ints); got a traced "
          "array. Use class_weights to weight classes with traced values.")
    classes = np.asarray(classes).reshape(-1).tolist()
  if not isinstance(classes, Sequence):
    raise TypeError(
        f'classes must be "present", "all" or a sequence of class ids, got '
        f"{classes!r}.")
  ids = []
  for c in classes:
    try:
      c = operator.index(c)
    except TypeError:
      raise TypeError(f"classes must hold ints, got {c!r}.") from None
    if not 0 <= c < num_classes:
      raise ValueError(
          f"class id {c} in classes is outside [0, {num_classes}) for logits "
          f"with {num_classes} classes.")
    ids.append(c)
  if not ids:
    raise ValueError("classes must not be empty.")
  if len(set(ids)) != len(ids):
    raise ValueError(f"classes has repeated ids: {tuple(ids)}.")
  return tuple(ids)


def check_where(where: jax.typing.ArrayLike | None, shape: tuple[int, ...],
                what: str) -> jax.Array | None:
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise TypeError(f"where must be a boolean array, got dtype {where.dtype}.")
  if where.shape != shape:
    raise ValueError(
        f"where must have the shape of {what} {shape}, got {where.shape}.")
  return where


def is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def spans_processes(*xs) -> bool:
  """Whether some array is split over devices that other processes own.

  In a multi-process run (``jax.distributed``) no process can read such an
  array whole, so the value checks below run as a small program on every
  process instead, and every process raises the same error.
  """
  return any(isinstance(x, jax.Array) and not x.is_fully_addressable
             and not x.is_fully_replicated for x in xs if x is not None)


def host_array(x: Any) -> np.ndarray:
  """A small concrete array (class weights, a confusion matrix) in NumPy.

  An array split over several processes is gathered to every process first
  (every process must make this call, as with any computation on it).
  """
  if spans_processes(x):
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


@jax.jit
def bad_summary(values: jax.Array, bad: jax.Array):
  """How many ``values[bad]`` there are, how many are NaN, and their range.

  A few scalars, the same on every process: what a check of an array that
  spans processes can report without gathering the array.
  """
  floating = jnp.issubdtype(values.dtype, jnp.floating)
  nan = bad & jnp.isnan(values) if floating else jnp.zeros_like(bad)
  rest = bad & ~nan
  if floating:
    top, bottom = jnp.array(jnp.inf, values.dtype), jnp.array(-jnp.inf, values.dtype)
  else:
    info = jnp.iinfo(values.dtype)
    top, bottom = jnp.array(info.max, values.dtype), jnp.array(info.min, values.dtype)
  return (jnp.sum(bad, dtype=jnp.int32), jnp.sum(nan, dtype=jnp.int32),
          jnp.min(jnp.where(rest, values, top)),
          jnp.max(jnp.where(rest, values, bottom)))


def describe(summary) -> str | None:
  """``bad_summary``'s verdict in words, or None when nothing is bad."""
  count, nan, low, high = (np.asarray(v).item() for v in summary)
  if not count:
    return None
  parts = []
  if count > nan:
    parts.append(f"{low}" if low == high else f"values from {low} to {high}")
  if nan:
    parts.append(f"{nan} NaN")
  return (f"{count} entries ({', '.join(parts)}; the array spans several "
          "processes, so only its range is shown)")


def check_axis_name(axis_name: Any) -> tuple[str, ...] | None:
  """``axis_name``: None, a mesh axis name, or a tuple of names.

  The names must be bound, i.e. the loss must run inside ``shard_map`` (or
  another transformation) over those mesh axes.
  """
  if axis_name is None:
    return None
  names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  if not names or not all(isinstance(n, str) for n in names):
    raise TypeError(
        "axis_name must be a mesh axis name or a tuple of names, got "
        f"{axis_name!r}.")
  for name in names:
    try:
      jax.lax.axis_size(name)
    except NameError:
      raise ValueError(
          f"axis_name={axis_name!r}: axis {name!r} is not bound here. Pass "
          "axis_name only inside jax.shard_map over a mesh with that axis; "
          "under jax.jit with sharded inputs, leave it None.") from None
  return names


def check_image_axis_name(image_axis_name: Any,
                          axis_name: tuple[str, ...] | None
                          ) -> tuple[str, ...] | None:
  """``image_axis_name``: mesh axes among ``axis_name`` that split images."""
  if image_axis_name is None:
    return None
  names = check_axis_name(image_axis_name)
  if names is None or axis_name is None or not set(names) <= set(axis_name):
    raise ValueError(
        f"image_axis_name={image_axis_name!r} must name mesh axes among "
        f"axis_name={axis_name!r}: the axes of the shard_map that split each "
        "image's pixels (the others split the batch).")
  return names


def _in_dtype(value: int, dtype) -> bool:
  info = np.iinfo(np.int32 if dtype == jnp.bool_ else dtype)
  return info.min <= value <= info.max


def valid_mask(labels: jax.Array, ignore_index: int | None,
               where: jax.Array | None) -> jax.Array:
  """``where & (labels != ignore_index)``, compared in the labels' own dtype."""
  valid = jnp.ones(labels.shape, bool) if where is None else where
  if ignore_index is not None and _in_dtype(ignore_index, labels.dtype):
    valid = valid & (labels != ignore_index)
  return valid


def out_of_range(labels: jax.Array, low: int, high: int) -> jax.Array:
  """Labels outside ``[low, high)``, compared in the labels' own dtype.

  No narrowing happens first, so int64 labels of 2**31 or more (with
  ``jax_enable_x64``) are out of range, not wrapped into a class.
  """
  if labels.dtype == jnp.bool_:
    labels = labels.astype(jnp.int32)
  bad = jnp.zeros(labels.shape, bool)
  info = np.iinfo(labels.dtype)
  if low > info.min:
    bad = bad | (labels < low)
  if high <= info.max:
    bad = bad | (labels >= high)
  return bad


def narrow_labels(labels: jax.Array, valid: jax.Array, low: int,
                  high: int) -> jax.Array:
  """int32 labels; invalid or out-of-range entries become ``low - 1``."""
  ok = valid & ~out_of_range(labels, low, high)
  return jnp.where(ok, jnp.where(ok, labels, low).astype(jnp.int32), low - 1)


def has_bad_labels(labels: jax.Array, valid: jax.Array, low: int,
                   high: int) -> jax.Array:
  return jnp.any(valid & out_of_range(labels, low, high))


def _show(values: np.ndarray) -> str:
  shown = ", ".join(str(v) for v in values[:5])
  return shown + ("" if len(values) <= 5 else f" and {len(values) - 5} more")


def _np_valid(labels: np.ndarray, ignore_index: int | None,
              where: jax.Array | None) -> np.ndarray:
  valid = np.ones(labels.shape, bool) if where is None else np.asarray(where)
  if ignore_index is not None:
    valid = valid & (labels != ignore_index)
  return valid


def check_label_range(labels: jax.Array, low: int, high: int,
                      ignore_index: int | None, where: jax.Array | None,
                      what: str) -> None:
  """Raises ValueError for valid labels outside ``[low, high)``, if concrete.

  Under a trace this check cannot run; callers turn such labels into a NaN
  loss and gradient instead (see ``has_bad_labels`` and ``poison``).
  """
  if not is_concrete(labels, where):
    return
  if spans_processes(labels, where):
    found = describe(_global_bad_labels(labels, where, low=low, high=high,
                                         ignore_index=ignore_index))
    if found:
      raise ValueError(
          f"labels hold values outside [{low}, {high}) for {what}: {found}.")
    return
  # NumPy only: inside a trace, jnp ops on constants would give tracers.
  lab = np.asarray(labels)
  valid = _np_valid(lab, ignore_index, where)
  bad = valid & ((lab < low) | (lab >= high))
  if bad.any():
    values = np.unique(lab[bad])
    hint = (f" If {values[0]} marks void pixels, pass ignore_index={values[0]}."
            if ignore_index is None else "")
    raise ValueError(
        f"labels hold values outside [{low}, {high}) for {what}: "
        f"{_show(values)}." + hint)


@functools.partial(jax.jit, static_argnames=("low", "high", "ignore_index"))
def _global_bad_labels(labels, where, *, low, high, ignore_index):
  bad = valid_mask(labels, ignore_index, where) & out_of_range(labels, low, high)
  return bad_summary(labels, bad)


def check_probabilities(probs: Any, labels: Any, ignore_index: int | None,
                        where: Any, channel_axis: int | None) -> None:
  """``from_logits=False``: valid pixels' values must lie in ``[0, 1]``.

  Checked when concrete; under a trace the loss is NaN instead. With
  ``channel_axis`` (softmax) every class of a valid pixel is checked.
  """
  if not is_concrete(probs, labels, where):
    return
  if spans_processes(probs, labels, where):
    found = describe(_global_bad_probabilities(
        probs, labels, where, ignore_index=ignore_index,
        channel_axis=channel_axis))
    if found:
      raise ValueError(
          "with from_logits=False the inputs must be probabilities in [0, 1], "
          f"but valid pixels hold {found}. Pass from_logits=True for logits.")
    return
  p = np.asarray(probs)
  valid = _np_valid(np.asarray(labels), ignore_index, where)
  if channel_axis is not None:
    p = np.moveaxis(p, channel_axis, -1)
    valid = np.broadcast_to(valid[..., None], p.shape)
  bad = valid & ~((p >= 0) & (p <= 1))
  if bad.any():
    raise ValueError(
        "with from_logits=False the inputs must be probabilities in [0, 1], "
        f"but valid pixels hold {_show(np.unique(p[bad]))}. Pass "
        "from_logits=True for logits.")


@functools.partial(jax.jit, static_argnames=("ignore_index", "channel_axis"))
def _global_bad_probabilities(probs, labels, where, *, ignore_index,
                              channel_axis):
  valid = valid_mask(labels, ignore_index, where)
  if channel_axis is not None:
    valid = jnp.expand_dims(valid, channel_axis)
  return bad_summary(probs, valid & ~((probs >= 0) & (probs <= 1)))


def bad_probabilities(probs: jax.Array, valid: jax.Array) -> jax.Array:
  return jnp.any(valid & ~((probs >= 0) & (probs <= 1)))


def bad_logits(logits: jax.Array, valid: jax.Array) -> jax.Array:
  """NaN or infinite logits at valid pixels (they make the loss NaN)."""
  return jnp.any(valid & ~jnp.isfinite(logits))


def check_class_weights(class_weights: Any, num_classes: int) -> jax.Array | None:
  """Shape and dtype at trace time; values when concrete.

  Weights must be finite and non-negative with a positive entry. Under a
  trace the value check cannot run; the loss is then NaN for such weights
  (``bad_class_weights``).
  """
  if class_weights is None:
    return None
  class_weights = jnp.asarray(class_weights)
  if class_weights.shape != (num_classes,):
    raise ValueError(
        f"class_weights must have shape ({num_classes},) (one per class), "
        f"got {class_weights.shape}.")
  if not (jnp.issubdtype(class_weights.dtype, jnp.floating)
          or jnp.issubdtype(class_weights.dtype, jnp.integer)):
    raise TypeError(
        f"class_weights must be numeric, got dtype {class_weights.dtype}.")
  if is_concrete(class_weights):
    w = host_array(class_weights).astype(np.float64)
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
      raise ValueError(
          "class_weights must be finite and non-negative, got "
          f"{_show(w[bad])} at class {_show(np.flatnonzero(bad))}.")
    if not (w > 0).any():
      raise ValueError(
          "class_weights are all zero, so no class would count; give at least "
          "one class a positive weight.")
  return class_weights


def bad_class_weights(class_weights: jax.Array | None) -> jax.Array:
  if class_weights is None:
    return jnp.zeros((), bool)
  w = class_weights
  return jnp.any(~jnp.isfinite(w) | (w < 0)) | jnp.all(w == 0)


def poison(bad: jax.Array, axis_name=None) -> jax.Array:
  """1, or NaN when ``bad``: the factor that reports bad input.

  The losses multiply their value by it on the way out, and pass their
  logits through ``nan_gradient_if`` with it on the way in. With
  ``axis_name`` a bad input on any device poisons every device.
  """
  if axis_name is not None:
    bad = jax.lax.psum(bad.astype(jnp.int32), axis_name) > 0
  return jnp.where(bad, jnp.nan, 1.0)


@jax.custom_jvp
def nan_gradient_if(x: jax.Array, factor: jax.Array) -> jax.Array:
  """``x``, whose derivative is multiplied by ``factor`` (1, or NaN).

  Applied to the logits on the way in, this makes every entry of the
  gradient NaN for bad input, since nothing after it can mask a NaN (a
  select or a masked reduction after it could), so ``optax.apply_if_finite``
  skips the step and NaN monitors see it. The value is ``x`` itself, so
  nothing is computed or stored in the forward pass, and for good input the
  factor is exactly 1.
  """
  del factor
  return x


@nan_gradient_if.defjvp
def _nan_gradient_if_jvp(primals, tangents):
  x, factor = primals
  return x, tangents[0] * factor.astype(tangents[0].dtype)


def row_dims(pixel_dims: Sequence[Any],
             split_axes: tuple[str, ...] | None) -> tuple[Any, ...]:
  """The sizes whose product is one row's length.

  ``pixel_dims`` are a row's dimensions on this device; rows split over the
  devices along ``split_axes`` (inside ``shard_map``) are that many times
  longer. Sizes may be symbolic (``jax.export``).
  """
  devices = tuple(jax.lax.axis_size(a) for a in split_axes or ())
  return tuple(pixel_dims) + devices


def check_row_length(dims: tuple[Any, ...], what: str) -> None:
  """Raises when a row of ``prod(dims)`` pixels cannot be counted in int32.

  Symbolic sizes cannot be compared here; ``row_too_long`` checks them at
  run time.
  """
  if not all(isinstance(d, int) for d in dims):
    return
  pixels = math.prod(dims)
  if pixels > 2**31 - 1:
    raise ValueError(
        f"{what} has {pixels} pixels in one row; lovasz_jax counts pixels "
        "in int32, so a row (one class of the batch, or of one image with "
        "per_image=True) may hold at most 2**31 - 1 pixels. Use "
        "per_image=True or smaller batches.")


def row_too_long(dims: tuple[Any, ...]) -> jax.Array | bool:
  """Whether a row of ``prod(dims)`` pixels passes 2**31 - 1, at run time.

  Only symbolic sizes (``jax.export`` with shape polymorphism) need it;
  concrete sizes raise in ``check_row_length`` when traced. The product is
  built one factor at a time in int32 and compared before each multiply
  (``size <= limit // d``), so it cannot wrap. An empty row is never too
  long.
  """
  if all(isinstance(d, int) for d in dims):
    return False
  limit = 2**31 - 1
  size, over, empty = jnp.int32(1), jnp.bool_(False), jnp.bool_(False)
  for d in dims:
    d = jnp.asarray(d, jnp.int32)
    empty |= d == 0
    over |= size > limit // jnp.maximum(d, 1)
    size = jnp.where(over, 1, size * d)
  return over & ~empty
