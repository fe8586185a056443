"""Segmentation metrics: confusion matrix, per-class IoU and mean IoU.

The confusion matrix is built with static shapes (a masked scatter-add of
integer counts), so it compiles once under ``jax.jit`` and can be summed over
batches. IoU and mean IoU are computed from the summed matrix, which gives the
dataset-level scores (not a mean of per-batch scores).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lovasz_jax import _inputs


def _check_num_classes(num_classes: Any) -> int:
  if isinstance(num_classes, jax.core.Tracer):
    raise TypeError(
        "num_classes must be a static Python int, got a traced value. Mark it "
        "static in jax.jit (static_argnames=('num_classes',)).")
  if isinstance(num_classes, (bool, np.bool_)):
    raise TypeError(f"num_classes must be a positive int, got {num_classes!r}.")
  return _inputs.check_positive_int(num_classes, "num_classes")


def _check_ranges(predictions: jax.Array, labels: jax.Array,
                  where: jax.Array | None, num_classes: int,
                  ignore_index: int | None) -> None:
  """Raises ValueError for valid pixels with ids outside [0, C), if concrete.

  Under a trace this check cannot run; such pixels are then not counted.
  """
  if not _inputs.is_concrete(predictions, labels, where):
    return
  _inputs.check_label_range(labels, 0, num_classes, ignore_index, where,
                            f"num_classes={num_classes}")
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


def confusion_matrix(
    predictions: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    num_classes: int,
    *,
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
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

  Returns:
    An int32 ``[C, C]`` array of counts (exact up to 2**31 - 1 per entry).

  Examples:
    >>> import jax.numpy as jnp, lovasz_jax
    >>> labels = jnp.array([0, 0, 1, 1, 255])
    >>> preds = jnp.array([0, 1, 1, 1, 0])
    >>> lovasz_jax.confusion_matrix(preds, labels, 2, ignore_index=255).tolist()
    [[1, 1], [0, 2]]
  """
  predictions = _inputs.as_int(predictions, "predictions")
  labels = _inputs.as_int(labels, "labels")
  num_classes = _check_num_classes(num_classes)
  if predictions.shape != labels.shape:
    raise ValueError(
        f"predictions and labels must have the same shape, got predictions "
        f"{predictions.shape} and labels {labels.shape}. Pass class ids "
        "(jnp.argmax(logits, axis=-1)), not logits.")
  ignore_index = _inputs.check_ignore_index(ignore_index)
  where = _inputs.check_where(where, labels.shape, "labels")
  _check_ranges(predictions, labels, where, num_classes, ignore_index)
  return _confusion_impl(predictions, labels, where, num_classes=num_classes,
                         ignore_index=ignore_index)


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index"))
def _confusion_impl(predictions, labels, where, *, num_classes, ignore_index):
  labels = labels.astype(jnp.int32).reshape(-1)
  predictions = predictions.astype(jnp.int32).reshape(-1)
  if where is not None:
    where = where.reshape(-1)
  valid = _inputs.valid_mask(labels, ignore_index, where)
  in_range = ((labels >= 0) & (labels < num_classes)
              & (predictions >= 0) & (predictions < num_classes))
  counted = valid & in_range
  # Pixels that do not count go to an index past the end, which is dropped.
  index = jnp.where(counted, labels * num_classes + predictions,
                    num_classes * num_classes)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32)
  counts = counts.at[index].add(1, mode="drop")
  return counts.reshape(num_classes, num_classes)


def _check_confusion(confusion: jax.typing.ArrayLike) -> jax.Array:
  confusion = jnp.asarray(confusion)
  if not (jnp.issubdtype(confusion.dtype, jnp.integer)
          or jnp.issubdtype(confusion.dtype, jnp.floating)):
    raise TypeError(
        f"confusion must be a numeric array, got dtype {confusion.dtype}.")
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(
        f"confusion must be a square [C, C] matrix, got shape {confusion.shape}.")
  if confusion.shape[0] == 0:
    raise ValueError("confusion must have at least one class, got shape (0, 0).")
  return confusion


def iou_per_class(confusion: jax.typing.ArrayLike) -> jax.Array:
  """Per-class intersection-over-union from a confusion matrix.

  For class ``c``: ``TP / (TP + FP + FN)`` with ``TP = confusion[c, c]``,
  ``FN`` the rest of row ``c`` and ``FP`` the rest of column ``c``.

  A class absent from both the labels and the predictions (row and column
  all zero) has no IoU: its entry is NaN. :func:`mean_iou` leaves it out.
  A class that is predicted but absent from the labels (or the reverse) has
  IoU 0.

  Args:
    confusion: ``[C, C]`` counts, rows true labels, columns predictions (as
      returned by :func:`confusion_matrix`, possibly summed over batches).

  Returns:
    A float ``[C]`` array (float32; float64 for float64 input).

  Examples:
    >>> import jax.numpy as jnp, lovasz_jax
    >>> cm = jnp.array([[1, 1, 0], [0, 2, 0], [0, 0, 0]])
    >>> lovasz_jax.iou_per_class(cm).tolist()
    [0.5, 0.6666666865348816, nan]
  """
  confusion = _check_confusion(confusion)
  return _iou_impl(confusion)


@jax.jit
def _iou_impl(confusion):
  dtype = _inputs.compute_dtype(
      confusion.dtype if jnp.issubdtype(confusion.dtype, jnp.floating)
      else jnp.float32)
  cm = confusion.astype(dtype)
  tp = jnp.diagonal(cm)
  union = jnp.sum(cm, axis=0) + jnp.sum(cm, axis=1) - tp
  ok = union > 0
  return jnp.where(ok, tp / jnp.where(ok, union, 1), jnp.nan)


def mean_iou(confusion: jax.typing.ArrayLike) -> jax.Array:
  """Mean IoU over the classes present in the labels or the predictions.

  The mean of :func:`iou_per_class` over the classes that have an IoU:
  classes absent from both the labels and the predictions (NaN entries) are
  left out of the mean, so they neither lower nor raise it. When no class has
  an IoU (an all-zero matrix: no pixel was counted) the result is 0.0.

  Args:
    confusion: ``[C, C]`` counts, rows true labels, columns predictions.

  Returns:
    A float scalar (float32; float64 for float64 input).

  Examples:
    >>> import jax.numpy as jnp, lovasz_jax
    >>> cm = jnp.array([[1, 1, 0], [0, 2, 0], [0, 0, 0]])  # class 2 absent
    >>> round(float(lovasz_jax.mean_iou(cm)), 4)  # (1/2 + 2/3) / 2
    0.5833
  """
  confusion = _check_confusion(confusion)
  return _mean_iou_impl(confusion)


@jax.jit
def _mean_iou_impl(confusion):
  iou = _iou_impl(confusion)
  present = ~jnp.isnan(iou)
  total = jnp.sum(jnp.where(present, iou, 0))
  count = jnp.sum(present)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), 0).astype(iou.dtype)
