"""method="histogram": sort-free, within 1/(2K) of the exact loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lovasz_jax
from tests import reference

pytestmark = pytest.mark.usefixtures("path")


def _quantised_reference(logits, labels, num_bins, **kwargs):
  """The exact float64 loss of the errors replaced by their bins' centres."""
  probs = reference.softmax(np.asarray(logits, np.float64))
  num_classes = probs.shape[-1]
  fg = labels[..., None] == np.arange(num_classes)
  errors = np.abs(fg - probs)
  bins = np.clip(np.floor(errors * num_bins), 0, num_bins - 1)
  centres = (bins + 0.5) / num_bins
  # Probabilities whose errors are the centres: p = fg - centre or centre.
  q = np.where(fg, 1 - centres, centres)
  return reference.lovasz_softmax(q, labels, from_logits=False, **kwargs)[0]


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from([1, 7, 64, 4096]), st.booleans(),
       st.sampled_from(["present", "all"]))
def test_histogram_is_the_exact_loss_of_the_quantised_errors(seed, num_bins, per_image,
                                                             classes):
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(2, 7, 6, 4)) * 3).astype(np.float32)
  labels = rng.integers(0, 4, (2, 7, 6))
  where = rng.random(labels.shape) < 0.8
  kwargs = dict(per_image=per_image, classes=classes, where=where)
  hist = lovasz_jax.lovasz_softmax(logits, labels, method="histogram", num_bins=num_bins,
                                   **kwargs)
  exact = lovasz_jax.lovasz_softmax(logits, labels, **kwargs)
  np.testing.assert_allclose(hist, _quantised_reference(logits, labels, num_bins, **kwargs),
                             atol=2e-5)
  assert abs(float(hist) - float(exact)) <= 0.5 / num_bins + 1e-6


def _quantised_gradient_reference(logits, labels, where, num_bins, from_logits=True):
  """float64 d loss / d logits of the histogram loss (batch, "present").

  From the definition: the errors are quantised to their bins, put in
  descending order with foreground first within a bin, and given Alg. 1's
  weights; each pixel takes the mean weight of its (bin, kind) slot. With
  ``from_logits=False`` the inputs are float32 probabilities, binned as
  float32 errors (as the loss bins them).
  """
  x = np.asarray(logits, np.float64)
  num_classes = x.shape[-1]
  p = (reference.softmax(x) if from_logits else x).reshape(-1, num_classes)
  lab, val = labels.reshape(-1), where.reshape(-1)
  idx = np.flatnonzero(val)
  grad_p = np.zeros_like(p)
  present = [c for c in range(num_classes) if np.any(lab[idx] == c)]
  for c in present:
    fg = lab[idx] == c
    errors = np.abs(fg - p[idx, c])
    if from_logits:
      bins = np.clip(np.floor(errors * num_bins), 0, num_bins - 1)
      # Nothing may lie within float32 rounding of a bin's edge.
      assert np.min(np.abs(errors * num_bins - np.round(errors * num_bins))) > 1e-4
    else:
      scaled = np.abs(fg.astype(np.float32) - p[idx, c].astype(np.float32)) * np.float32(
          num_bins)
      bins = np.clip(np.floor(scaled), 0, num_bins - 1).astype(np.float64)
    order = np.lexsort((~fg, -bins))
    w = np.empty(idx.size)
    w[order] = reference.alg1_weights(fg[order])
    slot = 2 * bins + fg
    mean = {s: w[slot == s].mean() for s in np.unique(slot)}
    w = np.array([mean[s] for s in slot])
    grad_p[idx, c] = np.where(fg, -w, w) / len(present)
  if not from_logits:
    return grad_p.reshape(x.shape)
  grad_x = p * (grad_p - np.sum(grad_p * p, axis=-1, keepdims=True))
  return grad_x.reshape(x.shape)


@pytest.mark.parametrize("num_bins", [8, 64])
def test_gradient_is_the_mean_weight_of_each_slot(num_bins):
  rng = np.random.default_rng(11)
  logits = (rng.normal(size=(2, 9, 7, 4)) * 1.5).astype(np.float32)
  labels = rng.integers(0, 4, (2, 9, 7))
  where = rng.random(labels.shape) < 0.85
  grad = jax.jit(jax.grad(functools.partial(
      lovasz_jax.lovasz_softmax, method="histogram", num_bins=num_bins)))(
          logits, labels, where=where)
  np.testing.assert_allclose(
      grad, _quantised_gradient_reference(logits, labels, where, num_bins),
      rtol=1e-4, atol=1e-7)
  assert not np.any(np.asarray(grad)[~where])


@pytest.mark.parametrize("num_bins", [16, 4096])
def test_gradient_on_bin_edges(num_bins):
  # Every error exactly on a bin's edge: the gradient pass, which recomputes
  # each pixel's slot, must find the slot that the forward pass counted.
  rng = np.random.default_rng(3)
  k = rng.integers(0, num_bins + 1, size=(2, 150))
  p1 = (k / num_bins).astype(np.float32)
  probs = np.stack([1 - p1, p1], axis=-1)
  labels = (rng.random(k.shape) < 0.4).astype(np.int32)
  where = rng.random(k.shape) < 0.9
  grad = jax.jit(jax.grad(functools.partial(
      lovasz_jax.lovasz_softmax, from_logits=False, method="histogram",
      num_bins=num_bins)))(probs, labels, where=where)
  np.testing.assert_allclose(
      grad, _quantised_gradient_reference(probs, labels, where, num_bins, from_logits=False),
      rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("num_bins", [16, 256, 4096])
def test_bound_is_attained(num_bins):
  # Every error on a bin's lower edge: each moves up by exactly 1/(2K), and
  # a row's weights sum to 1, so the loss moves by exactly 1/(2K).
  k = np.arange(1, 200) % (num_bins - 1) + 1
  p1 = (k / num_bins).astype(np.float32)
  probs = np.stack([1 - p1, p1], axis=-1)[None]
  labels = np.zeros((1, k.size), np.int32)  # class 0: errors are p1
  exact = lovasz_jax.lovasz_softmax(probs, labels, from_logits=False)
  hist = lovasz_jax.lovasz_softmax(probs, labels, from_logits=False, method="histogram",
                                   num_bins=num_bins)
  np.testing.assert_allclose(float(hist) - float(exact), 0.5 / num_bins, rtol=1e-4)


@pytest.mark.parametrize("per_image", [False, True])
def test_gradients_agree_with_exact_in_aggregate(per_image):
  rng = np.random.default_rng(1)
  logits = (rng.normal(size=(2, 32, 32, 5)) * 2).astype(np.float32)
  labels = rng.integers(0, 5, (2, 32, 32))
  f = functools.partial(lovasz_jax.lovasz_softmax, per_image=per_image)
  _, g_exact = jax.value_and_grad(f)(logits, labels)
  _, g_hist = jax.value_and_grad(functools.partial(f, method="histogram"))(logits, labels)
  g_exact, g_hist = np.asarray(g_exact, np.float64), np.asarray(g_hist, np.float64)
  rel = np.linalg.norm(g_hist - g_exact) / np.linalg.norm(g_exact)
  assert rel < 0.02
  np.testing.assert_allclose(g_hist.sum(), g_exact.sum(), atol=1e-6)
  np.testing.assert_allclose(np.abs(g_hist).sum(), np.abs(g_exact).sum(), rtol=0.02)


def test_hard_predictions_within_the_bound():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 3, (2, 9, 9))
  pred = np.where(rng.random(labels.shape) < 0.7, labels, rng.integers(0, 3, labels.shape))
  probs = np.eye(3, dtype=np.float32)[pred]
  hist = lovasz_jax.lovasz_softmax(probs, labels, from_logits=False, method="histogram",
                                   num_bins=64)
  expected = reference.mean_iou_loss(pred, labels, np.ones(labels.shape, bool), 3)
  assert abs(float(hist) - expected) <= 0.5 / 64 + 1e-6


def test_all_void_jit_and_vmap():
  f = jax.jit(jax.vmap(jax.value_and_grad(functools.partial(
      lovasz_jax.lovasz_softmax, method="histogram", ignore_index=255, num_bins=8))))
  logits = np.random.default_rng(3).normal(size=(3, 2, 4, 4, 3)).astype(np.float32)
  labels = np.random.default_rng(3).integers(0, 3, (3, 2, 4, 4))
  labels[1] = 255
  values, grads = f(logits, labels)
  assert values[1] == 0 and not np.any(grads[1])
  for i in (0, 2):
    v, g = jax.value_and_grad(functools.partial(
        lovasz_jax.lovasz_softmax, method="histogram", num_bins=8))(logits[i], labels[i])
    np.testing.assert_allclose(values[i], v, rtol=1e-6)
    np.testing.assert_allclose(grads[i], g, atol=1e-7)


@pytest.mark.parametrize("num_bins", [4, 4096])
def test_rows_without_foreground_with_several_pixels_in_the_top_bin(num_bins):
  # An absent class counted with classes="all": its row has no foreground,
  # and several background pixels share the top bin. The row's loss is its
  # largest quantised error (the first background pixel weighs 1).
  probs = np.zeros((1, 6, 3), np.float32)
  probs[..., 0] = 1.0
  probs[0, :4] = [0.0, 0.0, 1.0]   # class 2 is absent from the labels
  probs[0, 4:] = [0.0, 1.0, 0.0]
  labels = np.array([[0, 0, 0, 0, 1, 1]])
  kwargs = dict(classes="all", from_logits=False)
  hist = lovasz_jax.lovasz_softmax(probs, labels, method="histogram", num_bins=num_bins,
                                   **kwargs)
  centres = np.clip(np.floor(np.abs((labels[..., None] == np.arange(3)) - probs)
                             * num_bins), 0, num_bins - 1)
  q = (centres + 0.5) / num_bins
  ref = reference.lovasz_softmax(np.where(labels[..., None] == np.arange(3), 1 - q, q),
                                 labels, from_logits=False, classes="all")[0]
  np.testing.assert_allclose(hist, ref, atol=1e-6)
  exact = lovasz_jax.lovasz_softmax(probs, labels, **kwargs)
  assert abs(float(hist) - float(exact)) <= 0.5 / num_bins + 1e-6


def test_sigmoid_image_without_foreground_in_histogram_mode():
  # per_image: image 1 has no foreground, and all its errors are in the top
  # bin; its loss is its largest quantised error.
  x = np.full((2, 8), 6.0, np.float32)
  labels = np.zeros((2, 8), np.int32)
  labels[0, :3] = 1
  for num_bins in (4, 64):
    hist = lovasz_jax.lovasz_sigmoid(x, labels, per_image=True, method="histogram",
                                     num_bins=num_bins)
    exact = lovasz_jax.lovasz_sigmoid(x, labels, per_image=True)
    assert abs(float(hist) - float(exact)) <= 0.5 / num_bins + 1e-6
    e = 1 / (1 + np.exp(-6.0))
    top = (min(np.floor(e * num_bins), num_bins - 1) + 0.5) / num_bins
    # image 0: 3 foreground pixels with error 1 - e (bottom bin), 5
    # background pixels with error e; image 1: 8 background pixels.
    q0 = reference.extension(
        np.array([(np.floor((1 - e) * num_bins) + 0.5) / num_bins] * 3 + [top] * 5),
        np.array([1.0] * 3 + [0.0] * 5))[0]
    np.testing.assert_allclose(hist, (q0 + top) / 2, atol=1e-6)


def test_errors_of_exactly_one_fall_in_the_top_bin():
  # One-hot probabilities that are wrong: foreground errors of exactly 1.0,
  # on the edge of the top bin, which is [1 - 1/K, 1].
  labels = np.array([[0, 0, 1, 1, 1]])
  pred = np.array([[1, 0, 0, 1, 1]])
  probs = np.eye(2, dtype=np.float32)[pred]
  for num_bins in (1, 8, 4096):
    hist = lovasz_jax.lovasz_softmax(probs, labels, from_logits=False, method="histogram",
                                     num_bins=num_bins)
    top, bottom = (num_bins - 0.5) / num_bins, 0.5 / num_bins
    fg = labels[..., None] == np.arange(2)
    q = np.where(np.eye(2, dtype=bool)[pred] == fg, bottom, top)
    ref = reference.lovasz_softmax(np.where(fg, 1 - q, q), labels, from_logits=False)[0]
    np.testing.assert_allclose(hist, ref, atol=1e-6)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(method="bins"), r'method must be "sort" or "histogram", got \'bins\''),
    (dict(method="histogram", num_bins=0), r"num_bins must be a positive int, got 0"),
    (dict(method="histogram", num_bins=2**25), r"num_bins must be at most 2\*\*24"),
])
def test_bad_method_options(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    lovasz_jax.lovasz_softmax(np.zeros((1, 2, 3), np.float32), np.zeros((1, 2), np.int32),
                              **kwargs)


@pytest.mark.parametrize("axis", [None, -1])
def test_sigmoid_histogram_within_the_bound(axis):
  rng = np.random.default_rng(5)
  logits = (rng.normal(size=(2, 12, 10, 3)) * 2).astype(np.float32)
  labels = (rng.random(logits.shape) < 0.3).astype(np.int32)
  for num_bins in (8, 4096):
    exact = lovasz_jax.lovasz_sigmoid(logits, labels, axis=axis)
    hist = lovasz_jax.lovasz_sigmoid(logits, labels, axis=axis, method="histogram",
                                     num_bins=num_bins)
    assert abs(float(hist) - float(exact)) <= 0.5 / num_bins + 1e-6
  g_exact = jax.grad(functools.partial(lovasz_jax.lovasz_sigmoid, axis=axis))(logits, labels)
  g_hist = jax.grad(functools.partial(lovasz_jax.lovasz_sigmoid, axis=axis,
                                      method="histogram"))(logits, labels)
  assert np.linalg.norm(g_hist - g_exact) / np.linalg.norm(g_exact) < 0.02


@pytest.mark.parametrize("num_classes", [8, 19])
def test_gradient_with_eight_or_more_classes(num_classes):
  # The native passes move 8 x 8 blocks between the pixel-major logits and
  # the class-major tiles (x86-64-v3), and the rest one value at a time:
  # 8 and 19 classes, and a pixel count that leaves partial blocks.
  rng = np.random.default_rng(num_classes)
  x = rng.random((1, 203, num_classes)) ** 3
  probs = (x / x.sum(-1, keepdims=True)).astype(np.float32)
  labels = rng.integers(0, num_classes, (1, 203))
  where = rng.random(labels.shape) < 0.9
  grad = jax.jit(jax.grad(functools.partial(
      lovasz_jax.lovasz_softmax, from_logits=False, method="histogram", num_bins=64)))(
          probs, labels, where=where)
  np.testing.assert_allclose(
      grad, _quantised_gradient_reference(probs, labels, where, 64, from_logits=False),
      rtol=1e-5, atol=1e-9)
