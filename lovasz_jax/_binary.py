"""Binary and multi-label Lovász losses: the Lovász sigmoid and hinge.

Both losses share one layout. With ``axis=None`` every pixel of a group (the
batch, or one image with ``per_image``) belongs to one binary problem. With
``axis=k`` the logits hold one binary problem per channel along ``k``
(multi-label segmentation): each (group, channel) pair is a row of errors, and
the loss is the mean over counted channels, then over groups, exactly like the
multi-class loss averages over classes.

Multi-label losses elsewhere (segmentation_models_pytorch's ``multilabel``
mode) pool every channel into one binary problem instead. Averaging per
channel is the Lovász extension of the mean over channels of ``1 - IoU``, the
metric that multi-label segmentation reports, so a small or rare channel
weighs as much as a large one. The pooled loss is the extension of ``1 - IoU``
of all channels' pixels put together, which large channels dominate. Passing
``axis=None`` with multi-label logits and labels gives the pooled loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lovasz_jax import _distribute
from lovasz_jax import _inputs
from lovasz_jax import _sharding
from lovasz_jax._losses import ClassesLike
from lovasz_jax._losses import global_any
from lovasz_jax._losses import reduce_rows

SIGMOID_STATIC_ARGNAMES = (
    "axis", "classes", "per_image", "ignore_index", "from_logits", "method",
    "num_bins", "axis_name", "image_axis_name")
HINGE_STATIC_ARGNAMES = (
    "axis", "classes", "per_image", "ignore_index", "axis_name",
    "image_axis_name")


def _check(logits, labels, where, axis, classes, per_image, ignore_index,
           axis_name, image_axis_name, name, what):
  """Validates the inputs shared by both losses; returns canonical values."""
  logits = _inputs.as_float(logits, "logits")
  labels = _inputs.as_int(labels, "labels")
  if logits.ndim < 1:
    raise ValueError(f"logits must have a batch axis, got shape {logits.shape}.")
  if labels.shape != logits.shape:
    mode = ("" if axis is None
            else " (multi-label: one 0/1 label per pixel and channel)")
    raise ValueError(
        f"labels must have the logits' shape {logits.shape}{mode}, got "
        f"{labels.shape}.")
  per_image = _inputs.check_static_bool(per_image, "per_image")
  ignore_index = _inputs.check_ignore_index(ignore_index)
  if axis is None:
    if not (isinstance(classes, str) and classes == "all"):
      raise ValueError(
          "classes only applies in multi-label mode (axis=k); with axis=None "
          "there is one binary problem and its foreground class always "
          f'counts. Leave classes="all" (got {classes!r}) or pass the channel '
          "axis.")
    classes = "all"
  else:
    axis = _inputs.check_axis(axis, logits.ndim)
    num_channels = logits.shape[axis]
    if num_channels == 0:
      raise ValueError(
          f"logits have no channels: shape {logits.shape}, axis {axis}.")
    if per_image and axis == 0:
      raise ValueError(
          "per_image=True takes axis 0 of the logits as the image axis, so the "
          f"channel axis cannot also be 0 (logits of shape {logits.shape}, "
          "axis=0). Put the channels on another axis, or set per_image=False.")
    classes = _inputs.check_classes(classes, num_channels)
  where = _inputs.check_where(where, labels.shape, "labels")
  axis_name = _inputs.check_axis_name(axis_name)
  image_axis_name = _inputs.check_image_axis_name(image_axis_name, axis_name)
  _inputs.check_label_range(labels, 0, 2, ignore_index, where, what)
  rows_axis = image_axis_name if per_image else axis_name
  _inputs.check_row_length(_row_dims(logits.shape, axis, per_image, rows_axis),
                           name)
  return (logits, labels, where, axis, classes, per_image, ignore_index,
          axis_name, rows_axis)


def _row_dims(shape, axis, per_image, rows_axis):
  """The sizes whose product is a row's length (``_inputs.row_dims``)."""
  skip = ({0} if per_image else set()) | (set() if axis is None else {axis})
  return _inputs.row_dims([d for i, d in enumerate(shape) if i not in skip],
                          rows_axis)


def _rows(a: jax.Array, axis: int | None, per_image: bool) -> jax.Array:
  """``[B, ...]`` with channels on ``axis`` to rows ``[G, K, P]``.

  G is B with ``per_image`` (axis 0 holds the images), else 1; K is the number
  of channels (1 with ``axis=None``); the pixels are last, as ``row_losses``
  wants them. Sizes are explicit so that empty arrays reshape too.
  """
  if axis is None:
    a = a[..., None]
    axis = a.ndim - 1
  lead = 1 if per_image else 0
  a = jnp.moveaxis(a, axis, lead)
  runs = (1, 1, a.ndim - 2) if per_image else (0, 1, a.ndim - 1)
  return _sharding.merge_axes(a, runs)


def _sigmoid_errors(x, fg):
  # |y - sigmoid(x)|: 1 - sigmoid(x) = sigmoid(-x) for foreground pixels, with
  # no cancellation when sigmoid(x) is close to 1.
  return jax.nn.sigmoid(jnp.where(fg, -x, x))


def _probability_errors(p, fg):
  return jnp.abs(fg.astype(p.dtype) - p)


def _hinge_errors(x, fg):
  return jax.nn.relu(1 - jnp.where(fg, x, -x))


_ERRORS = {
    # Recomputed in the backward pass rather than stored: saves memory.
    "sigmoid": jax.checkpoint(_sigmoid_errors),
    "probabilities": _probability_errors,
    "hinge": _hinge_errors,
}


@functools.partial(jax.jit, static_argnames=(
    "errors", "axis", "classes", "per_image", "ignore_index", "num_bins",
    "axis_name", "rows_axis"))
def _impl(logits, labels, where, *, errors, axis, classes, per_image,
          ignore_index, num_bins=0, axis_name=None, rows_axis=None):
  dtype = _inputs.compute_dtype(logits.dtype)
  # On an explicit mesh the labels and mask follow the logits' layout.
  labels = _sharding.match(labels, _sharding.spec_of(logits), logits)
  where = _sharding.match(where, _sharding.spec_of(logits), logits)
  valid = _inputs.valid_mask(labels, ignore_index, where)
  bad = _inputs.has_bad_labels(labels, valid, 0, 2)
  labels = _inputs.narrow_labels(labels, valid, 0, 2)
  x = _rows(logits, axis, per_image)                     # [G, K, P]
  lab = _rows(labels, axis, per_image)
  val = _rows(valid, axis, per_image)
  if not isinstance(classes, str):
    ids = np.asarray(classes)
    x, lab, val = x[:, ids], lab[:, ids], val[:, ids]
  x = x.astype(dtype)
  # Bad input gives a NaN loss and gradient: labels other than 0 and 1,
  # non-finite logits, or probabilities outside [0, 1], at valid pixels of
  # the channels that take part. Void pixels take part in nothing.
  bad |= (_inputs.bad_probabilities(x, val) if errors == "probabilities"
          else _inputs.bad_logits(x, val))
  bad |= _inputs.row_too_long(_row_dims(logits.shape, axis, per_image, rows_axis))
  nan_if_bad = _inputs.poison(bad, axis_name).astype(dtype)
  x = jnp.where(val, _inputs.nan_gradient_if(x, nan_if_bad), 0)
  fg = lab == 1
  # With axis_name, batch-mode rows are split over the devices; per_image
  # rows are whole (or split over image_axis_name), and the mean over
  # images crosses devices.
  losses = _distribute.row_losses(_ERRORS[errors](x, fg), fg, val, num_bins,
                                  rows_axis, not per_image)       # [G, K]
  if classes == "present":
    counted = global_any(fg & val, rows_axis, axis=-1)
  else:
    counted = global_any(val, rows_axis, axis=-1)
  loss = reduce_rows(losses, counted,
                     group_axis_name=axis_name if per_image else None)
  return loss * nan_if_bad


def lovasz_sigmoid(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis: int | None = None,
    classes: ClassesLike = "all",
    per_image: bool = False,
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    from_logits: bool = True,
    method: str = "sort",
    num_bins: int = 4096,
    axis_name: str | tuple[str, ...] | None = None,
    image_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""The Lovász sigmoid loss, binary or multi-label.

  For each counted channel :math:`k`, with errors
  :math:`m_i(k) = |y_i(k) - \sigma(x_i(k))|` over the valid pixels and
  :math:`y_i(k) \in \{0, 1\}`,

  .. math::
    \ell_k = \sum_i m_{\pi(i)}(k)\, g_i(\pi, k), \qquad
    \text{loss} = \frac{1}{|K|} \sum_{k \in K} \ell_k,

  where :math:`\pi` sorts the errors in descending order, :math:`g` are the
  Alg. 1 weights of the foreground (``y = 1``) of channel :math:`k`, and
  :math:`K` is the set of counted channels. For hard probabilities (0 or 1)
  the loss is the mean over counted channels of :math:`1 - \text{IoU}`.

  With ``axis=None`` there is one binary problem (a single channel) per group,
  and its foreground class always counts (an image without foreground is
  penalised by its largest error). With ``axis=k`` (multi-label) there is one
  binary problem per channel along ``k``, averaged like the classes of
  :func:`lovasz_softmax`. segmentation_models_pytorch's multilabel mode pools
  all channels into one binary problem instead; that is the extension of
  ``1 - IoU`` of all channels' pixels together, which large channels dominate,
  whereas the mean per channel is the extension of the mean over channels of
  ``1 - IoU`` (the metric usually reported), so a small or rare channel
  counts as much as a large one. For the pooled loss, pass ``axis=None``.

  Edges: void pixels (``where`` false or label ``ignore_index``; in
  multi-label mode each channel of a pixel can be void on its own) take part
  in nothing and get exactly zero gradient. When nothing is counted the loss
  is 0 with a zero gradient, never NaN.

  Args:
    logits: float ``[B, ...]`` scores, any number of spatial axes; with
      ``axis=k`` the channel axis is ``k``. bfloat16/float16 are computed in
      float32 and the gradient has the logits' dtype.
    labels: integer (or bool) labels of the logits' shape, 0 or 1 (or
      ``ignore_index``). A concrete call raises ``ValueError`` for other
      values; under ``jax.jit`` the loss is NaN instead.
    axis: None for one binary problem, or the channel axis for multi-label.
    classes: with ``axis=k``, the channels that count in a group: ``"all"``
      (those with a valid pixel), ``"present"`` (those with a valid
      foreground pixel), or a sequence of channel ids (each counts in a group
      where it has a valid pixel). With ``axis=None`` only ``"all"``.
    per_image: compute the loss per image (axis 0, which then cannot be the
      channel axis): the mean over the image's counted channels, then the mean
      over the images that count a channel. Otherwise the whole batch is one
      group.
    ignore_index: label value of void pixels.
    where: boolean mask of valid pixels, the logits' shape; combines with
      ``ignore_index``.
    from_logits: if False, ``logits`` are already probabilities.
    method: ``"sort"`` (exact) or ``"histogram"`` (sort-free, within
      ``1 / (2 num_bins)`` of the exact loss; see :func:`lovasz_softmax`).
    num_bins: the number of bins of ``method="histogram"``.
    axis_name: inside ``jax.shard_map``, the mesh axes over which the
      arguments are split (see :func:`lovasz_softmax`).
    image_axis_name: with ``per_image=True`` inside ``shard_map``, the axes
      among ``axis_name`` that split each image's pixels; without it every
      device is taken to hold whole images (see :func:`lovasz_softmax`).

  Returns:
    A scalar loss, in float32 (float64 for float64 logits).

  Examples:
    >>> import jax.numpy as jnp
    >>> from lovasz_jax import lovasz_sigmoid
    >>> # [B, P, K]: channel 0 is a large object, channel 1 a small one.
    >>> probs = jnp.array([[[1., 0.], [1., 1.], [1., 0.], [1., 0.]]])
    >>> labels = jnp.array([[[1, 1], [1, 0], [1, 0], [1, 0]]])
    >>> # Per channel: IoU 1 and 0, so the mean of 1 - IoU is 0.5.
    >>> float(lovasz_sigmoid(probs, labels, axis=-1, from_logits=False))
    0.5
    >>> # Pooled into one binary problem (axis=None): IoU 4/6.
    >>> round(float(lovasz_sigmoid(probs, labels, from_logits=False)), 4)
    0.3333

  References:
    Berman, Rannen Triki & Blaschko, "The Lovász-Softmax loss: A tractable
    surrogate for the optimization of the intersection-over-union measure in
    neural networks", CVPR 2018 (arXiv:1705.08790).
  """
  from_logits = _inputs.check_static_bool(from_logits, "from_logits")
  num_bins = _inputs.check_method(method, num_bins)
  (logits, labels, where, axis, classes, per_image, ignore_index, axis_name,
   rows_axis) = _check(logits, labels, where, axis, classes, per_image,
                       ignore_index, axis_name, image_axis_name,
                       "lovasz_sigmoid", "the Lovász sigmoid (labels must be 0 or 1)")
  if not from_logits:
    _inputs.check_probabilities(logits, labels, ignore_index, where, None)
  return _impl(logits, labels, where,
               errors="sigmoid" if from_logits else "probabilities",
               axis=axis, classes=classes, per_image=per_image,
               ignore_index=ignore_index, num_bins=num_bins,
               axis_name=axis_name, rows_axis=rows_axis)


def lovasz_hinge(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis: int | None = None,
    classes: ClassesLike = "all",
    per_image: bool = True,
    ignore_index: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | tuple[str, ...] | None = None,
    image_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""The Lovász hinge loss, binary or multi-label.

  With signs :math:`s_i = 2 y_i - 1` and errors :math:`e_i = 1 - x_i s_i`,
  for each counted channel :math:`k`

  .. math::
    \ell_k = \sum_i \max(e_{\pi(i)}(k), 0)\, g_i(\pi, k), \qquad
    \text{loss} = \frac{1}{|K|} \sum_{k \in K} \ell_k,

  with :math:`\pi` the descending order of the errors, :math:`g` the Alg. 1
  weights of the foreground (``y = 1``) of channel :math:`k`, and :math:`K`
  the counted channels.

  With ``axis=None`` (the default) there is one binary problem per group and
  its foreground class always counts, so an image without foreground is
  penalised by its largest positive error. With ``axis=k`` (multi-label)
  there is one binary problem per channel along ``k`` and the loss is their
  mean, like the classes of :func:`lovasz_softmax`. segmentation_models_pytorch's
  multilabel mode pools all channels into one binary problem instead, which
  large channels dominate; the mean per channel is the surrogate of the mean
  over channels of ``1 - IoU``, so every channel counts equally. For the pooled
  loss, pass ``axis=None``.

  Edges: void pixels (``where`` false or label ``ignore_index``; in
  multi-label mode each channel of a pixel can be void on its own) take part
  in nothing and get exactly zero gradient. When nothing is counted the loss
  is 0 with a zero gradient, never NaN.

  Args:
    logits: float ``[B, ...]`` real scores; with ``axis=k`` the channel axis
      is ``k``.
    labels: integer (or bool) labels of the logits' shape, 0 or 1 (or
      ``ignore_index``). A concrete call raises ``ValueError`` for other
      values; under ``jax.jit`` the loss is NaN instead.
    axis: None for one binary problem, or the channel axis for multi-label.
    classes: with ``axis=k``, the channels that count in a group: ``"all"``
      (those with a valid pixel), ``"present"`` (those with a valid
      foreground pixel), or a sequence of channel ids (each counts in a group
      where it has a valid pixel). With ``axis=None`` only ``"all"``.
    per_image: loss per image (axis 0, which then cannot be the channel
      axis), then the mean over images that count a channel. Otherwise the
      whole batch is one group.
    ignore_index: label value of void pixels.
    where: boolean mask of valid pixels, the logits' shape.
    axis_name: inside ``jax.shard_map``, the mesh axes over which the
      arguments are split (see :func:`lovasz_softmax`).
    image_axis_name: with ``per_image=True`` inside ``shard_map``, the axes
      among ``axis_name`` that split each image's pixels; without it every
      device is taken to hold whole images (see :func:`lovasz_softmax`).

  Returns:
    A scalar loss; 0 (with zero gradient) when nothing is counted.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lovasz_jax import lovasz_hinge
    >>> logits = jnp.array([[2., -2., 0.5]])
    >>> labels = jnp.array([[1, 0, 0]])
    >>> float(lovasz_hinge(logits, labels))
    0.75
    >>> # Multi-label: channel 1 is that problem, channel 0 is solved.
    >>> both = jnp.stack([jnp.array([[2., -2., -3.]]), logits], axis=-1)
    >>> float(lovasz_hinge(both, jnp.stack([labels, labels], -1), axis=-1))
    0.375

  References:
    Berman, Rannen Triki & Blaschko, CVPR 2018, Sec. 3.1 (the Lovász hinge).
  """
  (logits, labels, where, axis, classes, per_image, ignore_index, axis_name,
   rows_axis) = _check(logits, labels, where, axis, classes, per_image,
                       ignore_index, axis_name, image_axis_name,
                       "lovasz_hinge", "the Lovász hinge (labels must be 0 or 1)")
  return _impl(logits, labels, where, errors="hinge", axis=axis,
               classes=classes, per_image=per_image, ignore_index=ignore_index,
               axis_name=axis_name, rows_axis=rows_axis)
