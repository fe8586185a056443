"""lovasz_softmax against the float64 reference, and its properties."""

import functools

import chex
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lovasz_jax
from tests import reference

# Values and gradients on both paths: the native CPU kernel and the portable
# XLA path that GPU and TPU run.
pytestmark = pytest.mark.usefixtures("path")


@st.composite
def problems(draw):
  """A random problem and a random combination of every option."""
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  batch = draw(st.integers(1, 3))
  spatial = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
  num_classes = draw(st.integers(1, 5))
  labels_shape = (batch,) + spatial
  axis = draw(st.sampled_from([-1, 1, 0]))
  classes = draw(st.sampled_from(["present", "all", "subset"]))
  if classes == "subset":
    k = draw(st.integers(1, num_classes))
    classes = tuple(int(c) for c in rng.permutation(num_classes)[:k])
  ignore_index = draw(st.sampled_from([None, 255, -1]))
  use_where = draw(st.booleans())
  use_weights = draw(st.booleans())
  from_logits = draw(st.booleans())
  per_image = draw(st.booleans())
  labels = rng.integers(0, num_classes, labels_shape)
  if ignore_index is not None:
    labels = np.where(rng.random(labels_shape) < 0.2, ignore_index, labels)
  where = rng.random(labels_shape) < 0.8 if use_where else None
  logits_cl = rng.normal(size=labels_shape + (num_classes,)) * 2
  if not from_logits:
    logits_cl = reference.softmax(logits_cl)
  logits = np.moveaxis(logits_cl, -1, axis)
  weights = None
  if use_weights:
    # Some classes weigh 0, so that groups whose counted classes all weigh 0
    # (and so do not count) are drawn too; at least one weight is positive.
    weights = rng.random(num_classes) + 0.1
    weights[rng.random(num_classes) < 0.4] = 0.0
    weights[rng.integers(num_classes)] += 1.0
  kwargs = dict(axis=axis, classes=classes, per_image=per_image,
                ignore_index=ignore_index, where=where, class_weights=weights,
                from_logits=from_logits,
                class_chunk_size=draw(st.sampled_from([None, None, 1, 2, 3])))
  return logits, labels, kwargs


def _loss_and_grad(logits, labels, kwargs):
  static = {k: v for k, v in kwargs.items() if k in lovasz_jax.SOFTMAX_STATIC_ARGNAMES}
  dynamic = {k: v for k, v in kwargs.items() if k not in static}
  fn = functools.partial(lovasz_jax.lovasz_softmax, **static)
  return jax.jit(jax.value_and_grad(fn))(logits, labels, **dynamic)


@settings(max_examples=16, deadline=None)
@given(problems())
def test_value_matches_reference_float32(problem):
  logits, labels, kwargs = problem
  value, grad = _loss_and_grad(jnp.asarray(logits, jnp.float32), labels, kwargs)
  kwargs = dict(kwargs)
  chunk = kwargs.pop("class_chunk_size")
  ref_value, _ = reference.lovasz_softmax(logits.astype(np.float32), labels, **kwargs)
  kwargs["class_chunk_size"] = chunk
  assert value.dtype == jnp.float32 and grad.dtype == jnp.float32
  np.testing.assert_allclose(value, ref_value, atol=1e-5)
  assert np.all(np.isfinite(grad))


@settings(max_examples=18, deadline=None)
@given(problems())
def test_value_and_grad_match_reference_float64(problem):
  # In float64 the errors have no ties, so the gradient is unique.
  logits, labels, kwargs = problem
  with jax.enable_x64(True):
    value, grad = _loss_and_grad(jnp.asarray(logits), labels, kwargs)
    assert grad.dtype == jnp.float64
  kwargs.pop("class_chunk_size")
  ref_value, ref_grad = reference.lovasz_softmax(logits, labels, **kwargs)
  np.testing.assert_allclose(value, ref_value, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-8, atol=1e-11)


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 10**6))
def test_grad_float32_at_tie_free_points(seed):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(2, 6, 7, 4)).astype(np.float32) * 3
  labels = rng.integers(0, 4, (2, 6, 7))
  _, ref_grad = reference.lovasz_softmax(logits, labels)
  _, grad = _loss_and_grad(logits, labels, {})
  # Points where two errors of one class are within float32 resolution may
  # be ordered differently from float64; skip them (the loss has a kink there).
  p = reference.softmax(logits.astype(np.float64)).reshape(-1, 4)
  lab = labels.reshape(-1)
  for c in range(4):
    err = np.sort(np.abs((lab == c) - p[:, c]))
    if np.min(np.diff(err)) < 1e-6:
      return
  np.testing.assert_allclose(grad, ref_grad, atol=1e-6)


def test_check_grads_at_tie_free_points(x64):
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(2, 5, 4, 3)))
  labels = jnp.asarray(rng.integers(0, 3, (2, 5, 4)))
  for per_image in (False, True):
    fn = functools.partial(lovasz_jax.lovasz_softmax, labels=labels, per_image=per_image)
    check_grads(lambda x: fn(x), (logits,), order=1, modes=("rev",),
                              eps=1e-6, atol=1e-6, rtol=1e-6)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 6), st.booleans())
def test_hard_predictions_give_mean_one_minus_iou(seed, num_classes, use_where):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, (2, 9, 8))
  pred = np.where(rng.random(labels.shape) < 0.6, labels,
                  rng.integers(0, num_classes, labels.shape))
  where = rng.random(labels.shape) < 0.7 if use_where else None
  probs = np.eye(num_classes, dtype=np.float32)[pred]
  loss = lovasz_jax.lovasz_softmax(probs, labels, from_logits=False, where=where)
  valid = np.ones(labels.shape, bool) if where is None else where
  np.testing.assert_allclose(
      loss, reference.mean_iou_loss(pred, labels, valid, num_classes), atol=1e-6)


@settings(max_examples=8, deadline=None)
@given(problems())
def test_where_equals_slicing_out(problem):
  logits, labels, kwargs = problem
  kwargs["per_image"] = False
  axis = kwargs.pop("axis")
  ignore_index = kwargs.pop("ignore_index")
  where = kwargs.pop("where")
  x = np.moveaxis(logits, axis, -1).astype(np.float32)
  if where is None:
    where = np.random.default_rng(0).random(labels.shape) < 0.5
  masked = lovasz_jax.lovasz_softmax(x, labels, where=where, ignore_index=ignore_index,
                                     **kwargs)
  sliced = lovasz_jax.lovasz_softmax(x[where][None], labels[where][None],
                                     ignore_index=ignore_index, **kwargs)
  np.testing.assert_allclose(masked, sliced, atol=1e-6)


@pytest.mark.parametrize("per_image", [False, True])
def test_axis_equals_moveaxis(per_image):
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 4, 6, 5)).astype(np.float32)  # NCHW
  labels = rng.integers(0, 4, (2, 6, 5))
  f = jax.value_and_grad(lovasz_jax.lovasz_softmax)
  v1, g1 = f(logits, labels, axis=1, per_image=per_image)
  v2, g2 = f(np.moveaxis(logits, 1, -1), labels, per_image=per_image)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  np.testing.assert_allclose(g1, np.moveaxis(g2, -1, 1), atol=1e-7)


@settings(max_examples=8, deadline=None)
@given(problems())
def test_per_image_equals_loop_over_images(problem):
  logits, labels, kwargs = problem
  kwargs["per_image"] = True
  where = kwargs.pop("where")
  if where is None:
    where = np.ones(labels.shape, bool)
  where[0] = False  # one image with no valid pixel: it does not count
  axis = kwargs["axis"] % logits.ndim
  whole = lovasz_jax.lovasz_softmax(logits.astype(np.float32), labels, where=where,
                                    **kwargs)
  ignore = kwargs["ignore_index"]
  losses = []
  for b in range(labels.shape[0]):
    # With axis=0 the logits are [C, B, ...]: the images are their axis 1.
    x_b = np.take(logits, [b], axis=1 if axis == 0 else 0).astype(np.float32)
    valid = where[b] & (labels[b] != ignore if ignore is not None else True)
    present = np.unique(labels[b][valid])
    cls = kwargs["classes"]
    num_classes = logits.shape[axis]
    counted = (present if cls == "present"
               else range(num_classes) if cls == "all" else cls)
    weights = kwargs["class_weights"]
    total = sum(1.0 if weights is None else weights[c] for c in counted)
    # An image counts if it counts a class of positive total weight.
    if valid.any() and total > 0:
      losses.append(lovasz_jax.lovasz_softmax(x_b, labels[b:b + 1], where=where[b:b + 1],
                                              **kwargs))
  expected = np.mean(losses) if losses else 0.0
  np.testing.assert_allclose(whole, expected, atol=1e-6)


def test_all_void_is_zero_with_zero_grad():
  logits = jnp.ones((2, 3, 3, 4))
  labels = jnp.full((2, 3, 3), 255)
  for per_image in (False, True):
    for classes in ("present", "all", (1, 2)):
      v, g = jax.value_and_grad(lovasz_jax.lovasz_softmax)(
          logits, labels, ignore_index=255, per_image=per_image, classes=classes)
      assert v == 0.0
      assert not np.any(g)
  v, g = jax.value_and_grad(lovasz_jax.lovasz_softmax)(
      logits, labels * 0, where=jnp.zeros((2, 3, 3), bool))
  assert v == 0.0 and not np.any(g)


def test_void_pixels_get_exactly_zero_grad_even_when_not_finite():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(1, 4, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (1, 4, 4))
  labels[0, 0, :2] = 255
  logits[0, 0, 0] = np.nan
  logits[0, 0, 1] = np.inf
  v, g = jax.value_and_grad(lovasz_jax.lovasz_softmax)(logits, labels, ignore_index=255)
  ref, _ = reference.lovasz_softmax(logits[:, :, :, :][labels != 255][None], labels[labels != 255][None])
  np.testing.assert_allclose(v, ref, atol=1e-6)
  assert np.all(g[0, 0, :2] == 0)
  assert np.all(np.isfinite(g))


def test_single_pixel():
  logits = np.array([[0.3, -1.0, 2.0]], np.float32)
  for label in range(3):
    v = lovasz_jax.lovasz_softmax(logits, np.array([label]))
    ref, _ = reference.lovasz_softmax(logits, np.array([label]))
    np.testing.assert_allclose(v, ref, atol=1e-6)
    # One pixel: the only present class's error is 1 - p, with weight 1.
    np.testing.assert_allclose(v, 1 - reference.softmax(logits)[0, label], atol=1e-6)


def test_absent_class_with_all_counts_its_largest_probability():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(1, 10, 3)).astype(np.float32)
  labels = np.where(rng.random((1, 10)) < 0.5, 0, 1)  # class 2 absent
  p = reference.softmax(logits.astype(np.float64))
  both = lovasz_jax.lovasz_softmax(logits, labels, classes="all")
  present = lovasz_jax.lovasz_softmax(logits, labels, classes="present")
  only_absent = lovasz_jax.lovasz_softmax(logits, labels, classes=[2])
  np.testing.assert_allclose(only_absent, p[..., 2].max(), rtol=1e-6)
  np.testing.assert_allclose(both, (2 * present + p[..., 2].max()) / 3, rtol=1e-6)


@pytest.mark.parametrize("spatial", [(11,), (3, 4, 5)])
def test_one_and_three_spatial_dims(spatial):
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(2,) + spatial + (4,)).astype(np.float32)
  labels = rng.integers(0, 4, (2,) + spatial)
  for per_image in (False, True):
    v, g = _loss_and_grad(logits, labels, dict(per_image=per_image))
    ref, ref_g = reference.lovasz_softmax(logits, labels, per_image=per_image)
    np.testing.assert_allclose(v, ref, atol=1e-6)
    assert g.shape == logits.shape


def test_jit_with_traced_labels_where_and_weights_compiles_once():
  rng = np.random.default_rng(8)

  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(logits, labels, where, weights):
    return jax.value_and_grad(lovasz_jax.lovasz_softmax)(
        logits, labels, where=where, class_weights=weights)

  for i in range(3):
    logits = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 5, 5))
    where = rng.random((2, 5, 5)) < 0.7
    weights = rng.random(3).astype(np.float32)
    v, _ = step(logits, labels, where, weights)
    ref, _ = reference.lovasz_softmax(logits, labels, where=where, class_weights=weights)
    np.testing.assert_allclose(v, ref, atol=1e-5)


def test_labels_closed_over_by_a_jitted_function():
  rng = np.random.default_rng(13)
  logits = rng.normal(size=(2, 5, 3)).astype(np.float32)
  labels = jnp.asarray(rng.integers(0, 3, (2, 5)))
  v = jax.jit(lambda x: lovasz_jax.lovasz_softmax(x, labels))(logits)
  np.testing.assert_allclose(v, reference.lovasz_softmax(logits, labels)[0], atol=1e-6)
  bad = labels.at[0, 0].set(7)
  with pytest.raises(ValueError, match="ignore_index=7"):
    jax.jit(lambda x: lovasz_jax.lovasz_softmax(x, bad))(logits)


def test_jit_with_static_argnames():
  fn = jax.jit(lovasz_jax.lovasz_softmax, static_argnames=lovasz_jax.SOFTMAX_STATIC_ARGNAMES)
  rng = np.random.default_rng(9)
  logits = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
  labels = rng.integers(0, 3, (2, 4, 4))
  v = fn(logits, labels, axis=1, classes=(0, 2), per_image=True, ignore_index=1)
  ref, _ = reference.lovasz_softmax(logits, labels, axis=1, classes=(0, 2),
                                    per_image=True, ignore_index=1)
  np.testing.assert_allclose(v, ref, atol=1e-6)


def test_out_of_range_labels_under_jit_give_nan():
  logits = np.zeros((1, 4, 3), np.float32)
  labels = np.array([[0, 1, 255, 2]])
  assert np.isnan(jax.jit(lovasz_jax.lovasz_softmax)(logits, labels))
  # Masked out or ignored, the same label is fine.
  assert np.isfinite(jax.jit(lovasz_jax.lovasz_softmax)(
      logits, labels, where=labels != 255))
  assert np.isfinite(jax.jit(functools.partial(
      lovasz_jax.lovasz_softmax, ignore_index=255))(logits, labels))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_logits(dtype):
  rng = np.random.default_rng(10)
  logits = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (2, 6, 6))
  low = jnp.asarray(logits, dtype)
  v, g = jax.value_and_grad(lovasz_jax.lovasz_softmax)(low, labels)
  assert v.dtype == jnp.float32 and g.dtype == dtype
  ref, _ = reference.lovasz_softmax(np.asarray(low, np.float64), labels)
  np.testing.assert_allclose(v, ref, atol=1e-5)


def test_class_weights_weight_the_mean():
  rng = np.random.default_rng(11)
  logits = rng.normal(size=(1, 20, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (1, 20))
  per_class = [lovasz_jax.lovasz_softmax(logits, labels, classes=[c]) for c in range(3)]
  w = np.array([1.0, 2.0, 0.5])
  np.testing.assert_allclose(
      lovasz_jax.lovasz_softmax(logits, labels, class_weights=w),
      np.dot(w, per_class) / w.sum(), rtol=1e-6)


@pytest.mark.parametrize("per_image", [False, True])
def test_all_equal_errors_give_a_finite_descent_direction(per_image):
  # A zero-initialised last layer: every probability is 1/C, so every error
  # of a class ties. The gradient is still finite, and a small step along it
  # lowers the loss.
  rng = np.random.default_rng(14)
  logits = np.zeros((2, 8, 8, 4), np.float32)
  labels = rng.integers(0, 4, (2, 8, 8))
  f = jax.value_and_grad(functools.partial(lovasz_jax.lovasz_softmax, per_image=per_image))
  v0, g = f(logits, labels)
  assert np.all(np.isfinite(g)) and np.any(g)
  v1, _ = f(logits - 1.0 * g / np.abs(g).max(), labels)
  assert v1 < v0
  # Every pixel's own class is pushed up: its logit's gradient is negative.
  own = np.take_along_axis(np.asarray(g), labels[..., None], axis=-1)
  assert np.all(own <= 0) and np.any(own < 0)


def test_vmap_matches_a_loop():
  rng = np.random.default_rng(15)
  logits = rng.normal(size=(3, 2, 6, 6, 4)).astype(np.float32)
  labels = rng.integers(0, 4, (3, 2, 6, 6))
  f = jax.value_and_grad(functools.partial(lovasz_jax.lovasz_softmax, per_image=True))
  values, grads = jax.jit(jax.vmap(f))(logits, labels)
  for i in range(3):
    v, g = f(logits[i], labels[i])
    np.testing.assert_allclose(values[i], v, rtol=1e-6)
    np.testing.assert_allclose(grads[i], g, atol=1e-7)


@pytest.mark.parametrize("chunk", [1, 2, 5, 7, 100])
def test_class_chunks_give_the_same_value_and_grad(chunk):
  rng = np.random.default_rng(16)
  logits = rng.normal(size=(2, 6, 5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, (2, 6, 5))
  for per_image in (False, True):
    whole = _loss_and_grad(logits, labels, dict(per_image=per_image, classes=(0, 2, 3, 6)))
    chunked = _loss_and_grad(logits, labels, dict(per_image=per_image, classes=(0, 2, 3, 6),
                                                  class_chunk_size=chunk))
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)
    np.testing.assert_allclose(chunked[1], whole[1], atol=1e-8)


@pytest.mark.parametrize("num_classes", [8, 19])
def test_float32_with_eight_or_more_classes_matches_reference(num_classes):
  # The native float32 passes move 8 x 8 blocks between the pixel-major
  # logits and the class-major tiles (x86-64-v3), and the rest one value at
  # a time: 8 and 19 classes, and a pixel count that leaves partial blocks.
  rng = np.random.default_rng(num_classes)
  logits = (rng.normal(size=(1, 203, num_classes)) * 2).astype(np.float32)
  labels = rng.integers(0, num_classes, (1, 203))
  where = rng.random(labels.shape) < 0.9
  value, grad = _loss_and_grad(logits, labels, {"where": where})
  ref_value, ref_grad = reference.lovasz_softmax(logits, labels, where=where)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  # (float32 may order two errors within its resolution differently.)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-3, atol=2e-6)
  assert not np.any(np.asarray(grad)[~where])
