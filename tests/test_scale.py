"""Exact at scale: 40,000,000 pixels, the value and every pixel's gradient.

Each pixel's weight is the difference of two nearly equal Jaccard values,
about 1/P apart; in float32 that difference is mostly rounding error. The
float64 reference here uses the closed form of that difference (from the
paper's J_i = 1 - (g - tp_i) / (g + fp_i)), so it does not cancel either.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lovasz_jax

P = 40_000_000


def _reference(probs, labels):
  """float64 loss and d loss / d probs of the batch-mode loss, 2 classes."""
  loss, grad = 0.0, np.zeros(probs.shape, np.float64)
  for c in range(2):
    fg = labels == c
    errors = np.abs(fg - probs[:, c].astype(np.float64))
    order = np.argsort(-errors, kind="stable")
    fg_sorted = fg[order]
    g = np.int64(fg.sum())
    tp = np.cumsum(fg_sorted, dtype=np.int64)
    fp = np.arange(1, P + 1, dtype=np.int64) - tp
    union = (g + fp).astype(np.float64)
    w = np.where(fg_sorted, 1.0 / union,
                 (g - tp) / ((union - 1.0) * union))
    loss += errors[order] @ w / 2
    grad[order, c] = np.where(fg_sorted, -w, w) / 2
  return loss, grad


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  u = rng.random(P, dtype=np.float32)
  labels = (rng.random(P) < 0.3).astype(np.int32)
  probs = np.stack([u, np.float32(1) - u], axis=-1)
  value, grad = jax.jit(jax.value_and_grad(
      lambda p, y: lovasz_jax.lovasz_softmax(p, y, from_logits=False)))(
          probs[None], labels[None])
  ours = float(value), np.asarray(grad[0], np.float64)
  return ours, _reference(probs, labels)


@pytest.mark.slow
def test_value_within_1e_5_relative_at_40m_pixels(problem):
  (value, _), (ref_value, _) = problem
  assert abs(value - ref_value) <= 1e-5 * abs(ref_value)


@pytest.mark.slow
def test_every_pixels_gradient_at_40m_pixels(problem):
  (_, grad), (_, ref_grad) = problem
  err = np.abs(grad - ref_grad)
  rel = err / np.maximum(np.abs(ref_grad), np.finfo(np.float64).tiny)
  nonzero = ref_grad != 0
  assert np.median(rel[nonzero]) <= 1e-5
  assert err.max() <= 1e-4 * np.abs(ref_grad).max()


@pytest.mark.slow
def test_float32_running_counts_would_fail_at_40m_pixels(problem):
  # The check above can fail: the reference's recipe in float32 (running
  # float counts, differences of Jaccard values) is far off at this size.
  (_, _), (_, ref_grad) = problem
  rng = np.random.default_rng(0)
  u = rng.random(P, dtype=np.float32)
  fg = (rng.random(P) < 0.3)
  errors = np.abs((~fg).astype(np.float32) - u)  # class 0: label 0 is foreground
  order = np.argsort(-errors, kind="stable")
  fg_sorted = (~fg)[order].astype(np.float32)
  gts = fg_sorted.sum(dtype=np.float32)
  intersection = gts - np.cumsum(fg_sorted, dtype=np.float32)
  union = gts + np.cumsum(np.float32(1) - fg_sorted, dtype=np.float32)
  jaccard = np.float32(1) - intersection / union
  w = np.concatenate([jaccard[:1], jaccard[1:] - jaccard[:-1]])
  grad32 = np.empty(P, np.float64)
  grad32[order] = np.where(fg_sorted == 1, -w, w) / 2
  ref = ref_grad[:, 0]
  nonzero = ref != 0
  assert np.median(np.abs(grad32 - ref)[nonzero] / np.abs(ref[nonzero])) > 1e-2
