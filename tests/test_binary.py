"""lovasz_sigmoid and the multi-label lovasz_hinge against the float64 reference."""

import functools

import chex
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lovasz_jax
from lovasz_jax import _binary
from lovasz_jax import lovasz_hinge, lovasz_sigmoid
from tests import reference
from tests import reference_binary

# Values and gradients on both paths: the native CPU kernel and the portable
# XLA path that GPU and TPU run.
pytestmark = pytest.mark.usefixtures("path")

LOSSES = {"sigmoid": lovasz_sigmoid, "hinge": lovasz_hinge}
REFERENCES = {"sigmoid": reference_binary.lovasz_sigmoid,
              "hinge": reference_binary.lovasz_hinge}
STATIC = {"sigmoid": _binary.SIGMOID_STATIC_ARGNAMES,
          "hinge": _binary.HINGE_STATIC_ARGNAMES}


@st.composite
def problems(draw, multi_label=None, kinds=("sigmoid", "hinge")):
  """A random binary or multi-label problem with a random set of options."""
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  kind = draw(st.sampled_from(kinds))
  batch = draw(st.integers(1, 3))
  spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2)))
  if multi_label is None:
    multi_label = draw(st.booleans())
  per_image = draw(st.booleans())
  if multi_label:
    channels = draw(st.integers(1, 4))
    shape = (batch,) + spatial + (channels,)       # channels last, then moved
    axis = draw(st.sampled_from([-1, 1] if per_image else [-1, 1, 0]))
    classes = draw(st.sampled_from(["present", "all", "subset"]))
    if classes == "subset":
      k = draw(st.integers(1, channels))
      classes = tuple(int(c) for c in rng.permutation(channels)[:k])
    # Per-channel foreground rates, so that some channels have no foreground.
    rate = rng.choice([0.0, 0.3, 0.7, 1.0], size=channels)
  else:
    shape = (batch,) + spatial
    axis, classes = None, "all"
    rate = draw(st.sampled_from([0.0, 0.3, 1.0]))
  labels = (rng.random(shape) < rate).astype(np.int32)
  ignore_index = draw(st.sampled_from([None, 255, -1]))
  if ignore_index is not None:
    labels = np.where(rng.random(shape) < 0.2, ignore_index, labels)
  where = rng.random(shape) < 0.8 if draw(st.booleans()) else None
  logits = rng.normal(size=shape) * 2
  kwargs = dict(axis=axis, classes=classes, per_image=per_image,
                ignore_index=ignore_index, where=where)
  if kind == "sigmoid":
    kwargs["from_logits"] = draw(st.booleans())
    if not kwargs["from_logits"]:
      logits = reference_binary.sigmoid(logits)
  if multi_label:
    def move(a):
      return None if a is None else np.moveaxis(a, -1, axis)
    logits, labels, kwargs["where"] = move(logits), move(labels), move(where)
  return kind, logits, labels, kwargs


def _vg(fn, **options):
  """``jit(value_and_grad)`` of a loss with its options bound: one compile."""
  return jax.jit(jax.value_and_grad(functools.partial(fn, **options)))


def _loss_and_grad(kind, logits, labels, kwargs):
  static = {k: v for k, v in kwargs.items() if k in STATIC[kind]}
  dynamic = {k: v for k, v in kwargs.items() if k not in static}
  return _vg(LOSSES[kind], **static)(logits, labels, **dynamic)


@settings(max_examples=10, deadline=None)
@given(problems())
def test_value_matches_reference_float32(problem):
  kind, logits, labels, kwargs = problem
  value, grad = _loss_and_grad(kind, jnp.asarray(logits, jnp.float32), labels, kwargs)
  ref, _ = REFERENCES[kind](logits.astype(np.float32), labels, **kwargs)
  assert value.dtype == jnp.float32 and grad.dtype == jnp.float32
  np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(grad))


@settings(max_examples=14, deadline=None)
@given(problems())
def test_value_and_grad_match_reference_float64(problem):
  # In float64 the errors have no ties, so the gradient is unique.
  kind, logits, labels, kwargs = problem
  with jax.enable_x64(True):
    value, grad = _loss_and_grad(kind, jnp.asarray(logits), labels, kwargs)
    assert grad.dtype == jnp.float64
  ref, ref_grad = REFERENCES[kind](logits, labels, **kwargs)
  np.testing.assert_allclose(value, ref, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-8, atol=1e-11)


@settings(max_examples=6, deadline=None)
@given(problems(multi_label=False, kinds=("hinge",)))
def test_hinge_with_axis_none_is_the_binary_hinge(problem):
  # The binary hinge's own reference (tests/reference.py), unchanged.
  _, logits, labels, kwargs = problem
  del kwargs["axis"], kwargs["classes"]
  where = kwargs.pop("where")
  with jax.enable_x64(True):
    value, grad = _vg(lovasz_hinge, **kwargs)(jnp.asarray(logits), labels, where=where)
  kwargs["where"] = where
  ref, ref_grad = reference.lovasz_hinge(logits, labels, **kwargs)
  np.testing.assert_allclose(value, ref, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-8, atol=1e-11)


@settings(max_examples=4, deadline=None)
@given(problems(multi_label=False, kinds=("sigmoid",)))
def test_sigmoid_is_two_class_softmax_on_the_foreground_class(problem):
  # softmax([0, x])[1] = sigmoid(x): the Lovász-Softmax term of class 1.
  _, logits, labels, kwargs = problem
  del kwargs["axis"], kwargs["classes"]
  where = kwargs.pop("where")
  if not kwargs["from_logits"]:
    logits = np.log(logits) - np.log1p(-logits)
  kwargs["from_logits"] = True
  two = np.stack([np.zeros_like(logits), logits], axis=-1)
  with jax.enable_x64(True):
    v1, g1 = _vg(lovasz_sigmoid, **kwargs)(jnp.asarray(logits), labels, where=where)
    v2, g2 = _vg(lovasz_jax.lovasz_softmax, classes=(1,), **kwargs)(
        jnp.asarray(two), labels, where=where)
  np.testing.assert_allclose(v1, v2, rtol=1e-12, atol=1e-14)
  # d/dx of softmax([0, x]) reaches x only through the second logit.
  np.testing.assert_allclose(g1, g2[..., 1], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
@pytest.mark.parametrize("per_image", [False, True])
def test_axis_equals_moveaxis(kind, per_image):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)    # [B, K, H, W]
  labels = (rng.random(logits.shape) < 0.4).astype(np.int32)
  where = rng.random(logits.shape) < 0.8
  v1, g1 = _vg(LOSSES[kind], axis=1, per_image=per_image)(logits, labels, where=where)
  v2, g2 = _vg(LOSSES[kind], axis=-1, per_image=per_image)(
      np.moveaxis(logits, 1, -1), np.moveaxis(labels, 1, -1),
      where=np.moveaxis(where, 1, -1))
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  np.testing.assert_allclose(g1, np.moveaxis(g2, -1, 1), atol=1e-7)
  if not per_image:
    v0, g0 = _vg(LOSSES[kind], axis=0, per_image=False)(
        np.moveaxis(logits, 1, 0), np.moveaxis(labels, 1, 0),
        where=np.moveaxis(where, 1, 0))
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    np.testing.assert_allclose(np.moveaxis(g0, 0, 1), g1, atol=1e-7)


@settings(max_examples=4, deadline=None)
@given(problems(multi_label=True))
def test_one_channel_equals_axis_none_on_that_channel(problem):
  kind, logits, labels, kwargs = problem
  axis = kwargs["axis"] % logits.ndim
  x = np.moveaxis(logits, axis, -1).astype(np.float32)
  y = np.moveaxis(labels, axis, -1)
  w = None if kwargs["where"] is None else np.moveaxis(kwargs["where"], axis, -1)
  options = {k: v for k, v in kwargs.items()
             if k in ("per_image", "ignore_index", "from_logits")}
  c = int(np.random.default_rng(x.size).integers(x.shape[-1]))
  wc = None if w is None else w[..., c]
  single, g_single = _vg(LOSSES[kind], **options)(x[..., c], y[..., c], where=wc)
  picked, g_picked = _vg(LOSSES[kind], axis=-1, classes=(c,), **options)(x, y, where=w)
  alone, g_alone = _vg(LOSSES[kind], axis=-1, **options)(
      x[..., c:c + 1], y[..., c:c + 1], where=None if w is None else w[..., c:c + 1])
  np.testing.assert_allclose(picked, single, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(alone, single, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(g_picked[..., c], g_single, atol=1e-7)
  np.testing.assert_allclose(g_alone[..., 0], g_single, atol=1e-7)
  assert not np.any(np.delete(np.asarray(g_picked), c, axis=-1))


@settings(max_examples=6, deadline=None)
@given(problems(multi_label=False))
def test_where_equals_slicing_out(problem):
  kind, logits, labels, kwargs = problem
  kwargs["per_image"] = False
  where = kwargs.pop("where")
  if where is None:
    where = np.random.default_rng(0).random(labels.shape) < 0.5
  x = logits.astype(np.float32)
  masked = LOSSES[kind](x, labels, where=where, **kwargs)
  sliced = LOSSES[kind](x[where][None], labels[where][None], **kwargs)
  np.testing.assert_allclose(masked, sliced, rtol=1e-6, atol=1e-7)


@settings(max_examples=6, deadline=None)
@given(problems(multi_label=True))
def test_multi_label_is_the_mean_of_per_channel_binary_losses(problem):
  # Each channel sliced out (with its own void pixels) is a binary problem.
  kind, logits, labels, kwargs = problem
  kwargs["per_image"] = False
  axis = kwargs.pop("axis") % logits.ndim
  classes = kwargs.pop("classes")
  where = kwargs.pop("where")
  if where is None:
    where = np.ones(labels.shape, bool)
  ignore = kwargs["ignore_index"]
  x = logits.astype(np.float32)
  whole = LOSSES[kind](x, labels, axis=axis, classes=classes, where=where, **kwargs)
  ids = range(x.shape[axis]) if isinstance(classes, str) else classes
  losses = []
  for c in ids:
    x_c, y_c, w_c = (np.take(a, c, axis=axis) for a in (x, labels, where))
    valid = w_c & (y_c != ignore if ignore is not None else True)
    if valid.any() and (classes != "present" or (y_c[valid] == 1).any()):
      losses.append(LOSSES[kind](x_c[w_c][None], y_c[w_c][None], **kwargs))
  np.testing.assert_allclose(whole, np.mean(losses) if losses else 0.0,
                             rtol=1e-6, atol=1e-7)


@settings(max_examples=6, deadline=None)
@given(problems())
def test_per_image_equals_loop_over_images(problem):
  kind, logits, labels, kwargs = problem
  kwargs["per_image"] = True
  where = kwargs.pop("where")
  if kwargs["axis"] is not None and kwargs["axis"] % logits.ndim == 0:
    # Channels on axis 0 cannot go with per_image: move them to axis 1.
    logits, labels = np.moveaxis(logits, 0, 1), np.moveaxis(labels, 0, 1)
    where = None if where is None else np.moveaxis(where, 0, 1)
    kwargs["axis"] = 1
  where = np.ones(labels.shape, bool) if where is None else where.copy()
  where[0] = False  # an image with no valid pixel: it does not count
  x = logits.astype(np.float32)
  whole = LOSSES[kind](x, labels, where=where, **kwargs)
  losses = []
  for b in range(labels.shape[0]):
    # The loss of one image alone, and whether that image counts a channel.
    one = LOSSES[kind](x[b:b + 1], labels[b:b + 1], where=where[b:b + 1], **kwargs)
    ignore = kwargs["ignore_index"]
    valid = where[b] & (labels[b] != ignore if ignore is not None else True)
    if kwargs["axis"] is None:
      counts = valid.any()
    else:
      ch = kwargs["axis"] % logits.ndim - 1
      v, y = np.moveaxis(valid, ch, -1), np.moveaxis(labels[b], ch, -1)
      cls = kwargs["classes"]
      ids = range(v.shape[-1]) if isinstance(cls, str) else cls
      counts = any(v[..., c].any() and
                   (cls != "present" or (y[..., c][v[..., c]] == 1).any())
                   for c in ids)
    if counts:
      losses.append(one)
  np.testing.assert_allclose(whole, np.mean(losses) if losses else 0.0,
                             rtol=1e-6, atol=1e-7)


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 4), st.booleans())
def test_hard_predictions_give_mean_over_channels_of_one_minus_iou(
    seed, channels, use_where):
  rng = np.random.default_rng(seed)
  labels = (rng.random((2, 7, 6, channels)) < rng.random(channels)).astype(np.int32)
  pred = np.where(rng.random(labels.shape) < 0.7, labels, 1 - labels)
  where = rng.random(labels.shape) < 0.7 if use_where else np.ones(labels.shape, bool)
  probs = pred.astype(np.float32)
  per_channel = lovasz_sigmoid(probs, labels, axis=-1, where=where, from_logits=False)
  terms = [reference_binary.iou_loss(pred[..., c], labels[..., c], where[..., c])
           for c in range(channels) if where[..., c].any()]
  np.testing.assert_allclose(per_channel, np.mean(terms), atol=1e-6)
  # axis=None pools every channel into one binary problem.
  pooled = lovasz_sigmoid(probs, labels, where=where, from_logits=False)
  np.testing.assert_allclose(pooled, reference_binary.iou_loss(pred, labels, where),
                             atol=1e-6)


def test_pooled_and_per_channel_differ_for_a_small_channel():
  # A large channel predicted perfectly, a small one missed entirely.
  labels = np.zeros((1, 100, 2), np.int32)
  labels[0, :50, 0] = 1
  labels[0, 0, 1] = 1
  probs = labels.astype(np.float32)
  probs[0, 0, 1] = 0.0
  probs[0, 1, 1] = 1.0
  per_channel = lovasz_sigmoid(probs, labels, axis=-1, from_logits=False)
  pooled = lovasz_sigmoid(probs, labels, from_logits=False)
  np.testing.assert_allclose(per_channel, 0.5, atol=1e-6)     # (0 + 1) / 2
  np.testing.assert_allclose(pooled, 1 - 50 / 52, atol=1e-6)  # IoU 50/52


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
def test_check_grads_at_tie_free_points(kind, x64):
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(2, 5, 4, 3)))
  labels = jnp.asarray(rng.random((2, 5, 4, 3)) < 0.4).astype(jnp.int32)
  for axis, per_image, classes in ((None, True, "all"), (-1, False, "all"),
                                   (-1, True, "present"), (1, False, (2, 0))):
    fn = functools.partial(LOSSES[kind], labels=labels, axis=axis,
                           per_image=per_image, classes=classes)
    check_grads(jax.jit(fn), (logits,), order=1, modes=("rev",),
                eps=1e-6, atol=1e-6, rtol=1e-6)
  probs = jax.nn.sigmoid(logits)
  if kind == "sigmoid":
    fn = functools.partial(lovasz_sigmoid, labels=labels, axis=1, from_logits=False)
    check_grads(jax.jit(fn), (probs,), order=1, modes=("rev",),
                eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
def test_jit_with_traced_labels_and_where_compiles_once(kind):
  rng = np.random.default_rng(3)
  chex.clear_trace_counter()

  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(logits, labels, where):
    fn = functools.partial(LOSSES[kind], axis=-1, classes="present", per_image=True)
    return jax.value_and_grad(fn)(logits, labels, where=where)

  for _ in range(3):
    logits = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
    labels = (rng.random(logits.shape) < 0.3).astype(np.int32)
    where = rng.random(logits.shape) < 0.7
    v, g = step(logits, labels, where)
    ref, _ = REFERENCES[kind](logits, labels, axis=-1, classes="present",
                              per_image=True, where=where)
    np.testing.assert_allclose(v, ref, atol=1e-5)
    assert not np.any(np.asarray(g)[~where])


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
def test_jit_with_static_argnames(kind):
  fn = jax.jit(LOSSES[kind], static_argnames=STATIC[kind])
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
  labels = np.where(rng.random(logits.shape) < 0.1, 7,
                    rng.random(logits.shape) < 0.5).astype(np.int32)
  kwargs = dict(axis=1, classes=(0, 2), per_image=True, ignore_index=7)
  np.testing.assert_allclose(fn(logits, labels, **kwargs),
                             REFERENCES[kind](logits, labels, **kwargs)[0], atol=1e-6)


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
def test_vmap_matches_a_loop(kind):
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(3, 2, 6, 6, 4)).astype(np.float32)
  labels = (rng.random(logits.shape) < 0.3).astype(np.int32)
  f = _vg(LOSSES[kind], axis=-1, per_image=True)
  values, grads = jax.jit(jax.vmap(f))(logits, labels)
  for i in range(3):
    v, g = f(logits[i], labels[i])
    np.testing.assert_allclose(values[i], v, rtol=1e-6)
    np.testing.assert_allclose(grads[i], g, atol=1e-7)
  assert len(set(np.asarray(values).tolist())) == 3


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
def test_nothing_counted_is_zero_with_zero_grad(kind):
  logits = jnp.ones((2, 3, 3, 4))
  void = jnp.full((2, 3, 3, 4), 255)
  for axis, per_image, classes in ((None, True, "all"), (-1, False, "present"),
                                   (1, True, (0, 2))):
    v, g = _vg(LOSSES[kind], axis=axis, per_image=per_image, classes=classes,
               ignore_index=255)(logits, void)
    assert v == 0.0 and not np.any(g)
  f = _vg(LOSSES[kind], axis=-1, per_image=False)
  v, g = f(logits, void * 0, where=jnp.zeros((2, 3, 3, 4), bool))
  assert v == 0.0 and not np.any(g)
  # "present" with no foreground anywhere counts nothing either.
  v, g = _vg(LOSSES[kind], axis=-1, classes="present")(logits, void * 0)
  assert v == 0.0 and not np.any(g)
  # Empty arrays.
  for shape in ((0, 3), (2, 0, 3)):
    v, g = f(jnp.ones(shape), jnp.ones(shape, jnp.int32))
    assert v == 0.0 and g.shape == shape
  # An empty batch with per_image: no images, so nothing counted.
  for shape, axis in (((0, 3), None), ((0, 4, 3), -1)):
    v, g = _vg(LOSSES[kind], axis=axis, per_image=True)(
        jnp.ones(shape), jnp.ones(shape, jnp.int32))
    assert v == 0.0 and g.shape == shape


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
def test_void_channel_pixels_get_exactly_zero_grad_even_when_not_finite(kind):
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  labels = (rng.random(logits.shape) < 0.4).astype(np.int32)
  labels[:, :, :, 1] = 255          # channel 1 entirely void
  labels[0, 0, 0, 2] = 255          # one void pixel in channel 2 only
  logits[:, 0, 0, 1] = np.nan
  logits[0, 0, 0, 2] = np.inf
  f = _vg(LOSSES[kind], axis=-1, ignore_index=255)
  v, g = f(logits, labels)
  ref, ref_g = REFERENCES[kind](np.nan_to_num(logits), labels, axis=-1,
                                ignore_index=255)
  np.testing.assert_allclose(v, ref, atol=1e-6)
  np.testing.assert_allclose(g, ref_g, atol=1e-6)
  assert np.all(g[..., 1] == 0) and g[0, 0, 0, 2] == 0 and np.all(np.isfinite(g))
  # The void channel does not count: the loss is the mean of channels 0 and 2.
  np.testing.assert_allclose(v, f(logits[..., ::2], labels[..., ::2])[0], rtol=1e-6)


def test_sigmoid_errors_do_not_cancel_for_confident_logits():
  # 1 - sigmoid(30) is 0 in float32; sigmoid(-30) is not.
  logits = np.array([[30.0, -25.0]], np.float32)
  labels = np.array([[1, 0]])
  v, g = jax.value_and_grad(lovasz_sigmoid)(logits, labels)
  # Sorted: the background pixel (error sigmoid(-25)) first, weight 1/2;
  # then the foreground pixel (error sigmoid(-30)), weight 1/2.
  expected = 0.5 * (reference_binary.sigmoid(-30.0) + reference_binary.sigmoid(-25.0))
  np.testing.assert_allclose(v, expected, rtol=1e-5)
  assert g[0, 0] < 0 < g[0, 1]


def test_from_logits_false_equals_sigmoid_of_logits():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(2, 6, 3)).astype(np.float32)
  labels = (rng.random(logits.shape) < 0.5).astype(np.int32)
  for axis in (None, -1):
    a = lovasz_sigmoid(logits, labels, axis=axis)
    b = lovasz_sigmoid(jax.nn.sigmoid(logits), labels, axis=axis, from_logits=False)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_defaults():
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(3, 5, 2)).astype(np.float32)
  labels = (rng.random(logits.shape) < 0.5).astype(np.int32)
  labels[0] = 0
  hinge = functools.partial(lovasz_hinge, logits, labels)
  sigmoid = functools.partial(lovasz_sigmoid, logits, labels)
  assert hinge() == hinge(axis=None, classes="all", per_image=True)
  assert hinge() != hinge(per_image=False)
  assert sigmoid() == sigmoid(axis=None, classes="all", per_image=False)
  assert sigmoid() != sigmoid(per_image=True)
  assert sigmoid(axis=-1) == sigmoid(axis=-1, classes="all")
  # Bool labels are 0/1 labels.
  np.testing.assert_allclose(lovasz_sigmoid(logits, labels.astype(bool), axis=-1),
                             sigmoid(axis=-1), rtol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
def test_low_precision_logits(kind, dtype):
  rng = np.random.default_rng(9)
  low = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), dtype)
  labels = (rng.random(low.shape) < 0.4).astype(np.int32)
  v, g = _vg(LOSSES[kind], axis=-1)(low, labels)
  assert v.dtype == jnp.float32 and g.dtype == dtype
  ref, _ = REFERENCES[kind](np.asarray(low, np.float64), labels, axis=-1)
  np.testing.assert_allclose(v, ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
def test_non_binary_labels_under_jit_give_nan(kind):
  logits = np.zeros((1, 4, 2), np.float32)
  labels = np.array([[[0, 1], [1, 2], [255, 0], [1, 1]]])
  fn = jax.jit(functools.partial(LOSSES[kind], axis=-1))
  assert np.isnan(fn(logits, labels))
  assert np.isfinite(fn(logits, labels, where=(labels == 0) | (labels == 1)))
  fn = jax.jit(functools.partial(LOSSES[kind], axis=-1, ignore_index=255))
  assert np.isnan(fn(logits, labels))   # 2 is still there
  labels_ok = jnp.asarray(np.where(labels == 2, 255, labels))
  assert np.isfinite(fn(logits, labels_ok))
  # Labels closed over by a jitted function are concrete: the check runs.
  closed = jnp.asarray(labels)
  with pytest.raises(ValueError, match="ignore_index=2"):
    jax.jit(lambda x: LOSSES[kind](x, closed, axis=-1))(logits)


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
def test_options_are_keyword_only(kind):
  x, y = jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 3), jnp.int32)
  with pytest.raises(TypeError):
    LOSSES[kind](x, y, -1)  # pylint: disable=too-many-function-args


X = np.zeros((2, 4, 4, 3), np.float32)
Y = np.zeros((2, 4, 4, 3), np.int32)

BAD_INPUTS = [
    (dict(labels=np.zeros((2, 4, 4), np.int32)), ValueError,
     r"labels must have the logits' shape \(2, 4, 4, 3\), got \(2, 4, 4\)"),
    (dict(labels=np.zeros((2, 4, 4), np.int32), axis=-1), ValueError,
     r"multi-label: one 0/1 label per pixel and channel"),
    (dict(labels=np.zeros((2, 4, 4, 3), np.float32)), TypeError,
     r"labels must be an integer array, got dtype float32"),
    (dict(logits=np.zeros((2, 4, 4, 3), np.int32)), TypeError,
     r"logits must be a floating-point array, got dtype int32"),
    (dict(logits=np.zeros((), np.float32), labels=np.zeros((), np.int32)),
     ValueError, r"logits must have a batch axis, got shape \(\)"),
    (dict(labels=np.full((2, 4, 4, 3), 2)), ValueError,
     r"outside \[0, 2\) for the Lovász \w+ \(labels must be 0 or 1\): 2\. "
     r"If 2 marks void pixels, pass ignore_index=2"),
    (dict(labels=np.full((2, 4, 4, 3), -1), axis=-1), ValueError, r"outside \[0, 2\).*: -1"),
    (dict(axis=4), ValueError, r"axis=4 is out of range for logits with 4 dimensions"),
    (dict(axis=-5), ValueError, r"axis=-5 is out of range"),
    (dict(axis=1.0), TypeError, r"axis must be an int, got 1.0"),
    (dict(axis=0, per_image=True), ValueError,
     r"per_image=True takes axis 0 of the logits as the image axis.*axis=0"),
    (dict(axis=-4, per_image=True), ValueError, r"channel axis cannot also be 0"),
    (dict(logits=np.zeros((2, 0, 3), np.float32), labels=np.zeros((2, 0, 3), np.int32),
          axis=1), ValueError, r"logits have no channels: shape \(2, 0, 3\), axis 1"),
    (dict(classes="present"), ValueError,
     r"classes only applies in multi-label mode \(axis=k\).*got 'present'"),
    (dict(classes=(0,)), ValueError, r"classes only applies in multi-label mode"),
    (dict(axis=-1, classes=[0, 3]), ValueError, r"class id 3 in classes is outside \[0, 3\)"),
    (dict(axis=-1, classes=[]), ValueError, r"classes must not be empty"),
    (dict(axis=-1, classes=[1, 1]), ValueError, r"repeated ids"),
    (dict(axis=-1, classes="every"), ValueError, r'"present", "all" .* got \'every\''),
    (dict(axis=-1, classes=1.5), TypeError, r"classes must be"),
    (dict(where=np.ones((2, 4, 4), bool)), ValueError,
     r"where must have the shape of labels \(2, 4, 4, 3\), got \(2, 4, 4\)"),
    (dict(where=np.ones((2, 4, 4, 3), np.int32)), TypeError, r"where must be a boolean array"),
    (dict(per_image="yes"), TypeError, r"per_image must be a Python bool, got 'yes'"),
    (dict(ignore_index=2.5), TypeError, r"ignore_index must be an int or None, got 2.5"),
]


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
@pytest.mark.parametrize("kwargs, error, pattern", BAD_INPUTS)
def test_bad_input(kind, kwargs, error, pattern):
  args = dict(logits=X, labels=Y, per_image=False)
  args.update(kwargs)
  logits, labels = args.pop("logits"), args.pop("labels")
  if "Lovász" in pattern:
    pattern = pattern.replace(r"\w+", kind)
  with pytest.raises(error, match=pattern):
    LOSSES[kind](logits, labels, **args)
  # Trace-time checks fire inside jit too (the label-value check cannot).
  if "outside [0, 2)" not in pattern.replace("\\", ""):
    with pytest.raises(error, match=pattern):
      jax.jit(lambda a, b: LOSSES[kind](a, b, **args))(logits, labels)


def test_sigmoid_bad_from_logits():
  with pytest.raises(TypeError, match=r"from_logits must be a Python bool, got 0"):
    lovasz_sigmoid(X, Y, from_logits=0)
