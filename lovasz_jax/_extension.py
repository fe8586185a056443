"""The Lovász extension of the Jaccard loss, evaluated on rows of errors.

Everything in this module works on rows: ``errors [..., P]`` (non-negative),
``fg [..., P]`` (the foreground indicator) and ``valid [..., P]``. It knows
nothing about softmax, images or classes.

For one row, with the valid pixels put in descending order of error and
``g`` foreground pixels among them, Alg. 1 of Berman et al. gives the weight
of the i-th pixel as ``J_i - J_{i-1}``, where ``J_i`` is the Jaccard loss of
predicting the first i pixels as foreground. Taking that difference in floating
point cancels catastrophically at millions of pixels, so the weights are
computed in closed form from integer counts ``tp_i`` and ``fp_i`` instead::

    foreground pixel:  1 / (g + fp_i)
    background pixel:  (g - tp_i) / ((g + fp_i - 1) * (g + fp_i)),
                       or 1 when g + fp_i - 1 == 0 (the first pixel of a row
                       with no foreground).

The loss of a row is the dot product of its errors with those weights. The
extension is piecewise linear, so its gradient with respect to the errors is
the weight vector itself: ``row_losses`` has a custom JVP that reuses the
forward pass's weights, and nothing is ever differentiated through a sort.
At tied errors any order of the tied pixels gives a valid subgradient; ties
are broken by putting foreground pixels first, then by the sort's order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lovasz_jax import _cpu
from lovasz_jax import _sharding

_KEY_DTYPES = {4: jnp.uint32, 8: jnp.uint64}


def encode_keys(errors: jax.Array, fg: jax.Array, valid: jax.Array) -> jax.Array:
  """Packs error, foreground bit and validity into one unsigned sort key.

  A non-negative float's bit pattern, read as an unsigned integer, has the
  same order as the float, and its sign bit is free. So
  ``key = ((bits(error) << 1) | fg) + 1`` orders pixels by error (foreground
  first at equal errors), and 0 marks a void pixel, which sorts last. A
  single-operand integer sort then carries everything the weights need.

  Args:
    errors: float errors ``[..., P]``, non-negative (NaN sorts as +inf).
    fg: boolean foreground indicator ``[..., P]``.
    valid: boolean validity ``[..., P]``.

  Returns:
    ``uint32`` keys for float32 errors, ``uint64`` for float64.
  """
  errors = lax.stop_gradient(errors)
  errors = jnp.where(jnp.isnan(errors), jnp.inf, jnp.maximum(errors, 0))
  key_dtype = _KEY_DTYPES[errors.dtype.itemsize]
  bits = lax.bitcast_convert_type(errors, key_dtype)
  keys = ((bits << 1) | fg.astype(key_dtype)) + 1
  return jnp.where(valid, keys, 0).astype(key_dtype)


def closed_form_weights(fg_sorted: jax.Array, valid_sorted: jax.Array,
                        dtype) -> jax.Array:
  """Alg. 1 weights of rows already in descending order of error.

  Args:
    fg_sorted: boolean ``[..., P]``, foreground indicators in sorted order.
    valid_sorted: boolean ``[..., P]``; void pixels must come last.
    dtype: float dtype of the result.

  Returns:
    The weights ``[..., P]``, 0 at void pixels.
  """
  fg = fg_sorted & valid_sorted
  tp = jnp.cumsum(fg, axis=-1, dtype=jnp.int32)
  # Void pixels are last, so the number of valid pixels seen is position + 1.
  seen = lax.broadcasted_iota(jnp.int32, fg.shape, fg.ndim - 1) + 1
  fp = seen - tp
  g = tp[..., -1:]
  union = (g + fp).astype(dtype)
  before = g + fp - 1
  w_fg = 1 / jnp.where(fg, union, 1)
  w_bg = jnp.where(
      before == 0, 1,
      (g - tp).astype(dtype) / (jnp.maximum(before, 1).astype(dtype) * union))
  return jnp.where(valid_sorted, jnp.where(fg, w_fg, w_bg), 0).astype(dtype)


def decode_errors(keys: jax.Array) -> jax.Array:
  """The errors that ``encode_keys`` packed (0 for void pixels)."""
  float_dtype = jnp.float32 if keys.dtype.itemsize == 4 else jnp.float64
  bits = jnp.where(keys == 0, 0, (keys - 1) >> 1).astype(keys.dtype)
  return lax.bitcast_convert_type(bits, float_dtype)


def _weights_and_losses_xla(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Portable path: one XLA sort with the pixel index as payload."""
  axis = keys.ndim - 1
  index = lax.broadcasted_iota(jnp.int32, keys.shape, axis)
  # ~key ascending is key descending; a stable sort makes ties deterministic.
  neg_sorted, perm = lax.sort((~keys, index), dimension=axis, num_keys=1,
                              is_stable=True)
  keys_sorted = ~neg_sorted
  valid = keys_sorted != 0
  fg = ((keys_sorted - 1) & 1) == 1
  errors = decode_errors(keys_sorted)
  w_sorted = closed_form_weights(fg, valid, errors.dtype)
  losses = jnp.sum(errors * w_sorted, axis=-1)
  # Scatter the weights back to pixel order along the last axis.
  lead = [lax.broadcasted_iota(jnp.int32, keys.shape, d) for d in range(axis)]
  spec = _sharding.spec_of(keys)
  w = jnp.zeros(keys.shape, errors.dtype).at[(*lead, perm)].set(
      w_sorted, unique_indices=True,
      out_sharding=jax.typeof(keys).sharding if any(spec) else None)
  return w, losses


def encode_bins(errors: jax.Array, fg: jax.Array, valid: jax.Array,
                num_bins: int) -> jax.Array:
  """Histogram-mode keys: ``((bin << 1) | fg) + 1``, 0 for void pixels.

  ``bin = floor(error * num_bins)``, clipped to ``[0, num_bins)``; the
  quantised error is the bin's centre ``(bin + 1/2) / num_bins``, within
  ``1 / (2 num_bins)`` of every error in ``[0, 1]``. The keys order pixels
  like ``encode_keys`` does, by the quantised errors.
  """
  errors = lax.stop_gradient(errors)
  key_dtype = _KEY_DTYPES[errors.dtype.itemsize]
  scaled = jnp.where(jnp.isnan(errors), num_bins, errors * num_bins)
  bins = jnp.clip(jnp.floor(scaled), 0, num_bins - 1).astype(key_dtype)
  keys = ((bins << 1) | fg.astype(key_dtype)) + 1
  return jnp.where(valid, keys, 0).astype(key_dtype)


def _histogram_xla(keys: jax.Array, num_bins: int) -> tuple[jax.Array, jax.Array]:
  """Portable histogram mode: counts by scatter-add, no sort.

  Each (bin, fg) slot's pixels share one weight: foreground slots weigh
  ``1 / (g + fp)``, a background slot of ``n`` pixels
  ``(g - tp) / ((g + fp) (g + fp + n))`` (``1 / n`` when ``g + fp == 0``),
  with ``tp, fp`` counted before the slot in descending order, foreground
  first within a bin. This is the average of the weights the sorted order
  would give the slot's pixels, so it is a valid subgradient.
  """
  dtype = jnp.float32 if keys.dtype.itemsize == 4 else jnp.float64
  slots = 2 * num_bins + 1
  axis = keys.ndim - 1
  index = keys.astype(jnp.int32)
  lead = [lax.broadcasted_iota(jnp.int32, keys.shape, d) for d in range(axis)]
  spec = _sharding.spec_of(keys)
  out_sharding = (_sharding.named(keys, spec[:-1] + (None,)) if any(spec)
                  else None)
  counts = jnp.zeros(keys.shape[:-1] + (slots,), jnp.int32).at[
      (*lead, index)].add(1, out_sharding=out_sharding)
  desc = counts[..., :0:-1]                     # slots 2K .. 1, descending
  slot = np.arange(slots - 1, 0, -1).reshape((1,) * axis + (slots - 1,))
  is_fg = (slot - 1) & 1 == 1
  tp_after = jnp.cumsum(jnp.where(is_fg, desc, 0), axis=-1)
  fp_after = jnp.cumsum(jnp.where(is_fg, 0, desc), axis=-1)
  g = tp_after[..., -1:]
  tp = tp_after - jnp.where(is_fg, desc, 0)     # before the slot
  fp = fp_after - jnp.where(is_fg, 0, desc)
  u = (g + fp).astype(dtype)
  n = desc.astype(dtype)
  w_fg = 1 / jnp.maximum(u, 1)
  w_bg = jnp.where(u == 0, 1 / jnp.maximum(n, 1),
                   (g - tp).astype(dtype) / (jnp.maximum(u, 1) * (u + n)))
  omega = jnp.where(desc > 0, jnp.where(is_fg, w_fg, w_bg), 0)
  centre = ((((slot - 1) >> 1) + 0.5) / num_bins).astype(dtype)
  losses = jnp.sum(n * omega * centre, axis=-1)
  by_key = jnp.concatenate([jnp.zeros_like(omega[..., :1]), omega[..., ::-1]],
                           axis=-1)
  return jnp.take_along_axis(by_key, index, axis=-1), losses


def weights_and_losses(keys: jax.Array,
                       num_bins: int = 0) -> tuple[jax.Array, jax.Array]:
  """Each pixel's Lovász weight (pixel order) and each row's loss.

  Args:
    keys: ``encode_keys`` keys (``num_bins == 0``, exact: the rows are
      sorted) or ``encode_bins`` keys (``num_bins > 0``: histogram mode).
    num_bins: 0, or the number of bins of ``encode_bins``.
  """
  if keys.shape[-1] == 0:
    dtype = jnp.float32 if keys.dtype.itemsize == 4 else jnp.float64
    return jnp.zeros(keys.shape, dtype), jnp.zeros(keys.shape[:-1], dtype)
  # A row is ordered as a whole: under explicit sharding, a row split over
  # devices (batch mode) is gathered for the kernel, and the weights are
  # handed back with the keys' sharding.
  spec, original = _sharding.spec_of(keys), keys
  split = spec[-1] is not None
  if split:
    keys = _sharding.reshard(keys, spec[:-1] + (None,))
  portable = (functools.partial(_histogram_xla, num_bins=num_bins) if num_bins
              else _weights_and_losses_xla)
  if not _cpu.available():
    w, losses = portable(keys)
  else:
    w, losses = lax.platform_dependent(
        keys, cpu=functools.partial(_cpu.weights_and_losses, num_bins=num_bins),
        default=portable)
  if split:
    w = _sharding.reshard(w, spec, like=original)
  return w, losses


def encode(errors: jax.Array, fg: jax.Array, valid: jax.Array,
           num_bins: int) -> jax.Array:
  """``encode_keys`` (``num_bins == 0``) or ``encode_bins``."""
  if num_bins:
    return encode_bins(errors, fg, valid, num_bins)
  return encode_keys(errors, fg, valid)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def row_losses(errors: jax.Array, fg: jax.Array, valid: jax.Array,
               num_bins: int = 0) -> jax.Array:
  """Lovász extension of the Jaccard loss for each row ``[..., P] -> [...]``.

  The value comes from the kernel (accumulated in double precision on CPU).
  The derivative with respect to ``errors`` is each pixel's weight (0 at
  void pixels): the extension is linear once the order is fixed, so nothing
  is differentiated through the sort. With ``num_bins > 0`` the errors
  (which must lie in [0, 1]) are quantised to that many bins first
  (histogram mode, no sort; the value moves by at most ``1 / (2 num_bins)``).
  """
  return weights_and_losses(encode(errors, fg, valid, num_bins), num_bins)[1]


@row_losses.defjvp
def _row_losses_jvp(num_bins, primals, tangents):
  errors, fg, valid = primals
  w, losses = weights_and_losses(encode(errors, fg, valid, num_bins), num_bins)
  return losses, jnp.sum(tangents[0] * w, axis=-1)


def lovasz_grad(fg_sorted: jax.typing.ArrayLike) -> jax.Array:
  """Alg. 1 of Berman et al.: weights of foreground indicators sorted by error.

  The Lovász extension of the Jaccard loss at an error vector ``e`` is
  ``dot(e_sorted, lovasz_grad(fg_sorted))``, where ``e_sorted`` is ``e`` in
  descending order and ``fg_sorted`` the foreground indicators in that order.
  The weights are the increments ``J_i - J_{i-1}`` of the Jaccard loss
  ``J_i = 1 - (g - tp_i) / (g + fp_i)`` (with ``J_0 = 0``), computed in
  closed form from integer counts so that they stay exact at any size.

  Args:
    fg_sorted: ``[..., P]`` foreground indicators (bool, or numbers 0/1),
      sorted by descending error along the last axis. Leading axes are batch.

  Returns:
    float32 weights ``[..., P]`` (float64 if the input is float64). They
    telescope to ``J_P = 1``: every non-empty row's weights sum to 1.

  References:
    Berman, Rannen Triki & Blaschko, "The Lovász-Softmax loss", CVPR 2018,
    Algorithm 1.
  """
  fg_sorted = jnp.asarray(fg_sorted)
  dtype = jnp.promote_types(
      fg_sorted.dtype if jnp.issubdtype(fg_sorted.dtype, jnp.floating)
      else jnp.float32, jnp.float32)
  fg = fg_sorted.astype(bool)
  return closed_form_weights(fg, jnp.ones_like(fg), dtype)
