"""Lovász losses: build rows of errors, call the extension, reduce.

Each loss is a thin public function that validates its inputs at trace time
(shapes, dtypes, option values) and then calls a jitted implementation whose
options are static. So a direct call, a call inside the user's ``jax.jit``,
and ``jax.jit(loss, static_argnames=...)`` all work.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lovasz_jax import _distribute
from lovasz_jax import _extension
from lovasz_jax import _inputs
from lovasz_jax import _sharding

# A list of ids works in a direct call; as a static argument of jax.jit the
# ids must be a tuple (jit hashes static arguments, and lists are unhashable).
ClassesLike = Literal["present", "all"] | tuple[int, ...] | Sequence[int]

SOFTMAX_STATIC_ARGNAMES = (
    "axis", "classes", "per_image", "ignore_index", "from_logits",
    "class_chunk_size", "method", "num_bins", "axis_name", "image_axis_name")


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def reduce_rows(losses: jax.Array, counted: jax.Array,
                weights: jax.Array | None = None,
                group_axis_name: Any = None) -> jax.Array:
  """Weighted mean over counted rows of each group, then mean over groups.

  Args:
    losses: ``[G, K]`` the loss of each row (group x class).
    counted: ``[G, K]`` whether each row counts.
    weights: optional ``[K]`` non-negative weights of the classes.
    group_axis_name: inside ``shard_map``, the mesh axes over which the
      groups are spread (``per_image`` with ``axis_name``): the mean is then
      over the groups of every device.

  Returns:
    A scalar: the mean, over groups whose counted rows have a positive total
    weight, of the weighted mean of their counted rows; 0 when no group
    counts anywhere.
  """
  if weights is None:
    w = counted.astype(losses.dtype)
  else:
    w = jnp.where(counted, weights[None, :].astype(losses.dtype), 0)
  total = jnp.sum(w, axis=-1)
  per_group = _safe_div(jnp.sum(jnp.where(counted, w * losses, 0), axis=-1),
                        total)
  group_counted = total > 0
  num = jnp.sum(jnp.where(group_counted, per_group, 0))
  den = jnp.sum(group_counted).astype(losses.dtype)
  if group_axis_name is not None:
    # Typed as varying over every axis first: a group's loss is the same on
    # the devices that split its image (image_axis_name), and is then summed
    # once per such device in both sums, which leaves their ratio alone.
    vary = _sharding.varying_axes(num)
    missing = tuple(a for a in _distribute.axis_names(group_axis_name)
                    if a not in vary)
    num, den = (_sharding.pcast_varying(v, missing) for v in (num, den))
    num, den = lax.psum((num, den), group_axis_name)
  return _safe_div(num, den)


def global_any(x: jax.Array, axis_name: Any, axis: int) -> jax.Array:
  """``jnp.any`` along ``axis``; with ``axis_name``, over every device too."""
  if axis_name is None:
    return jnp.any(x, axis=axis)
  return lax.psum(jnp.sum(x, axis=axis, dtype=jnp.int32), axis_name) > 0


def _groups(x: jax.Array, per_image: bool, tail: int = 0) -> jax.Array:
  """Reshape ``[B, ..., *tail]`` to ``[G, P, *tail]`` (G = B or 1).

  Under explicit sharding the merged pixel axis keeps the sharding of its
  leading axis (see ``_sharding.merge_axes``).
  """
  pixels = x.ndim - tail - (1 if per_image else 0)
  runs = (1, pixels) if per_image else (0, pixels)
  return _sharding.merge_axes(x, runs + (1,) * tail)


def lovasz_softmax(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis: int = -1,
    classes: ClassesLike = "present",
    per_image: bool = False,
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    from_logits: bool = True,
    class_chunk_size: int | None = None,
    method: Literal["sort", "histogram"] = "sort",
    num_bins: int = 4096,
    axis_name: str | tuple[str, ...] | None = None,
    image_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""The Lovász-Softmax loss: a convex surrogate of the mean of 1 - IoU.

  For each counted class :math:`c`, with errors
  :math:`m_i(c) = |\mathbb{1}[y_i = c] - p_i(c)|` over the valid pixels,

  .. math::
    \ell_c = \sum_i m_{\pi(i)}(c)\, g_i(\pi, c), \qquad
    \text{loss} = \frac{\sum_c w_c \ell_c}{\sum_c w_c},

  where :math:`\pi` sorts the errors in descending order and :math:`g` are
  the Alg. 1 weights (:func:`lovasz_grad`), computed exactly from integer
  counts. For one-hot probabilities the loss is the mean over present
  classes of :math:`1 - \text{IoU}`.

  Edges: void pixels (``where`` false or label ``ignore_index``) take part in
  nothing and get exactly zero gradient. A group (the batch, or one image with
  ``per_image``) with no valid pixel counts no class; when nothing is counted
  anywhere the loss is 0 with a zero gradient, never NaN.

  The options ``axis``, ``classes``, ``per_image``, ``ignore_index``,
  ``from_logits``, ``class_chunk_size``, ``method`` and ``num_bins`` are
  Python values; to wrap the loss in ``jax.jit`` yourself
  with any of them as arguments, use
  ``jax.jit(lovasz_softmax, static_argnames=lovasz_jax.SOFTMAX_STATIC_ARGNAMES)``
  (or bind them with ``functools.partial``).

  Args:
    logits: float ``[B, ..., C]`` scores, any number of spatial axes; the
      class axis is ``axis``. bfloat16/float16 are computed in float32 and the
      gradient has the logits' dtype.
    labels: integer ``[B, ...]``: the logits' shape without the class axis.
      Valid labels must be in ``[0, C)``: a concrete call raises
      ``ValueError`` otherwise; under ``jax.jit`` the loss is NaN instead.
    axis: the class axis; -1 (channels-last, Flax's NHWC) or 1 for NCHW.
    classes: ``"present"`` (classes with at least one valid foreground pixel
      in the group), ``"all"``, or a sequence of class ids (each counts in a
      group that has a valid pixel).
    per_image: compute the loss per image (axis 0 of ``labels``), then average
      over the images that count at least one class.
    ignore_index: label value of void pixels.
    where: boolean ``[B, ...]`` mask of valid pixels (the labels' shape);
      combines with ``ignore_index``.
    class_weights: float ``[C]``; the loss of a group is the weighted mean over
      its counted classes (0 if their weights sum to 0).
    from_logits: if False, ``logits`` are already probabilities.
    class_chunk_size: memory-lean mode. Process this many classes at a time
      (a ``lax.scan`` over chunks of classes) instead of all at once: the
      compiled loss+grad then holds the sort keys of one chunk rather than of
      every class, at some speed cost (see the performance page of the docs).
      ``None`` (the default) processes all classes together.
    method: ``"sort"`` (exact) or ``"histogram"``: quantise the errors into
      ``num_bins`` equal bins of [0, 1] and compute the loss of the quantised
      errors exactly from per-bin counts, with no sort, in O(P + num_bins)
      per class. The Lovász extension of the Jaccard loss is 1-Lipschitz in
      the max norm, so the histogram loss is within ``1 / (2 num_bins)`` of
      the exact loss. Pixels of one bin and kind (foreground/background)
      share their average weight, a valid subgradient.
    num_bins: the number of bins of ``method="histogram"``.
    axis_name: inside ``jax.shard_map``, the mesh axes (a name or a tuple of
      names) over which the arguments are split; the loss is then that of
      the global batch, the same on every device. Outside ``shard_map``
      leave it None: sharded arguments are handled where they lie.
    image_axis_name: with ``per_image=True`` inside ``shard_map``, the axes
      among ``axis_name`` that split each image's pixels (for example the
      height). A block does not say which of its dimensions were split, so
      without it every device is taken to hold whole images (the batch
      split over ``axis_name``); with images split, pass it, or each slab
      would be scored as an image of its own.

  Returns:
    A scalar loss, in float32 (float64 for float64 logits).

  Examples:
    >>> import jax, jax.numpy as jnp, lovasz_jax
    >>> probs = jnp.array([[1., 0.], [0., 1.], [0., 1.]])  # one-hot predictions
    >>> labels = jnp.array([0, 0, 1])
    >>> # IoU of class 0 is 1/2, of class 1 is 1/2: mean of 1 - IoU is 0.5.
    >>> float(lovasz_jax.lovasz_softmax(probs, labels, from_logits=False))
    0.5

  References:
    Berman, Rannen Triki & Blaschko, "The Lovász-Softmax loss: A tractable
    surrogate for the optimization of the intersection-over-union measure in
    neural networks", CVPR 2018 (arXiv:1705.08790).
  """
  logits = _inputs.as_float(logits, "logits")
  labels = _inputs.as_int(labels, "labels")
  if logits.ndim < 2:
    raise ValueError(
        "logits must have at least 2 dimensions ([B, ..., C]), got shape "
        f"{logits.shape}.")
  axis = _inputs.check_axis(axis, logits.ndim)
  num_classes = logits.shape[axis]
  if num_classes == 0:
    raise ValueError(f"logits have no classes: shape {logits.shape}, axis {axis}.")
  expected = logits.shape[:axis] + logits.shape[axis + 1:]
  if labels.shape != expected:
    raise ValueError(
        f"labels must have the logits' shape without the class axis: logits "
        f"{logits.shape} with axis={axis} need labels of shape {expected}, got "
        f"{labels.shape}.")
  class_ids = _inputs.check_classes(classes, num_classes)
  per_image = _inputs.check_static_bool(per_image, "per_image")
  from_logits = _inputs.check_static_bool(from_logits, "from_logits")
  ignore_index = _inputs.check_ignore_index(ignore_index)
  where = _inputs.check_where(where, labels.shape, "labels")
  class_weights = _inputs.check_class_weights(class_weights, num_classes)
  num_bins = _inputs.check_method(method, num_bins)
  if class_chunk_size is not None:
    class_chunk_size = _inputs.check_positive_int(class_chunk_size,
                                                  "class_chunk_size")
  axis_name = _inputs.check_axis_name(axis_name)
  image_axis_name = _inputs.check_image_axis_name(image_axis_name, axis_name)
  _inputs.check_label_range(labels, 0, num_classes, ignore_index, where,
                            f"logits with {num_classes} classes")
  if not from_logits:
    _inputs.check_probabilities(logits, labels, ignore_index, where, axis)
  rows_axis = image_axis_name if per_image else axis_name
  _inputs.check_row_length(
      _inputs.row_dims(expected[1:] if per_image else expected, rows_axis),
      "lovasz_softmax")
  return _softmax_impl(
      logits, labels, where, class_weights, axis=axis, classes=class_ids,
      per_image=per_image, ignore_index=ignore_index, from_logits=from_logits,
      class_chunk_size=class_chunk_size, num_bins=num_bins,
      axis_name=axis_name, rows_axis=rows_axis)


@functools.partial(jax.jit, static_argnames=(
    "axis", "classes", "per_image", "ignore_index", "from_logits",
    "class_chunk_size", "num_bins", "axis_name", "rows_axis"))
def _softmax_impl(logits, labels, where, class_weights, *, axis, classes,
                  per_image, ignore_index, from_logits, class_chunk_size,
                  num_bins, axis_name, rows_axis):
  dtype = _inputs.compute_dtype(logits.dtype)
  # On an explicit mesh every pixel needs all its classes (the softmax), so
  # a split class axis is gathered; the labels and mask follow the logits.
  x = _sharding.whole_axis(jnp.moveaxis(logits, axis, -1).astype(dtype), -1)
  labels = _sharding.match(labels, _sharding.spec_of(x)[:-1], x)
  where = _sharding.match(where, _sharding.spec_of(x)[:-1], x)
  num_classes = x.shape[-1]
  valid = _inputs.valid_mask(labels, ignore_index, where)
  # Bad input is reported as a NaN loss and gradient: labels outside [0, C)
  # (checked before any narrowing), non-finite logits or probabilities
  # outside [0, 1], and invalid class weights. Void pixels take part in
  # nothing, so their values are not checked.
  # (The logits or probabilities are checked by the pass that reads them
  # to make the rows' keys: see _softmax_row_losses.)
  bad = _inputs.has_bad_labels(labels, valid, 0, num_classes)
  bad |= _inputs.bad_class_weights(class_weights)
  bad |= _inputs.row_too_long(_inputs.row_dims(
      labels.shape[1:] if per_image else labels.shape, rows_axis))
  labels = _inputs.narrow_labels(labels, valid, 0, num_classes)
  # Void pixels' logits (which may be anything) are masked inside the rows'
  # VJP, and the NaN factor applied there too, so that neither costs a pass
  # over the gradient.
  if isinstance(classes, str):
    selected = (True,) * num_classes
  else:
    selected = tuple(c in classes for c in range(num_classes))
  x = _groups(x, per_image, tail=1)                  # [G, P, C]
  lab = _groups(labels, per_image)                   # [G, P]
  val = _groups(valid, per_image)                    # [G, P]
  # With axis_name, batch-mode rows are split over the devices; per_image
  # rows are whole (or split over image_axis_name), and the mean over
  # images crosses devices.
  losses, nan_if_bad = _softmax_row_losses(
      x, lab, val, bad, selected, from_logits, class_chunk_size, num_bins,
      rows_axis, not per_image, axis_name)               # [G, C], []
  if classes == "present":
    # (Counted where the pixels are: natively on CPU, one pass.)
    counted = _distribute.class_counts(
        x, jnp.where(val, lab, -1), rows_axis) > 0
  else:
    counted = (global_any(val, rows_axis, axis=-1)[:, None]
               & np.asarray(selected)[None, :])
  loss = reduce_rows(losses, counted, class_weights,
                     axis_name if per_image else None)
  return loss * nan_if_bad.astype(loss.dtype)


# The softmax rows have a hand-written VJP. In the forward pass one
# pixelwise pass (``_distribute.encode_rows``: the native kernel on CPU,
# XLA's formula elsewhere) goes from the logits to the class-major keys of
# every row, their log-sum-exp, and a flag for out-of-range inputs; the
# weights come from ``row_weights``. The backward pass is one more pixelwise
# pass (``rows_grad``) from the weights to d loss / d logits: it recomputes
# the probabilities from the logits and their log-sum-exp, so neither the
# probabilities nor their cotangent is materialised, no layout change runs
# in XLA, and the only large residual is the weights. In histogram mode
# (``_distribute.histogram_table``) the forward pass counts the keys per
# slot as it computes them and keeps only each row's slot weights; the
# backward pass recomputes each pixel's key and looks its weight up, so no
# array of C x P values is kept at all. With
# class_chunk_size, classes are processed a chunk at a time (a lax.scan
# writing each chunk's weights into one [G, C, P] array), so the forward
# pass holds the keys of one chunk. Unselected classes are rows with no
# valid pixel: they cost no ordering.


def _chunk_rows(num_bins, axis_name, spans_batch, x, masked, lab, softmax,
                row_valid, fused=True):
  """Row weights [G, k, P] and losses [G, k], the log-sum-exp [G, P], and
  which valid pixels hold values out of range [G, P]. In histogram mode with
  ``fused``, the weights are each row's slot weights [G, k, 2K + 1]
  (``histogram_table``), from which the gradient pass weighs each pixel.

  ``x`` and ``masked`` (void pixels zeroed) are logits (``softmax``) or
  probabilities of k classes ``[G, P, k]``. ``fused``: the keys come from
  the pixelwise pass (native on CPU); else from XLA's formula, which XLA
  fuses with what computes ``masked`` (the lean mode's chunks, whose
  probabilities are then never materialised: 1.30x the logits of compiled
  temp at (2,256,256,21) instead of 1.44x).
  """
  if fused and num_bins:
    # (Unselected rows are weighed too, and not counted: their cotangent
    # is 0.)
    omega, losses, lse, bad = _distribute.histogram_table(
        x, masked, lab, num_bins, softmax, axis_name)
    return (omega, losses), lse, bad
  if fused:
    keys, lse, bad = _distribute.encode_rows(x, masked, lab, num_bins, softmax)
  else:
    keys, lse, bad = _extension.encode_rows(masked, lab, num_bins, softmax)
  if row_valid is not None:
    keys = jnp.where(row_valid[None, :, None], keys, 0)
  return _distribute.row_weights(keys, num_bins, axis_name, spans_batch), lse, bad


def _softmax_rows_fwd(x, lab, val, bad, selected, from_logits, chunk,
                      num_bins, axis_name, spans_batch, poison_axis):
  groups, pixels, num_classes = x.shape
  # Void pixels' logits may hold anything (NaN too): XLA's formulas read
  # them zeroed, the native passes skip them; their keys are 0.
  masked = jnp.where(val[..., None], x, 0)
  lab = jnp.where(val, lab, _extension.VOID_LABEL)
  selected = np.asarray(selected)
  chunk = num_classes if chunk is None else min(chunk, num_classes)
  rows = functools.partial(_chunk_rows, num_bins, axis_name, spans_batch)
  if chunk == num_classes:
    # One pass from the logits to the keys (and their log-sum-exp), which
    # also checks them.
    (w, losses), lse, out_of_range = rows(x, masked, lab, from_logits,
                                          None if selected.all() else selected)
    factor = _poison(bad | jnp.any(out_of_range != 0), poison_axis, x.dtype)
    return (losses, factor), (x, masked, lse, lab, factor, w)
  # In chunks the log-sum-exp over every class comes first, and each chunk's
  # probabilities are its own.
  lse = (jax.nn.logsumexp(masked, axis=-1) if from_logits
         else jnp.zeros_like(x[..., 0]))
  probs = lambda m: jnp.exp(m - lse[..., None]) if from_logits else m
  # Chunks of `chunk` classes, one after another (lax.scan), each writing its
  # rows into one [G, C, P] weight array; the last chunk ends at the last
  # class (it overlaps the one before when `chunk` does not divide C, and
  # writes the same values there). The array has the gradient's size, so
  # XLA can place it in the gradient's buffer.
  starts = np.minimum(np.arange(0, num_classes, chunk), num_classes - chunk)
  cls = starts[:, None] + np.arange(chunk)[None, :]

  def step(carry, a):
    w_all, l_all = carry
    start, ids, row_valid = a
    # A chunk's labels count from its first class; void stays void.
    chunk_lab = jnp.where(lab == _extension.VOID_LABEL, lab,
                          lab - start.astype(lab.dtype))
    p = probs(jnp.take(masked, ids, axis=-1))
    (w, losses), _, _ = rows(p, p, chunk_lab, False, row_valid, fused=False)
    w_all = lax.dynamic_update_slice_in_dim(w_all, w.astype(w_all.dtype), start, 1)
    l_all = lax.dynamic_update_slice_in_dim(l_all, losses, start, 1)
    return (w_all, l_all), None

  init = (jnp.zeros((groups, num_classes, pixels), x.dtype),
          jnp.zeros((groups, num_classes), x.dtype))
  spec = _sharding.spec_of(x)                              # [G, P, C]
  if any(spec):  # explicit sharding: the carry is laid out like the rows
    init = (_sharding.reshard(init[0], (spec[0], None, spec[1]), like=x),
            _sharding.reshard(init[1], (spec[0], None), like=x))
  # Inside shard_map the weights vary like the pixels, and the losses too,
  # except over the axes that split the rows (there they are whole rows').
  vary = _sharding.varying_axes(x)
  split = _distribute.axis_names(axis_name)
  init = (_sharding.pcast_varying(init[0], vary),
          _sharding.pcast_varying(init[1], tuple(a for a in vary if a not in split)))
  (w, losses), _ = lax.scan(step, init, (starts, cls, selected[cls]))
  bad |= (_inputs.bad_logits(x, val[..., None]) if from_logits
          else _inputs.bad_probabilities(x, val[..., None]))
  factor = _poison(bad, poison_axis, x.dtype)
  return (losses, factor), (x, masked, lse, lab, factor, w)


def _poison(bad, axis_name, dtype):
  return _inputs.poison(bad, axis_name).astype(dtype)


def _softmax_rows_bwd(selected, from_logits, chunk, num_bins, axis_name,
                      spans_batch, poison_axis, residuals, cts):
  del selected, axis_name, spans_batch, poison_axis
  x, masked, lse, lab, factor, w = residuals
  # All classes at once in histogram mode: w holds slot weights.
  table = num_bins if chunk is None or chunk >= x.shape[-1] else 0
  ct = cts[0]  # (the NaN factor has no derivative)
  # A NaN factor makes every row's cotangent NaN, so every entry of the
  # gradient is NaN; otherwise void pixels (weight 0) get exactly 0.
  ct = ct.astype(lse.dtype) * factor.astype(lse.dtype)
  d_x = _distribute.rows_grad(x, masked, lse, lab, w, ct, from_logits, table)
  return d_x.astype(x.dtype), None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9, 10))
def _softmax_row_losses(x, lab, val, bad, selected, from_logits, chunk,
                        num_bins, axis_name, spans_batch, poison_axis):
  """Lovász extension of every (group, class) row: ``[G, P, C] -> [G, C]``.

  Void pixels (``val`` false) take part in nothing, whatever their logits,
  and get zero gradient. Also returns the factor that reports bad input
  (``_inputs.poison`` over ``poison_axis``): NaN when ``bad``, or when a
  valid pixel's logits are not finite (probabilities outside [0, 1] when
  not ``from_logits``), else 1. Every entry of the gradient is multiplied
  by it.
  """
  return _softmax_rows_fwd(x, lab, val, bad, selected, from_logits, chunk,
                           num_bins, axis_name, spans_batch, poison_axis)[0]


_softmax_row_losses.defvjp(_softmax_rows_fwd, _softmax_rows_bwd)
