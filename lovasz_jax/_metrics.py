"""Segmentation metrics: confusion matrix, per-class IoU and mean IoU.

The confusion matrix is built with static shapes (a masked scatter-add of
integer counts), so it compiles once under ``jax.jit`` and can be summed over
batches. IoU and mean IoU are computed from the summed matrix, which gives the
dataset-level scores (not a mean of per-batch scores).

Counts of a whole data set can pass 2**31 - 1, which int32 (the default JAX
integer) cannot hold: accumulate them in NumPy int64 on the host (or in int64
on device with x64 enabled). Given concrete counts, :func:`iou_per_class` and
:func:`mean_iou` compute on the host in float64 from the counts as given, so
no count is truncated to int32.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lovasz_jax import _distribute
from lovasz_jax import _inputs
from lovasz_jax import _sharding

# The int32 counts and flat indices of confusion_matrix hold at most this.
_INT32_MAX = 2**31 - 1
# The largest C with C * C (the flat index of the dropped pixels) <= _INT32_MAX.
_MAX_CLASSES = 46340


def _check_num_classes(num_classes: Any) -> int:
  if isinstance(num_classes, jax.core.Tracer):
    raise TypeError(
        "num_classes must be a static Python int, got a traced value. Mark it "
        "static in jax.jit (static_argnames=('num_classes',)).")
  if isinstance(num_classes, (bool, np.bool_)):
    raise TypeError(f"num_classes must be a positive int, got {num_classes!r}.")
  num_classes = _inputs.check_positive_int(num_classes, "num_classes")
  if num_classes > _MAX_CLASSES:
    raise ValueError(
        f"num_classes must be at most {_MAX_CLASSES} (C * C int32 matrix "
        f"entries), got {num_classes}.")
  return num_classes


def _as_ids(x: jax.typing.ArrayLike, name: str, hint: str) -> jax.Array:
  """``x`` as a JAX integer (or bool) array; TypeError naming ``name``."""
  x = jnp.asarray(x)
  if not (jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_):
    raise TypeError(
        f"{name} must be an integer array, got dtype {x.dtype}. {hint}")
  return x


def _check_ranges(predictions: Any, labels: Any, where: jax.Array | None,
                  num_classes: int, ignore_index: int | None) -> None:
  """Raises ValueError for valid pixels with ids outside [0, C).

  Called only on concrete ids, as passed by the caller (before JAX turns
  64-bit ids into int32, which would wrap 2**32 to 0). Under a trace this
  check cannot run; such pixels are then not counted.
  """
  _inputs.check_label_range(labels, 0, num_classes, ignore_index, where,
                            f"num_classes={num_classes}")
  if _inputs.spans_processes(predictions, labels, where):
    summary = _inputs.describe(_global_bad_predictions(
        jnp.asarray(predictions), labels, where, num_classes=num_classes,
        ignore_index=ignore_index))
    if summary:
      raise ValueError(
          f"predictions hold values outside [0, {num_classes}) for num_classes="
          f"{num_classes}: {summary}. Predictions must be class ids, e.g. "
          "jnp.argmax(logits, axis=-1).")
    return
  # NumPy only: inside a trace, jnp ops on constants would give tracers.
  lab, pred = np.asarray(labels), np.asarray(predictions)
  valid = np.ones(lab.shape, bool) if where is None else np.asarray(where)
  if ignore_index is not None:
    valid = valid & (lab != ignore_index)
  bad = valid & ((pred < 0) | (pred >= num_classes))
  if bad.any():
    found = np.unique(pred[bad])
    shown = ", ".join(str(x) for x in found[:5])
    more = "" if len(found) <= 5 else f" and {len(found) - 5} more"
    raise ValueError(
        f"predictions hold values outside [0, {num_classes}) for num_classes="
        f"{num_classes}: {shown}{more}. Predictions must be class ids, e.g. "
        "jnp.argmax(logits, axis=-1).")


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index"))
def _global_bad_predictions(predictions, labels, where, *, num_classes,
                            ignore_index):
  bad = (_inputs.valid_mask(labels, ignore_index, where)
         & _inputs.out_of_range(predictions, 0, num_classes))
  return _inputs.bad_summary(predictions, bad)


def confusion_matrix(
    predictions: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    num_classes: int,
    *,
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  """The ``[C, C]`` confusion matrix of integer predictions against labels.

  Entry ``[i, j]`` counts the valid pixels with true label ``i`` predicted as
  ``j`` (rows: labels, columns: predictions). A pixel is valid when ``where``
  is true and its label is not ``ignore_index``. Matrices of several batches
  add up: sum them, then call :func:`iou_per_class` or :func:`mean_iou`.

  Out-of-range ids: a concrete call raises ``ValueError`` when a valid pixel
  has a label or a prediction outside ``[0, C)``. Under ``jax.jit`` that
  check cannot run, and such pixels are left out of the matrix (they count
  nowhere, like void pixels).

  ``num_classes`` and ``ignore_index`` are Python values; to jit the function
  with them as arguments, use
  ``jax.jit(confusion_matrix, static_argnames=("num_classes", "ignore_index"))``.

  Args:
    predictions: integer class ids of any shape, e.g.
      ``jnp.argmax(logits, axis=-1)`` for channels-last logits ``[B, H, W, C]``.
    labels: integer true class ids, the predictions' shape.
    num_classes: the number of classes ``C`` (a Python int).
    ignore_index: label value of void pixels; they are not counted.
    where: optional boolean mask of the predictions' shape; pixels where it is
      false are not counted. Combines with ``ignore_index``.
    axis_name: inside ``jax.shard_map``, the mesh axes (a name or a tuple of
      names) over which the pixels are split: each device counts its own
      block, and the matrix is summed over those axes (one all-reduce of
      ``C * C`` counts), so every device returns the global counts. Outside
      ``shard_map`` leave it None: sharded arguments (explicit or automatic
      meshes, under ``jax.jit`` or ``jax.set_mesh``, eagerly, across
      processes) are counted where they lie, and only the counts cross
      devices.

  Counts: the matrix is int32, exact up to 2**31 - 1 per entry. One call
  cannot pass that: it raises ``ValueError`` for inputs of 2**31 pixels or
  more (split the batch), and for ``num_classes`` above 46340. (With
  symbolic sizes, under ``jax.export``, the size is checked when the program
  runs: past the limit every entry is -1, which :func:`iou_per_class` and
  :func:`mean_iou` reject, or turn into NaN under ``jax.jit``.) A sum of
  matrices can: summed in int32 (as JAX does by default), an entry past
  2**31 - 1 wraps to negative counts, about 2,000 images of 1024x1024 pixels
  for one class. To score a whole data set, accumulate on the host in NumPy
  int64::

    total = np.zeros((C, C), np.int64)
    for preds, labels in batches:
      total += np.asarray(confusion_matrix(preds, labels, C))
    miou = mean_iou(total)

  (one device-to-host copy of ``C * C`` ints per batch), or on device in
  int64 with x64 enabled. :func:`iou_per_class` and :func:`mean_iou` read
  int64 counts without truncating them, and reject negative counts.

  Returns:
    An int32 ``[C, C]`` array of counts (exact up to 2**31 - 1 per entry).

  Examples:
    >>> import jax.numpy as jnp, lovasz_jax
    >>> labels = jnp.array([0, 0, 1, 1, 255])
    >>> preds = jnp.array([0, 1, 1, 1, 0])
    >>> lovasz_jax.confusion_matrix(preds, labels, 2, ignore_index=255).tolist()
    [[1, 1], [0, 2]]
  """
  raw_predictions, raw_labels = predictions, labels
  predictions = _as_ids(
      predictions, "predictions",
      "Pass class ids, e.g. jnp.argmax(logits, axis=-1).")
  labels = _as_ids(labels, "labels",
                   "Cast them with labels.astype(jnp.int32).")
  num_classes = _check_num_classes(num_classes)
  if predictions.shape != labels.shape:
    raise ValueError(
        f"predictions and labels must have the same shape, got predictions "
        f"{predictions.shape} and labels {labels.shape}. Pass class ids "
        "(jnp.argmax(logits, axis=-1)), not logits.")
  axis_name = _inputs.check_axis_name(axis_name)
  dims = _inputs.row_dims(labels.shape, axis_name)
  if all(isinstance(d, int) for d in dims) and math.prod(dims) > _INT32_MAX:
    raise ValueError(
        f"confusion_matrix counts at most 2**31 - 1 pixels per call (int32 "
        f"counts), got {math.prod(dims)}. Split the batch and add the matrices "
        "in NumPy int64.")
  ignore_index = _inputs.check_ignore_index(ignore_index)
  where = _inputs.check_where(where, labels.shape, "labels")
  if _inputs.is_concrete(predictions, labels, where):
    _check_ranges(raw_predictions, raw_labels, where, num_classes,
                  ignore_index)
  return _confusion_impl(predictions, labels, where, num_classes=num_classes,
                         ignore_index=ignore_index, axis_name=axis_name)


@functools.partial(jax.jit,
                   static_argnames=("num_classes", "ignore_index", "axis_name"))
def _confusion_impl(predictions, labels, where, *, num_classes, ignore_index,
                    axis_name):
  count = functools.partial(_count_block, num_classes=num_classes,
                            ignore_index=ignore_index)
  counts = _distribute.reduce_counts(count, (predictions, labels, where),
                                     axis_name=axis_name)
  return counts.reshape(num_classes, num_classes)


def _count_block(predictions, labels, where, *, num_classes, ignore_index):
  """The ``[C * C]`` counts of one block of pixels (one device's)."""
  labels = labels.reshape(-1)
  predictions = predictions.reshape(-1)
  if where is not None:
    where = where.reshape(-1)
  # Ranges are checked in the ids' own dtypes, before any narrowing, so that
  # 64-bit ids (with x64) past 2**31 are out of range, not wrapped.
  valid = _inputs.valid_mask(labels, ignore_index, where)
  counted = valid & ~(_inputs.out_of_range(labels, 0, num_classes)
                      | _inputs.out_of_range(predictions, 0, num_classes))
  labels = jnp.where(counted, labels, 0).astype(jnp.int32)
  predictions = jnp.where(counted, predictions, 0).astype(jnp.int32)
  # Pixels that do not count go to an index past the end, which is dropped.
  index = jnp.where(counted, labels * num_classes + predictions,
                    num_classes * num_classes)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32)
  counts = counts.at[index].add(1, mode="drop")
  # Symbolic sizes (jax.export) are checked here, not when traced: past
  # 2**31 - 1 pixels every entry is -1, which the IoU functions reject.
  return jnp.where(_inputs.row_too_long(labels.shape), -1, counts)


def _as_confusion(confusion: jax.typing.ArrayLike) -> np.ndarray | jax.Array:
  """Validates ``confusion``: a NumPy array if concrete, else a traced array.

  Concrete counts go to NumPy as they are (int64 stays int64), never through
  ``jnp.asarray``, which would truncate them to int32 without x64.
  """
  if not isinstance(confusion, jax.Array | np.ndarray) and any(
      isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(confusion)):
    confusion = jnp.asarray(confusion)  # e.g. a list of traced scalars
  if not isinstance(confusion, jax.core.Tracer):
    confusion = _inputs.host_array(confusion)
  dtype = confusion.dtype
  if not (jnp.issubdtype(dtype, jnp.integer)
          or jnp.issubdtype(dtype, jnp.floating)):
    raise TypeError(f"confusion must be a numeric array, got dtype {dtype}.")
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(
        f"confusion must be a square [C, C] matrix, got shape {confusion.shape}.")
  if confusion.shape[0] == 0:
    raise ValueError("confusion must have at least one class, got shape (0, 0).")
  return confusion


def _result_dtype(dtype: Any) -> np.dtype:
  """float64 for 64-bit counts when x64 is enabled, else float32.

  The same dtype for a concrete call and for a traced one (a traced 64-bit
  array exists only with x64 enabled).
  """
  if np.dtype(dtype).itemsize == 8:
    return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))
  return np.dtype(np.float32)


def _entries(counts: np.ndarray, bad: np.ndarray) -> str:
  found = np.argwhere(bad)
  shown = ", ".join(f"confusion[{i}, {j}] = {counts[i, j]}"
                    for i, j in found[:5])
  more = "" if len(found) <= 5 else f" and {len(found) - 5} more"
  return shown + more


def _host_iou(counts: np.ndarray) -> np.ndarray:
  """Per-class IoU in float64 from concrete counts; ValueError on bad counts."""
  cm = counts.astype(np.float64)
  bad = ~np.isfinite(cm)
  if bad.any():
    raise ValueError(
        f"confusion holds non-finite counts: {_entries(counts, bad)}. Counts "
        "must be finite and >= 0.")
  bad = cm < 0
  if bad.any():
    hint = ""
    if jnp.issubdtype(counts.dtype, jnp.integer) and counts.dtype.itemsize <= 4:
      hint = (f" A sum of {counts.dtype} matrices wraps to negative counts "
              f"past {np.iinfo(counts.dtype).max}: accumulate them in NumPy "
              "int64 (see lovasz_jax.confusion_matrix).")
    raise ValueError(
        f"confusion holds negative counts: {_entries(counts, bad)}. Counts "
        f"must be >= 0.{hint}")
  tp = np.diagonal(cm)
  union = np.sum(cm, axis=0) + np.sum(cm, axis=1) - tp
  ok = union > 0
  return np.where(ok, tp / np.where(ok, union, 1), np.nan)


def _host_mean(iou: np.ndarray) -> np.float64:
  present = ~np.isnan(iou)
  return np.mean(iou[present]) if present.any() else np.float64(0.0)


def iou_per_class(confusion: jax.typing.ArrayLike) -> jax.Array:
  """Per-class intersection-over-union from a confusion matrix.

  For class ``c``: ``TP / (TP + FP + FN)`` with ``TP = confusion[c, c]``,
  ``FN`` the rest of row ``c`` and ``FP`` the rest of column ``c``.

  A class absent from both the labels and the predictions (row and column
  all zero) has no IoU: its entry is NaN. :func:`mean_iou` leaves it out.
  A class that is predicted but absent from the labels (or the reverse) has
  IoU 0.

  Concrete counts (a NumPy array, a list, a jax.Array outside ``jax.jit``)
  are read as they are, int64 included, and the IoU is computed on the host
  in float64 (integer counts exact up to 2**53); only the result is rounded
  to the returned dtype. Negative or non-finite counts raise ``ValueError``
  naming the entries; negative ones often mean an int32 sum wrapped (see
  :func:`confusion_matrix` for accumulating in int64).

  Traced counts (under ``jax.jit``) are computed on device in float32, or in
  float64 for 64-bit counts (which exist only with x64 enabled). float32
  holds integers up to 2**24 exactly; beyond, each count is rounded with a
  relative error of at most 2**-24 (about 6e-8), and the sums and the
  division add errors of that order: the IoU is accurate to a few 1e-7
  relative (3e-7 at worst measured with counts near 2**31). A class whose
  row or column holds a negative or non-finite count gets NaN. The values
  cannot be checked under a trace: a NumPy int64 matrix passed as an
  argument of a jitted function is turned into int32 by JAX before this
  function sees it (wrapping counts past 2**31 - 1), so pass whole-data-set
  totals to this function outside ``jax.jit``.

  Args:
    confusion: ``[C, C]`` counts, rows true labels, columns predictions (as
      returned by :func:`confusion_matrix`, possibly summed over batches).

  Returns:
    A float ``[C]`` jax.Array: float64 for 64-bit counts (int64, uint64,
    float64) when x64 is enabled, else float32; the same for a concrete and
    a traced call.

  Raises:
    ValueError: for concrete counts that are negative or not finite.

  Examples:
    >>> import jax.numpy as jnp, lovasz_jax
    >>> cm = jnp.array([[1, 1, 0], [0, 2, 0], [0, 0, 0]])
    >>> lovasz_jax.iou_per_class(cm).tolist()
    [0.5, 0.6666666865348816, nan]
    >>> import numpy as np  # a data-set total in int64: nothing truncated
    >>> total = np.array([[3_000_000_000, 0], [1_000_000, 1_000_000]])
    >>> [round(x, 6) for x in lovasz_jax.iou_per_class(total).tolist()]
    [0.999667, 0.5]
  """
  confusion = _as_confusion(confusion)
  dtype = _result_dtype(confusion.dtype)
  if isinstance(confusion, np.ndarray):
    return jnp.asarray(_host_iou(confusion).astype(dtype))
  return _iou_impl(confusion)[0]


@jax.jit
def _iou_impl(confusion):
  """Per-class IoU on device, and which classes have a bad count."""
  # C x C counts split over an explicit mesh are gathered (the diagonal
  # and the row and column sums need every entry).
  confusion = _sharding.match(confusion, (None, None), confusion)
  cm = confusion.astype(_result_dtype(confusion.dtype))
  bad = ~(jnp.isfinite(cm) & (cm >= 0))
  bad_class = jnp.any(bad, axis=0) | jnp.any(bad, axis=1)
  tp = jnp.diagonal(cm)
  union = jnp.sum(cm, axis=0) + jnp.sum(cm, axis=1) - tp
  ok = (union > 0) & ~bad_class
  iou = jnp.where(ok, tp / jnp.where(ok, union, 1), jnp.nan)
  return iou, bad_class


def mean_iou(confusion: jax.typing.ArrayLike) -> jax.Array:
  """Mean IoU over the classes present in the labels or the predictions.

  The mean of :func:`iou_per_class` over the classes that have an IoU:
  classes absent from both the labels and the predictions (NaN entries) are
  left out of the mean, so they neither lower nor raise it. When no class has
  an IoU (an all-zero matrix: no pixel was counted) the result is 0.0.

  Concrete and traced counts are handled as in :func:`iou_per_class`:
  concrete counts are read without truncation and the mean is computed on
  the host in float64; negative or non-finite ones raise ``ValueError``.
  Under ``jax.jit``, a negative or non-finite count anywhere makes the
  result NaN (its class is not silently left out of the mean).

  Args:
    confusion: ``[C, C]`` counts, rows true labels, columns predictions.

  Returns:
    A float scalar jax.Array, of the dtype :func:`iou_per_class` returns
    (float32, or float64 for 64-bit counts with x64 enabled).

  Raises:
    ValueError: for concrete counts that are negative or not finite.

  Examples:
    >>> import jax.numpy as jnp, lovasz_jax
    >>> cm = jnp.array([[1, 1, 0], [0, 2, 0], [0, 0, 0]])  # class 2 absent
    >>> round(float(lovasz_jax.mean_iou(cm)), 4)  # (1/2 + 2/3) / 2
    0.5833
  """
  confusion = _as_confusion(confusion)
  dtype = _result_dtype(confusion.dtype)
  if isinstance(confusion, np.ndarray):
    return jnp.asarray(_host_mean(_host_iou(confusion)).astype(dtype))
  return _mean_iou_impl(confusion)


@jax.jit
def _mean_iou_impl(confusion):
  iou, bad_class = _iou_impl(confusion)
  present = ~jnp.isnan(iou)
  total = jnp.sum(jnp.where(present, iou, 0))
  count = jnp.sum(present)
  mean = jnp.where(count > 0, total / jnp.maximum(count, 1), 0)
  return jnp.where(jnp.any(bad_class), jnp.nan, mean).astype(iou.dtype)
