"""Flax NNX metrics: data-set mIoU and per-image mIoU beside flax's own.

This module needs Flax (``pip install 'lovasz_jax[flax]'``); ``import
lovasz_jax`` does not import it. :class:`MeanIoU` keeps a
:class:`lovasz_jax.IoUState` (exact counts) in ``nnx.metrics.MetricState``
variables, so it updates inside ``nnx.jit`` and drops into
``nnx.MultiMetric`` next to ``nnx.metrics.Average`` and
``nnx.metrics.Accuracy``.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import numpy as np
from flax import nnx

from lovasz_jax import _inputs
from lovasz_jax._streaming import IoUState

__all__ = ["MeanIoU"]

_FIELDS = ("confusion_words", "image_miou_words", "image_count_words")


def _get(variable: Any) -> Any:
  # flax >= 0.11 reads variables with get_value(); older ones with .value.
  if hasattr(variable, "get_value"):
    return variable.get_value()
  return variable.value


def _set(variable: Any, value: Any) -> None:
  if hasattr(variable, "set_value"):
    variable.set_value(value)
  else:
    variable.value = value


class MeanIoU(nnx.metrics.Metric):
  """Data-set mean IoU (and per-image mIoU) of a segmentation model, streamed.

  A Flax NNX metric: :meth:`update` with each batch (inside ``nnx.jit`` or
  not), :meth:`compute` for the data-set mean IoU, :meth:`reset` to start
  again. The counts are exact (two uint32 words per count, exact past 2**32
  pixels with x64 off): the data-set mean IoU is that of the confusion matrix
  summed over every batch, not a mean of per-batch scores. The same update
  also streams the per-image mIoU (:meth:`per_image_miou`); the per-class
  IoU is :meth:`iou_per_class`, and :attr:`state` is the
  :class:`lovasz_jax.IoUState` with every other reader (pixel accuracy, mean
  class accuracy, the exact confusion matrix) and ``merge``.

  **The pixel mask is** ``where=``, **not** ``mask=``. ``nnx.MultiMetric``
  passes every keyword of its ``update`` to every metric, and flax's
  ``Average`` (and ``Accuracy``) read ``mask=`` as a mask of their values: a
  pixel mask passed as ``mask=`` would turn the average loss into a
  pixel-weighted one. So this metric reads the pixel mask from ``where=``
  (as the functional API does) and ignores ``mask=`` and every keyword it
  does not know (``loss=``, ``values=``, ...), which belong to the other
  metrics.

  Args:
    num_classes: the number of classes ``C`` (a Python int).
    ignore_index: label value of void pixels; they are not counted.
    axis: the class axis of ``logits`` (-1 for channels last ``[B, H, W, C]``,
      1 for channels first), as in the losses.

  Examples:
    >>> import jax, jax.numpy as jnp, lovasz_jax.nnx
    >>> from flax import nnx
    >>> metrics = nnx.MultiMetric(loss=nnx.metrics.Average("loss"),
    ...                           miou=lovasz_jax.nnx.MeanIoU(3, ignore_index=255))
    >>> @nnx.jit
    ... def eval_step(metrics, logits, labels):
    ...   loss = lovasz_jax.lovasz_softmax(logits, labels, ignore_index=255)
    ...   metrics.update(loss=loss, logits=logits, labels=labels)
    >>> labels = jnp.array([[0, 1, 2, 2, 255]])                    # one image
    >>> logits = 5 * jax.nn.one_hot(jnp.array([[0, 1, 1, 2, 0]]), 3)
    >>> eval_step(metrics, logits, labels)
    >>> round(float(metrics.compute()["miou"]), 4)                  # (1 + 1/2 + 1/2) / 3
    0.6667
    >>> [round(x, 4) for x in metrics.miou.iou_per_class().tolist()]
    [1.0, 0.5, 0.5]
    >>> metrics.reset()
    >>> float(metrics.compute()["miou"])
    0.0
  """

  def __init__(self, num_classes: int, *, ignore_index: int | None = None,
               axis: int = -1):
    if isinstance(axis, (bool, np.bool_)):
      raise TypeError(f"axis must be an int, got {axis!r}.")
    try:
      axis = operator.index(axis)
    except TypeError:
      raise TypeError(f"axis must be an int, got {axis!r}.") from None
    empty = IoUState.empty(num_classes)
    self.num_classes = empty.num_classes
    self.ignore_index = _inputs.check_ignore_index(ignore_index)
    self.axis = axis
    for name in _FIELDS:
      setattr(self, name, nnx.metrics.MetricState(getattr(empty, name)))

  @property
  def state(self) -> IoUState:
    """The counts as an immutable :class:`lovasz_jax.IoUState`."""
    return IoUState(**{name: _get(getattr(self, name)) for name in _FIELDS})

  def _store(self, state: IoUState) -> None:
    for name in _FIELDS:
      _set(getattr(self, name), getattr(state, name))

  def reset(self) -> None:
    """Forgets every count: back to the state of a new metric."""
    self._store(IoUState.empty(self.num_classes))

  def update(  # type: ignore[override, unused-ignore]
      self,
      *,
      labels: jax.typing.ArrayLike,
      logits: jax.typing.ArrayLike | None = None,
      predictions: jax.typing.ArrayLike | None = None,
      where: jax.typing.ArrayLike | None = None,
      **_: Any,
  ) -> None:
    """Counts one batch (in place), as :meth:`lovasz_jax.IoUState.update`.

    Args:
      labels: integer true class ids ``[B, ...]``; the first axis indexes
        images (for the per-image mIoU).
      logits: float scores with the class axis ``axis`` (given at
        construction); the prediction is their argmax.
      predictions: integer class ids of the shape of ``labels``, instead of
        ``logits`` (exactly one of the two).
      where: optional boolean pixel mask of the shape of ``labels``; pixels
        where it is false are not counted. (Not ``mask=``: see the class
        docstring.)
      **_: other keywords (``mask=``, ``loss=``, ``values=``, ...) are
        ignored: ``nnx.MultiMetric`` passes them to every metric.

    Raises:
      TypeError, ValueError: as :meth:`lovasz_jax.IoUState.update`.
    """
    self._store(self.state.update(
        labels, predictions=predictions, logits=logits, axis=self.axis,
        where=where, ignore_index=self.ignore_index))

  def compute(self) -> jax.Array:
    """The data-set mean IoU (0.0 before any pixel is counted).

    The mean over the classes present in the labels or the predictions of
    the IoU of the summed counts. Outside ``jax.jit`` it is computed on the
    host in float64 from the exact counts (returned as float32 unless x64 is
    enabled).
    """
    return self.state.mean_iou()

  def iou_per_class(self) -> jax.Array:
    """The data set's IoU of each class ``[C]`` (NaN for absent classes)."""
    return self.state.iou_per_class()

  def per_image_miou(self) -> jax.Array:
    """The mean over images of each image's mIoU (0.0 before any image).

    Each image (``labels[i]``) averages the IoU of the classes present in
    its valid labels or its predictions; images with no valid pixel are not
    counted. Every image weighs the same, whatever its size.
    """
    return self.state.per_image_miou()
