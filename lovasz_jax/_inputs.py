"""Validation and canonical form of loss inputs, shared by every loss.

Everything here runs at trace time, on shapes, dtypes and Python option
values, so errors are raised before anything is compiled. The one check that
needs values (labels outside ``[0, C)``) runs only when the labels are
concrete; under ``jax.jit`` the loss reports such labels as NaN instead.
"""

from __future__ import annotations

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
  x = jnp.asarray(x)
  if not (jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_):
    raise TypeError(
        f"{name} must be an integer array, got dtype {x.dtype}. Cast them "
        "with labels.astype(jnp.int32).")
  return x


def compute_dtype(dtype) -> Any:
  """At least float32: bfloat16 and float16 inputs are computed in float32."""
  return jnp.promote_types(dtype, jnp.float32)


def check_axis(axis: Any, ndim: int, name: str = "axis") -> int:
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
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(f"{name} must be a positive int, got {value!r}.") from None
  if value < 1:
    raise ValueError(f"{name} must be a positive int, got {value}.")
  return value


def check_method(method: Any, num_bins: Any) -> int:
  """Validates ``method``/``num_bins``; returns the bins to use (0 = exact)."""
  if method not in ("sort", "histogram"):
    raise ValueError(f'method must be "sort" or "histogram", got {method!r}.')
  num_bins = check_positive_int(num_bins, "num_bins")
  if num_bins > 2**24:
    raise ValueError(f"num_bins must be at most 2**24, got {num_bins}.")
  return num_bins if method == "histogram" else 0


def check_ignore_index(ignore_index: Any) -> int | None:
  if ignore_index is None:
    return None
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


def valid_mask(labels: jax.Array, ignore_index: int | None,
               where: jax.Array | None) -> jax.Array:
  valid = jnp.ones(labels.shape, bool) if where is None else where
  if ignore_index is not None:
    valid = valid & (labels != ignore_index)
  return valid


def check_label_range(labels: jax.Array, low: int, high: int,
                      ignore_index: int | None, where: jax.Array | None,
                      what: str) -> None:
  """Raises ValueError for valid labels outside ``[low, high)``, if concrete.

  Under a trace this check cannot run; callers turn such labels into a NaN
  loss instead (see ``has_bad_labels``).
  """
  if not is_concrete(labels, where):
    return
  # NumPy only: inside a trace, jnp ops on constants would give tracers.
  lab = np.asarray(labels)
  valid = np.ones(lab.shape, bool) if where is None else np.asarray(where)
  if ignore_index is not None:
    valid = valid & (lab != ignore_index)
  bad = valid & ((lab < low) | (lab >= high))
  if bad.any():
    values = np.unique(lab[bad])
    shown = ", ".join(str(v) for v in values[:5])
    more = "" if len(values) <= 5 else f" and {len(values) - 5} more"
    hint = (f" If {values[0]} marks void pixels, pass ignore_index={values[0]}."
            if ignore_index is None else "")
    raise ValueError(
        f"labels hold values outside [{low}, {high}) for {what}: {shown}{more}."
        + hint)


def has_bad_labels(labels: jax.Array, valid: jax.Array, low: int,
                   high: int) -> jax.Array:
  return jnp.any(valid & ((labels < low) | (labels >= high)))
