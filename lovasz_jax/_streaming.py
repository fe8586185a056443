"""Streaming segmentation metrics: exact counts of a whole data set on device.

:class:`IoUState` is a pytree of exact counts that an evaluation loop carries
(under ``jax.jit``, in ``lax.scan``, with donated buffers, across devices):
the data-set confusion matrix, and the per-image mIoU sum and image count,
both filled by one :meth:`IoUState.update` per batch.

Representation: every count is an unsigned 64-bit integer held as two uint32
words (a leading axis of 2: ``[0]`` the high word, ``[1]`` the low word),
added with a carry. The same representation is used with x64 on and off, so
a state has the same pytree structure, shapes and dtypes either way (a
checkpoint written with one setting loads with the other), and one code path
is tested. Counts are exact up to 2**64 - 1, on every backend.

Per-image mIoU is summed in fixed point: each image's mIoU (a float32 in
``[0, 1]``) is rounded to a multiple of 2**-24 and the integers are added
exactly in the same two-word form. The only error is that rounding (at most
2**-25 per image, unbiased): the sum does not drift however many images are
added, and it is associative, so the result does not depend on the batch
size, the order of the batches, merges, or how a batch is split over
devices (a float Kahan or TwoSum sum is accurate but not associative).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lovasz_jax import _distribute
from lovasz_jax import _inputs
from lovasz_jax import _metrics
from lovasz_jax import _sharding

# Per-image mIoU is summed in units of 2**-_FRACTION_BITS.
_FRACTION_BITS = 24
# Images per update: the byte sums of the fixed-point values stay below 2**32.
_MAX_IMAGES = 2**24
_INT32_MAX = 2**31 - 1


# Two-word (uint32 high, uint32 low) unsigned integers -----------------------

def _add_words(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a + b`` for word pairs ``[2, ...]`` (modulo 2**64), with the carry."""
  lo = a[1] + b[1]  # wraps modulo 2**32
  carry = (lo < a[1]).astype(jnp.uint32)
  return jnp.stack([a[0] + b[0] + carry, lo])


def _shifted(x: jax.Array, bits: int) -> jax.Array:
  """``x * 2**bits`` (uint32 ``x``, 0 <= bits < 32) as a word pair."""
  x = x.astype(jnp.uint32)
  if not bits:
    return jnp.stack([jnp.zeros_like(x), x])
  return jnp.stack([x >> (32 - bits), x << bits])


def _halves(x: jax.Array) -> jax.Array:
  """A uint32 count as ``[high 16 bits, low 16 bits]``, each below 2**16.

  Sums of halves over up to 65536 devices (or blocks) cannot wrap, whatever
  adds them (``psum``, or the partitioner's all-reduce).
  """
  x = x.astype(jnp.uint32)
  return jnp.stack([x >> 16, x & 0xFFFF])


def _join_halves(h: jax.Array) -> jax.Array:
  """Summed halves ``[2, ...]`` back to the exact sum, as a word pair."""
  return _add_words(_shifted(h[0], 16), _shifted(h[1], 0))


def _psum_words(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """The exact sum of uint32 ``x`` over the mesh ``axes``, as a word pair."""
  if not axes:
    return _shifted(x, 0)
  return _join_halves(lax.psum(_halves(x), axes))


def _host_words(words: Any) -> np.ndarray:
  """Concrete word pairs ``[2, ...]`` as exact NumPy int64 counts."""
  w = np.asarray(words).astype(np.uint64)
  total = (w[0] << np.uint64(32)) | w[1]
  if (total > np.uint64(2**63 - 1)).any():
    raise ValueError("IoUState holds counts past 2**63 - 1; they have no int64 form.")
  return total.astype(np.int64)


def _traced_words(words: jax.Array, dtype: Any) -> jax.Array:
  """Word pairs as floats: exact to 2**24 in float32, 2**53 in float64."""
  return words[0].astype(dtype) * float(2**32) + words[1].astype(dtype)


def fixed_point_sum(values: jax.Array, counted: jax.Array,
                    axis_name: tuple[str, ...] = ()) -> jax.Array:
  """The exact sum of ``values`` in ``[0, 1]`` in units of 2**-24, as words.

  Each value is rounded to the nearest multiple of 2**-24 (at most 2**-25
  off), then the integers are added exactly: split into bytes, each byte
  summed in uint32 (at most 255 * 2**24 < 2**32 for up to 2**24 values), and
  the byte sums joined into a word pair with carries. With ``axis_name``
  (inside ``shard_map``) the sum is over every device too.

  Args:
    values: float values in ``[0, 1]``, any shape (at most 2**24 of them).
    counted: a boolean mask of ``values``'s shape; values where it is false
      are not added.
    axis_name: mesh axes to sum over (inside ``shard_map``).

  Returns:
    A uint32 ``[2]`` word pair.
  """
  scaled = jnp.round(jnp.clip(values.astype(jnp.float32), 0, 1) * 2**_FRACTION_BITS)
  q = jnp.where(counted, scaled, 0).astype(jnp.uint32)
  total = _shifted(jnp.uint32(0), 0)
  for k in range(4):  # 4 bytes of a value <= 2**24 (the top one is 0 or 1)
    part = jnp.sum((q >> (8 * k)) & 0xFF, dtype=jnp.uint32)
    words = _psum_words(part, axis_name)
    # words * 2**(8k): shift the pair left (the high word never overflows).
    if k:
      words = jnp.stack([(words[0] << (8 * k)) | (words[1] >> (32 - 8 * k)),
                         words[1] << (8 * k)])
    total = _add_words(total, words)
  return total


# The counts of one batch ----------------------------------------------------

def _counted(predictions, labels, where, num_classes, ignore_index):
  """Pixels that count: valid, with a label and a prediction in [0, C)."""
  valid = _inputs.valid_mask(labels, ignore_index, where)
  return valid & ~(_inputs.out_of_range(labels, 0, num_classes)
                   | _inputs.out_of_range(predictions, 0, num_classes))


def _confusion_halves(predictions, labels, where, *, num_classes, ignore_index):
  """Local blocks -> the data-set confusion counts as uint32 halves [2, C, C]."""
  counts = _metrics._count_block(  # pylint: disable=protected-access
      predictions, labels, where, num_classes=num_classes,
      ignore_index=ignore_index)
  return _halves(counts.reshape(num_classes, num_classes))


def _image_counts(predictions, labels, where, *, num_classes, ignore_index):
  """Local blocks ``[B, ...]`` -> int32 ``[B, 3, C]`` counts of each image.

  For each image and class: the true positives, the pixels with that label,
  and the pixels predicted as that class, over the image's counted pixels.
  Reduces over the pixel axes only; the leading image axis is kept.
  """
  counted = _counted(predictions, labels, where, num_classes, ignore_index)
  runs = (1, labels.ndim - 1)
  lab = _sharding.merge_axes(jnp.where(counted, labels, 0).astype(jnp.int32), runs)
  pred = _sharding.merge_axes(
      jnp.where(counted, predictions, 0).astype(jnp.int32), runs)
  weight = _sharding.merge_axes(counted.astype(jnp.int32), runs)
  hit = weight * (lab == pred).astype(jnp.int32)

  def one_image(lab, pred, weight, hit):
    zeros = jnp.zeros(num_classes, jnp.int32)
    return jnp.stack([zeros.at[lab].add(hit), zeros.at[lab].add(weight),
                      zeros.at[pred].add(weight)])

  return jax.vmap(one_image)(lab, pred, weight, hit)


def image_mious(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each image's mIoU (float32) from ``[B, 3, C]`` counts, and which count.

  An image's mIoU is the mean IoU over the classes present in its labels or
  its predictions (a non-empty union); an image with no counted pixel has no
  class present and is not counted.
  """
  tp, lab, pred = counts[:, 0], counts[:, 1], counts[:, 2]
  union = lab + pred - tp
  present = union > 0
  iou = jnp.where(present, tp.astype(jnp.float32)
                  / jnp.where(present, union, 1).astype(jnp.float32), 0)
  num = jnp.sum(present, axis=-1)
  miou = jnp.sum(iou, axis=-1) / jnp.maximum(num, 1).astype(jnp.float32)
  return miou, num > 0


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index",
                                             "axis_name", "image_axis_name"))
def _update_impl(state, predictions, labels, where, *, num_classes,
                 ignore_index, axis_name, image_axis_name):
  arrays = (predictions, labels, where)
  options = {"num_classes": num_classes, "ignore_index": ignore_index}
  halves = _distribute.reduce_counts(
      functools.partial(_confusion_halves, **options), arrays,
      axis_name=axis_name)
  # Each image's counts are summed over the devices that split the image:
  # the pixel axes' devices on a mesh, or image_axis_name in shard_map
  # (without it, each device holds whole images). Then each image's mIoU
  # is added once: over the devices that split the batch.
  counts = _distribute.reduce_counts(
      functools.partial(_image_counts, **options), arrays, keep=1,
      axis_name=image_axis_name)
  miou, counted = image_mious(counts)
  axes = tuple(a for a in axis_name or () if a not in (image_axis_name or ()))
  return IoUState(
      confusion_words=_add_words(state.confusion_words, _join_halves(halves)),
      image_miou_words=_add_words(state.image_miou_words,
                                  fixed_point_sum(miou, counted, axes)),
      image_count_words=_add_words(
          state.image_count_words,
          _psum_words(jnp.sum(counted, dtype=jnp.uint32), axes)),
  )


# Validation -----------------------------------------------------------------

def _check_state(state: Any, name: str = "state") -> IoUState:
  if not isinstance(state, IoUState):
    raise TypeError(
        f"{name} must be a lovasz_jax.IoUState (IoUState.empty(num_classes)), "
        f"got {type(state).__name__}.")
  return state


def _batch(labels: Any, predictions: Any, logits: Any, axis: Any, where: Any,
           num_classes: int
           ) -> tuple[jax.Array, jax.Array, jax.Array | None, Any, Any]:
  """Validated (predictions, labels, where, raw predictions, raw labels)."""
  if (predictions is None) == (logits is None):
    got = "both" if predictions is not None else "neither"
    raise TypeError(
        "pass exactly one of predictions= (class ids) and logits= (scores, "
        f"argmax over axis), got {got}.")
  raw_labels = labels
  labels = _metrics._as_ids(  # pylint: disable=protected-access
      labels, "labels", "Cast them with labels.astype(jnp.int32).")
  if logits is not None:
    logits = _inputs.as_float(logits, "logits")
    axis = _inputs.check_axis(axis, logits.ndim)
    if logits.shape[axis] != num_classes:
      raise ValueError(
          f"logits have {logits.shape[axis]} classes along axis={axis} "
          f"(shape {logits.shape}), but the state has num_classes="
          f"{num_classes}.")
    expected = logits.shape[:axis] + logits.shape[axis + 1:]
    if labels.shape != expected:
      raise ValueError(
          f"labels must have the shape of logits {logits.shape} without the "
          f"class axis (axis={axis}), i.e. {expected}; got labels "
          f"{labels.shape}.")
    predictions = jnp.argmax(logits, axis=axis).astype(jnp.int32)
    raw_predictions = predictions
  else:
    raw_predictions = predictions
    predictions = _metrics._as_ids(  # pylint: disable=protected-access
        predictions, "predictions",
        "Pass class ids (e.g. jnp.argmax(logits, axis=-1)), or the scores as "
        "logits=.")
    if predictions.shape != labels.shape:
      raise ValueError(
          f"predictions and labels must have the same shape, got predictions "
          f"{predictions.shape} and labels {labels.shape}. Pass scores as "
          "logits=, not predictions=.")
  if labels.ndim < 1:
    raise ValueError(
        "labels must have a leading image axis [B, ...], got a scalar (shape "
        "()).")
  if isinstance(labels.size, int) and labels.size > _INT32_MAX:
    raise ValueError(
        f"an update counts at most 2**31 - 1 pixels, got labels of shape "
        f"{labels.shape} ({labels.size} pixels). Split the batch.")
  if isinstance(labels.shape[0], int) and labels.shape[0] > _MAX_IMAGES:
    raise ValueError(
        f"an update scores at most 2**24 images (labels.shape[0]), got "
        f"{labels.shape[0]}. Split the batch.")
  mask = _inputs.check_where(where, labels.shape, "labels")
  return predictions, labels, mask, raw_predictions, raw_labels


# The state ------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)  # no == or hash on arrays
class IoUState:
  """Exact streaming counts for data-set mIoU and per-image mIoU.

  A pytree of three uint32 arrays (no static fields), so it can be carried
  through ``jax.jit``, ``lax.scan`` and ``jax.lax.while_loop``, donated,
  replicated over a mesh, checkpointed, and returned from ``shard_map``. It is
  immutable: :meth:`update` and :meth:`merge` return a new state.

  Every count is a 64-bit unsigned integer stored as two uint32 words (the
  leading axis of size 2: ``[0]`` the high word, ``[1]`` the low word),
  added with a carry: counts are exact up to 2**64 - 1 with x64 off (and on:
  the representation is the same, so a state does not depend on the x64
  setting). Read the counts with :meth:`confusion_matrix` and
  :meth:`num_images`, and the scores with the other methods.

  Use it as a functional state: ``state = IoUState.empty(C)``, then
  ``state = state.update(labels, logits=logits)`` for every batch (or
  ``IoUState.update(state, labels, ...)``), and read the scores at the end.
  Two states of the same ``num_classes`` add up with :meth:`merge` (e.g. the
  states of several hosts, or of several evaluation shards).

  Attributes:
    confusion_words: uint32 ``[2, C, C]``: the data-set confusion matrix
      (rows: labels, columns: predictions), as word pairs.
    image_miou_words: uint32 ``[2]``: the sum of the counted images' mIoUs,
      in units of 2**-24 (fixed point), as a word pair.
    image_count_words: uint32 ``[2]``: the number of counted images (those
      with at least one valid pixel), as a word pair.

  Examples:
    >>> import jax, jax.numpy as jnp, lovasz_jax
    >>> state = lovasz_jax.IoUState.empty(3)
    >>> labels = jnp.array([[0, 0, 1, 1], [2, 2, 2, 255]])   # two images
    >>> preds = jnp.array([[0, 1, 1, 1], [2, 2, 0, 0]])
    >>> state = state.update(labels, predictions=preds, ignore_index=255)
    >>> state.confusion_matrix().tolist()
    [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    >>> round(float(state.mean_iou()), 4)            # (1/3 + 2/3 + 2/3) / 3
    0.5556
    >>> round(float(state.per_image_miou()), 4)      # (7/12 + 1/3) / 2
    0.4583
    >>> step = jax.jit(lambda s, y, z: s.update(y, logits=z), donate_argnums=0)
    >>> logits = jax.nn.one_hot(preds, 3)            # [B, P, C] scores
    >>> state = step(state, jnp.where(labels == 255, 0, labels), logits)
    >>> int(state.num_images())
    4
  """

  confusion_words: jax.Array
  image_miou_words: jax.Array
  image_count_words: jax.Array

  @classmethod
  def empty(cls, num_classes: int) -> IoUState:
    """A state with no pixel counted, for ``num_classes`` classes.

    Args:
      num_classes: the number of classes ``C`` (a Python int, at most 46340).

    Returns:
      An :class:`IoUState` of zeros.

    Examples:
      >>> import lovasz_jax
      >>> state = lovasz_jax.IoUState.empty(21)
      >>> state.num_classes, state.confusion_words.shape, int(state.num_images())
      (21, (2, 21, 21), 0)
    """
    num_classes = _metrics._check_num_classes(  # pylint: disable=protected-access
        num_classes)
    return cls(
        confusion_words=jnp.zeros((2, num_classes, num_classes), jnp.uint32),
        image_miou_words=jnp.zeros(2, jnp.uint32),
        image_count_words=jnp.zeros(2, jnp.uint32))

  @property
  def num_classes(self) -> int:
    """The number of classes ``C`` (static: read from the counts' shape)."""
    return self.confusion_words.shape[-1]

  def update(
      self,
      labels: jax.typing.ArrayLike,
      *,
      predictions: jax.typing.ArrayLike | None = None,
      logits: jax.typing.ArrayLike | None = None,
      axis: int = -1,
      where: jax.typing.ArrayLike | None = None,
      ignore_index: int | None = None,
      axis_name: str | tuple[str, ...] | None = None,
      image_axis_name: str | tuple[str, ...] | None = None,
  ) -> IoUState:
    """The state with one more batch counted (a new state; this one is kept).

    Adds the batch's confusion matrix to the data-set counts, and each
    image's mIoU to the per-image sum, in one pass. The first axis of
    ``labels`` indexes images: ``labels`` is ``[B, ...]`` (e.g.
    ``[B, H, W]``), and each ``labels[i]`` is one image for per-image mIoU.

    A pixel counts when ``where`` is true there and its label is not
    ``ignore_index``. An image's mIoU averages the IoU of the classes present
    in its counted labels or predictions; an image with no counted pixel is
    left out of the per-image mIoU (neither summed nor counted).

    Out-of-range ids: a concrete call raises ``ValueError`` when a counted
    pixel has a label or prediction outside ``[0, C)``; that check reads the
    ids on the host (a device-to-host copy, as in
    :func:`lovasz_jax.confusion_matrix`), so jit the evaluation step to keep
    everything on device. Under ``jax.jit`` the check cannot run, and such
    pixels are not counted (like void pixels): they change neither score.

    Under ``jax.jit``: ``axis``, ``ignore_index`` and ``axis_name`` are
    Python values (close over them, or mark them static); the state, labels,
    scores and ``where`` can be traced, sharded and donated. Nothing is
    copied to the host.

    Args:
      labels: integer true class ids ``[B, ...]``.
      predictions: integer predicted class ids, the shape of ``labels``.
        Exactly one of ``predictions`` and ``logits`` must be given.
      logits: float scores (logits or probabilities) with a class axis of
        size ``C`` at ``axis``; the prediction is their argmax over ``axis``.
        The other axes are those of ``labels``.
      axis: the class axis of ``logits``, as in the losses (-1: channels
        last ``[B, H, W, C]``; 1: channels first). Ignored with
        ``predictions``.
      where: optional boolean mask of the shape of ``labels``; pixels where it
        is false are not counted.
      ignore_index: label value of void pixels; they are not counted.
      axis_name: inside ``jax.shard_map``, the mesh axes over which the batch
        is split (each device holding whole images): the counts of every
        device are summed, so every device returns the state of the global
        batch. Leave it None under ``jax.jit`` with sharded inputs.
      image_axis_name: inside ``jax.shard_map``, the axes among
        ``axis_name`` that split each image's pixels (as in the losses);
        without it each device is taken to hold whole images.

    Returns:
      A new :class:`IoUState`.

    Raises:
      TypeError: for a state that is not an :class:`IoUState`, for both or
        neither of ``predictions`` and ``logits``, for non-integer labels or
        predictions, non-float logits, or a non-boolean ``where``.
      ValueError: for mismatched shapes, a class axis that is not of size
        ``C``, more than 2**31 - 1 pixels or 2**24 images in one update, or
        (concrete calls) ids outside ``[0, C)`` at counted pixels.

    Examples:
      >>> import jax.numpy as jnp, lovasz_jax
      >>> state = lovasz_jax.IoUState.empty(2)
      >>> logits = jnp.array([[[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]]])  # [1, 3, 2]
      >>> state = state.update(jnp.array([[0, 1, 1]]), logits=logits)
      >>> state.confusion_matrix().tolist()
      [[1, 0], [1, 1]]
    """
    state = _check_state(self)
    num_classes = state.num_classes
    ids, truth, mask, raw_predictions, raw_labels = _batch(
        labels, predictions, logits, axis, where, num_classes)
    ignore_index = _inputs.check_ignore_index(ignore_index)
    names = _inputs.check_axis_name(axis_name)
    image_names = _inputs.check_image_axis_name(image_axis_name, names)
    if _inputs.is_concrete(ids, truth, mask):
      _metrics._check_ranges(  # pylint: disable=protected-access
          raw_predictions, raw_labels, mask, num_classes, ignore_index)
    return _update_impl(state, ids, truth, mask,
                        num_classes=num_classes, ignore_index=ignore_index,
                        axis_name=names, image_axis_name=image_names)

  def merge(self, other: IoUState) -> IoUState:
    """The counts of both states added (exactly; the order does not matter).

    Args:
      other: an :class:`IoUState` with the same ``num_classes``.

    Returns:
      A new :class:`IoUState`.

    Raises:
      TypeError: if ``other`` is not an :class:`IoUState`.
      ValueError: if the states have different numbers of classes.

    Examples:
      >>> import jax.numpy as jnp, lovasz_jax
      >>> a = lovasz_jax.IoUState.empty(2).update(jnp.array([[0, 1]]), predictions=jnp.array([[0, 0]]))
      >>> b = lovasz_jax.IoUState.empty(2).update(jnp.array([[1, 1]]), predictions=jnp.array([[1, 1]]))
      >>> a.merge(b).confusion_matrix().tolist()
      [[1, 0], [1, 2]]
    """
    state = _check_state(self)
    other = _check_state(other, "other")
    if state.num_classes != other.num_classes:
      raise ValueError(
          f"cannot merge states of {state.num_classes} and "
          f"{other.num_classes} classes.")
    return jax.tree.map(_add_words, state, other)

  # Readers ------------------------------------------------------------------

  def _concrete(self) -> bool:
    return _inputs.is_concrete(*jax.tree.leaves(self))

  def confusion_matrix(self) -> np.ndarray | jax.Array:
    """The data-set ``[C, C]`` confusion matrix (rows labels, columns preds).

    Returns:
      Outside ``jax.jit``: exact NumPy int64 counts (on the host; pass them
      to :func:`lovasz_jax.mean_iou` or :func:`lovasz_jax.iou_per_class`,
      which read int64 without truncation). Under ``jax.jit``: float counts
      (float64 with x64 enabled, exact to 2**53; else float32, exact to
      2**24 and rounded by at most 2**-24 relative beyond).
    """
    if self._concrete():
      return _host_words(self.confusion_words)
    return _traced_words(self.confusion_words, _float_dtype())

  def num_images(self) -> np.ndarray | jax.Array:
    """The number of images counted (those with at least one valid pixel).

    Returns:
      A NumPy int64 scalar outside ``jax.jit``; under it a float scalar, as
      :meth:`confusion_matrix`.
    """
    if self._concrete():
      return _host_words(self.image_count_words)
    return _traced_words(self.image_count_words, _float_dtype())

  def iou_per_class(self) -> jax.Array:
    """Per-class IoU of the data set, as :func:`lovasz_jax.iou_per_class`.

    A class absent from both the labels and the predictions is NaN.
    Outside ``jax.jit`` it is computed on the host in float64 from the exact
    counts; under ``jax.jit`` on device (float32 without x64).

    Returns:
      A float ``[C]`` array (float64 with x64 enabled, else float32).
    """
    dtype = _float_dtype()
    if self._concrete():
      counts = _host_words(self.confusion_words)
      return jnp.asarray(_metrics._host_iou(counts).astype(dtype))  # pylint: disable=protected-access
    return _metrics._iou_impl(self.confusion_matrix())[0]  # pylint: disable=protected-access

  def mean_iou(self) -> jax.Array:
    """Data-set mean IoU, as :func:`lovasz_jax.mean_iou` of the summed counts.

    The mean of :meth:`iou_per_class` over the classes present in the labels
    or the predictions; 0.0 when no pixel was counted.

    Returns:
      A float scalar (float64 with x64 enabled, else float32).
    """
    dtype = _float_dtype()
    if self._concrete():
      counts = _host_words(self.confusion_words)
      iou = _metrics._host_iou(counts)  # pylint: disable=protected-access
      return jnp.asarray(_metrics._host_mean(iou).astype(dtype))  # pylint: disable=protected-access
    return _metrics._mean_iou_impl(self.confusion_matrix())  # pylint: disable=protected-access

  def pixel_accuracy(self) -> jax.Array:
    """The fraction of counted pixels predicted right; 0.0 if none counted.

    Returns:
      A float scalar (float64 with x64 enabled, else float32).
    """
    dtype = _float_dtype()
    if self._concrete():
      cm = _host_words(self.confusion_words).astype(np.float64)
      total = cm.sum()
      return jnp.asarray(np.float64(np.trace(cm) / total if total else 0.0)
                         .astype(dtype))
    counts = self.confusion_matrix()
    pixels = jnp.sum(counts)
    return jnp.where(pixels > 0, jnp.trace(counts) / jnp.maximum(pixels, 1),
                     0).astype(dtype)

  def mean_class_accuracy(self) -> jax.Array:
    """Recall averaged over the classes present in the labels.

    For each class with labelled pixels, the fraction of them predicted as
    that class; classes absent from the labels are left out; 0.0 when no
    pixel was counted.

    Returns:
      A float scalar (float64 with x64 enabled, else float32).
    """
    dtype = _float_dtype()
    if self._concrete():
      cm = _host_words(self.confusion_words).astype(np.float64)
      rows = cm.sum(axis=1)
      present = rows > 0
      acc = np.diagonal(cm)[present] / rows[present]
      return jnp.asarray(np.float64(acc.mean() if present.any() else 0.0)
                         .astype(dtype))
    counts = self.confusion_matrix()
    labelled = jnp.sum(counts, axis=1)
    has = labelled > 0
    recall = jnp.where(has, jnp.diagonal(counts) / jnp.where(has, labelled, 1), 0)
    classes = jnp.sum(has)
    return jnp.where(classes > 0, jnp.sum(recall) / jnp.maximum(classes, 1),
                     0).astype(dtype)

  def per_image_miou(self) -> jax.Array:
    """The mean over counted images of each image's mIoU; 0.0 if none.

    Each image's mIoU averages the IoU of the classes present in its valid
    labels or its predictions. Unlike :meth:`mean_iou` (the data set's
    counts pooled), every image weighs the same, whatever its size and
    classes: small objects and rare classes count more.

    Returns:
      A float scalar (float64 with x64 enabled, else float32).
    """
    dtype = _float_dtype()
    if self._concrete():
      total = float(_host_words(self.image_miou_words)) / 2**_FRACTION_BITS
      num = int(_host_words(self.image_count_words))
      return jnp.asarray(np.float64(total / num if num else 0.0).astype(dtype))
    summed = _traced_words(self.image_miou_words, dtype) / 2**_FRACTION_BITS
    images = _traced_words(self.image_count_words, dtype)
    return jnp.where(images > 0, summed / jnp.maximum(images, 1), 0).astype(dtype)


def _float_dtype() -> np.dtype:
  """float64 with x64 enabled, else float32 (as the IoU of int64 counts)."""
  return _metrics._result_dtype(np.int64)  # pylint: disable=protected-access

