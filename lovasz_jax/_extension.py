"""The Lovász extension of the Jaccard loss, evaluated on rows of errors.

Everything in this module works on rows: ``errors [..., P]`` (non-negative),
``fg [..., P]`` (the foreground indicator) and ``valid [..., P]``. It knows
nothing about softmax, images, classes, backends or devices.

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
the weight vector itself: ``_distribute.row_losses`` has a custom JVP that
reuses the forward pass's weights, and nothing is ever differentiated through
a sort.
At tied errors any order of the tied pixels gives a valid subgradient; ties
are broken by putting foreground pixels first, then by pixel order.

Histogram mode (``num_bins = K > 0``) needs no order: the keys hold each
error's bin instead of its bits, a row is summarised by the counts of its
``2K + 1`` slots (see ``slot_weights``), and each pixel takes its slot's
weight. Counts add up, so rows split over devices need only their counts
summed (``_distribute``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lovasz_jax import _sharding

_KEY_DTYPES = {4: jnp.uint32, 8: jnp.uint64}

# Counts are int32 (XLA's native integer on every backend), so a row may hold
# at most 2**31 - 1 pixels; callers check this at trace time.
MAX_ROW_PIXELS = 2**31 - 1


def float_dtype(keys: jax.Array):
  """The float dtype that goes with a key dtype (u32 -> f32, u64 -> f64)."""
  return jnp.float32 if keys.dtype.itemsize == 4 else jnp.float64


# Terms per partial sum in row_dot.
_SUM_BLOCK = 64


def row_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """``sum(a * b, axis=-1)`` to float precision however long the rows.

  Blocks of ``_SUM_BLOCK`` products are summed, then the block sums, and so
  on: the rounding error grows with the number of levels, not with the row.
  XLA decides how one reduce adds its terms, and some of its CPU versions
  add a single long row one term after another (a loss 2.7e-5 off at
  17,408 terms); each level's sums pass through an optimization barrier so
  that XLA cannot merge the levels back into that one reduce.
  """
  return _blocked_sum(a * b)


def _blocked_sum(v: jax.Array) -> jax.Array:
  """``sum(v, axis=-1)`` by levels of ``_SUM_BLOCK`` terms (see row_dot)."""
  n = v.shape[-1]
  # A symbolic row length (shape-polymorphic export) cannot be cut into
  # blocks: one reduce, as XLA chooses to add it.
  if not isinstance(n, int) or n <= _SUM_BLOCK:
    return jnp.sum(v, axis=-1)
  # A window per block, the last one padded with zeros: no slice, reshape
  # or concatenate of the row. (Those took buffers of their own: compiled
  # temp memory of the portable path's loss and gradient went from 3.38x
  # to 4.08x the logits at (1, 96, 96, 19), and 3.50x to 5.18x at
  # (1, 100, 100, 7); with windows it is that of one reduce.) It works on
  # zero rows, and inside custom_partitioning rules (no array constants).
  ones = (1,) * (v.ndim - 1)
  window = ones + (_SUM_BLOCK,)
  padding = [(0, 0)] * (v.ndim - 1) + [(0, -n % _SUM_BLOCK)]
  sums = lax.reduce_window(v, np.zeros((), v.dtype), lax.add, window, window, padding)
  return _blocked_sum(lax.optimization_barrier(sums))


def encode_keys(errors: jax.Array, fg: jax.Array, valid: jax.Array) -> jax.Array:
  """Packs error, foreground bit and validity into one unsigned sort key.

  A non-negative float's bit pattern, read as an unsigned integer, has the
  same order as the float, and its sign bit is free. So
  ``key = ((bits(error) << 1) | fg) + 1`` orders pixels by error (foreground
  first at equal errors), and 0 marks a void pixel, which sorts last. A
  single-operand integer sort then carries everything the weights need.

  Args:
    errors: float errors ``[..., P]``, non-negative (NaN sorts as +inf; the
      losses make such a loss NaN themselves, see ``_losses.poison``).
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


def encode_bins(errors: jax.Array, fg: jax.Array, valid: jax.Array,
                num_bins: int) -> jax.Array:
  """Histogram-mode keys: ``((bin << 1) | fg) + 1``, 0 for void pixels.

  ``bin = floor(error * num_bins)``, clipped to ``[0, num_bins)`` (an error
  of exactly 1 is in the top bin); the quantised error is the bin's centre
  ``(bin + 1/2) / num_bins``, within ``1 / (2 num_bins)`` of every error in
  ``[0, 1]``. The keys order pixels like ``encode_keys`` does, by the
  quantised errors, and a key is also its slot's index in ``[0, 2K]``.
  """
  errors = lax.stop_gradient(errors)
  key_dtype = _KEY_DTYPES[errors.dtype.itemsize]
  scaled = jnp.where(jnp.isnan(errors), num_bins, errors * num_bins)
  bins = jnp.clip(jnp.floor(scaled), 0, num_bins - 1).astype(key_dtype)
  keys = ((bins << 1) | fg.astype(key_dtype)) + 1
  return jnp.where(valid, keys, 0).astype(key_dtype)


def encode(errors: jax.Array, fg: jax.Array, valid: jax.Array,
           num_bins: int) -> jax.Array:
  """``encode_keys`` (``num_bins == 0``) or ``encode_bins``."""
  if num_bins:
    return encode_bins(errors, fg, valid, num_bins)
  return encode_keys(errors, fg, valid)


# The label of a void pixel in the class rows that ``encode_rows`` builds
# (every valid label is at least -C, even after a shift by a chunk's first
# class, so none can be taken for it).
VOID_LABEL = -(2**31)


def encode_rows(x: jax.Array, labels: jax.Array, num_bins: int,
                softmax: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Keys of every class row, from pixel-major logits or probabilities.

  Row ``c`` of a group holds the keys of the errors
  ``|[label_i == c] - p_ic|`` of its pixels (``encode``).

  Args:
    x: float ``[..., P, C]``: logits (``softmax``; the probabilities are
      their softmax over the last axis) or probabilities; finite at void
      pixels (the losses zero them there).
    labels: int32 ``[..., P]``: pixel ``i`` is foreground in row
      ``labels[i]`` (a value outside ``[0, C)`` is foreground in none), or
      void if ``VOID_LABEL``.
    num_bins: 0 (exact keys) or the histogram's bins.
    softmax: whether ``x`` are logits.

  Returns:
    Keys ``[..., C, P]`` (uint32, or uint64 for float64), the logits'
    log-sum-exp over the classes ``[..., P]`` (0 if not ``softmax``), and
    int32 ``[..., P]``: 1 at valid pixels with a value out of its domain (a
    non-finite logit, or a probability outside [0, 1] or NaN), else 0.
  """
  lo, hi = ((-jnp.finfo(x.dtype).max, jnp.finfo(x.dtype).max) if softmax
            else (0, 1))
  out_of_range = jnp.any(~((x >= lo) & (x <= hi)), axis=-1)
  bad = ((labels != VOID_LABEL) & out_of_range).astype(jnp.int32)
  lse = jax.nn.logsumexp(x, axis=-1) if softmax else jnp.zeros_like(x[..., 0])
  return row_keys(x, lse, labels, num_bins, softmax), lse, bad


def row_keys(x: jax.Array, lse: jax.Array, labels: jax.Array, num_bins: int,
             softmax: bool) -> jax.Array:
  """The keys of ``encode_rows``, given the logits' log-sum-exp ``lse``.

  The histogram gradient recomputes the keys with this, from the same
  operands and by the same operations as the forward pass.
  """
  probs = jnp.exp(x - lse[..., None]) if softmax else x
  fg = labels[..., None] == lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  valid = jnp.broadcast_to((labels != VOID_LABEL)[..., None], x.shape)
  errors = jnp.abs(fg.astype(probs.dtype) - probs)
  rows = lambda a: jnp.swapaxes(a, -1, -2)
  return encode(rows(errors), rows(fg), rows(valid), num_bins)


def rows_grad(x: jax.Array, lse: jax.Array, labels: jax.Array, w: jax.Array,
              ct: jax.Array, softmax: bool) -> jax.Array:
  """The gradient of ``sum_c ct_c loss_c`` for rows built by ``encode_rows``.

  Args:
    x: ``[..., P, C]``: the probabilities given to ``encode_rows``, or with
      ``softmax`` the logits whose probabilities they were; finite at void
      pixels (the losses zero them there).
    lse: ``[..., P]``: with ``softmax``, the logits' log-sum-exp over the
      classes (the probabilities are recomputed as ``exp(x - lse)``, so
      nothing of their size is kept for the backward pass); else unused.
    labels: int32 ``[..., P]`` as given to ``encode_rows``.
    w: each pixel's Lovász weight in each row ``[..., C, P]`` (0 if void).
    ct: ``[..., C]`` the cotangent of each row's loss.
    softmax: whether the gradient is with respect to logits.

  Returns:
    ``[..., P, C]``, the dtype of ``x``: 0 at void pixels (NaN everywhere for
    a NaN cotangent).
  """
  fg = labels[..., None] == lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  w = jnp.swapaxes(w, -1, -2)
  d_probs = ct[..., None, :].astype(w.dtype) * jnp.where(fg, -w, w)
  if not softmax:
    return d_probs.astype(x.dtype)
  # The barrier keeps XLA from merging this recomputation with the forward
  # pass's probabilities (which would keep those alive until here).
  x, lse = lax.optimization_barrier((x, lse))
  probs = jnp.exp(x - lse[..., None])
  d_x = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
  return d_x.astype(x.dtype)


def prefix_counts(flags: jax.Array) -> jax.Array:
  """Inclusive prefix counts of boolean ``flags`` along the last axis (int32).

  Equal to ``cumsum(flags, dtype=int32)``, without a full-size int32 input
  or scan: the flags are packed 32 to a uint32 word, the words' population
  counts are scanned (1/32 of the size), and each position adds the
  population count of its word's bits up to it. XLA fuses that last step
  into its consumer, so no full-size temporary remains.
  """
  lead, pixels = flags.shape[:-1], flags.shape[-1]
  words = -(-pixels // 32)
  bits = jnp.pad(flags, [(0, 0)] * len(lead) + [(0, words * 32 - pixels)])
  bits = bits.reshape(lead + (words, 32)).astype(jnp.uint32)
  shift = lax.broadcasted_iota(jnp.uint32, bits.shape, bits.ndim - 1)
  packed = jnp.sum(bits << shift, axis=-1, dtype=jnp.uint32)   # [..., words]
  per_word = lax.population_count(packed).astype(jnp.int32)
  before = jnp.cumsum(per_word, axis=-1) - per_word
  upto = (jnp.uint32(2) << shift) - 1                           # bits 0..j
  inner = lax.population_count(packed[..., None] & upto).astype(jnp.int32)
  return (before[..., None] + inner).reshape(lead + (words * 32,))[..., :pixels]


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
  tp = prefix_counts(fg)
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
  bits = jnp.where(keys == 0, 0, (keys - 1) >> 1).astype(keys.dtype)
  return lax.bitcast_convert_type(bits, float_dtype(keys))


def sorted_weights(keys_sorted: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Weights (in sorted order) and row losses of keys sorted descending."""
  valid = keys_sorted != 0
  fg = ((keys_sorted - 1) & 1) == 1
  errors = decode_errors(keys_sorted)
  w_sorted = closed_form_weights(fg, valid, errors.dtype)
  return w_sorted, row_dot(errors, w_sorted)


def slot_weights(counts: jax.Array, num_bins: int,
                 dtype) -> tuple[jax.Array, jax.Array]:
  """Histogram mode: each slot's weight and each row's loss, from counts.

  Slot ``s = ((bin << 1) | fg) + 1`` holds the row's pixels of one bin and
  kind; slot 0 holds the void pixels. In descending order (foreground first
  within a bin) each slot's pixels share one weight: a foreground slot
  weighs ``1 / (g + fp)``, a background slot of ``n`` pixels
  ``(g - tp) / ((g + fp) (g + fp + n))`` (``1 / n`` when ``g + fp == 0``),
  with ``tp, fp`` counted before the slot. That is the average of the
  weights the sorted order would give the slot's pixels (all their errors
  are the bin's centre), so it is a valid subgradient, and the row's loss is
  the exact loss of the quantised errors.

  Args:
    counts: int ``[..., 2K + 1]`` pixels per slot (the whole row's, summed
      over devices if the row is split).
    num_bins: K.
    dtype: float dtype of the results.

  Returns:
    ``omega [..., 2K + 1]`` (0 for slot 0; an empty slot gets the weight a
    pixel of it would get, so that a key recomputed one rounding away, in
    an adjacent slot, still gets a sensible weight), and the row losses
    ``[...]``.
  """
  # Bin b holds slots 2b + 1 (background) and 2b + 2 (foreground): the
  # counts as [..., K, (bg, fg)], bins in descending order of error. One
  # cumulative sum along the bins gives both running counts (inclusive).
  lead = counts.shape[:-1]
  pairs = counts[..., 1:].reshape(lead + (num_bins, 2))[..., ::-1, :]
  # (An associative scan: XLA's CPU cumsum of this [..., K, 2] array takes
  # about twice as long. Integer sums: the same result.)
  running = lax.associative_scan(jnp.add, pairs, axis=pairs.ndim - 2)
  n_bg, n_fg = pairs[..., 0], pairs[..., 1]
  tp_incl, fp_incl = running[..., 1], running[..., 0]
  g = tp_incl[..., -1:]
  fp = fp_incl - n_bg          # before the bin (foreground comes first)
  u = (g + fp).astype(dtype)
  w_fg = 1 / jnp.maximum(u, 1)
  # A background slot comes after its bin's foreground pixels (tp_incl),
  # which add nothing to the union.
  nb = n_bg.astype(dtype)
  w_bg = jnp.where(u == 0, 1 / jnp.maximum(nb, 1),
                   (g - tp_incl).astype(dtype) / (jnp.maximum(u, 1) * (u + nb)))
  # Built from an iota, not a NumPy constant: this runs inside
  # custom_partitioning rules, which take no constants.
  bins = num_bins - 1 - lax.broadcasted_iota(jnp.int32, n_fg.shape, n_fg.ndim - 1)
  centre = ((bins + 0.5) / num_bins).astype(dtype)
  losses = row_dot(centre, n_fg.astype(dtype) * w_fg + nb * w_bg)
  by_bin = jnp.stack([w_bg, w_fg], axis=-1)[..., ::-1, :].reshape(lead + (2 * num_bins,))
  by_key = jnp.concatenate([jnp.zeros_like(by_bin[..., :1]), by_bin], axis=-1)
  return by_key, losses


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

  Raises:
    ValueError: for a 0-d input (there is no pixel axis).
    TypeError: for a non-numeric input.

  References:
    Berman, Rannen Triki & Blaschko, "The Lovász-Softmax loss", CVPR 2018,
    Algorithm 1.
  """
  fg_sorted = jnp.asarray(fg_sorted)
  if fg_sorted.ndim == 0:
    raise ValueError(
        "lovasz_grad needs at least one axis (the sorted pixels, last), got a "
        f"0-d input {fg_sorted!r}.")
  if not (fg_sorted.dtype == jnp.bool_
          or jnp.issubdtype(fg_sorted.dtype, jnp.integer)
          or jnp.issubdtype(fg_sorted.dtype, jnp.floating)):
    raise TypeError(
        f"lovasz_grad takes 0/1 or boolean indicators, got dtype {fg_sorted.dtype}.")
  dtype = jnp.promote_types(
      fg_sorted.dtype if jnp.issubdtype(fg_sorted.dtype, jnp.floating)
      else jnp.float32, jnp.float32)
  # The running counts run along the last axis: it must not be split over
  # devices of an explicit mesh.
  fg = _sharding.whole_axis(fg_sorted.astype(bool), -1)
  return closed_form_weights(fg, jnp.ones_like(fg), dtype)
