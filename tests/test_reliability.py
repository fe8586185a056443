"""Bad input fails loudly, in the value and in the gradient.

A concrete call raises ``ValueError`` for bad values it can see. Under
``jax.jit`` such checks cannot run, so the loss is NaN and so is every entry
of the gradient: ``optax.apply_if_finite`` skips the step and NaN monitors see
it. Void pixels take part in nothing: their values are never checked.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lovasz_jax

pytestmark = pytest.mark.usefixtures("path")

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(2, 5, 6, 3)).astype(np.float32)
LABELS = RNG.integers(0, 3, (2, 5, 6))
BINARY = (RNG.random(LOGITS.shape) < 0.3).astype(np.int32)

SOFTMAX_MODES = {
    "sort": {},
    "histogram": dict(method="histogram"),
    "per_image": dict(per_image=True),
    "chunked": dict(class_chunk_size=2),
    "per_image_histogram": dict(per_image=True, method="histogram", class_chunk_size=1),
}
BINARY_LOSSES = {
    "sigmoid": functools.partial(lovasz_jax.lovasz_sigmoid, axis=-1),
    "sigmoid_histogram": functools.partial(lovasz_jax.lovasz_sigmoid, method="histogram"),
    "sigmoid_per_image": functools.partial(lovasz_jax.lovasz_sigmoid, per_image=True),
    "hinge": lovasz_jax.lovasz_hinge,
    "hinge_multilabel": functools.partial(lovasz_jax.lovasz_hinge, axis=-1),
}


def _all_nan(value, grad):
  return bool(np.isnan(value)) and bool(np.all(np.isnan(grad)))


# 3. A NaN or infinite logit at a valid pixel makes the loss and gradient NaN.

@pytest.mark.parametrize("mode", SOFTMAX_MODES)
def test_softmax_non_finite_logit_gives_nan(mode):
  f = jax.jit(jax.value_and_grad(functools.partial(
      lovasz_jax.lovasz_softmax, ignore_index=255, **SOFTMAX_MODES[mode])))
  labels = LABELS.copy()
  labels[1, 2, 3] = 255
  ok = f(LOGITS, labels)
  assert np.isfinite(ok[0])
  for bad in (np.nan, np.inf, -np.inf):
    logits = LOGITS.copy()
    logits[1, 2, 3, 0] = bad
    assert _all_nan(*f(logits, LABELS)), bad
    # The same logit at a void pixel changes nothing.
    v, g = f(logits, labels)
    assert v == ok[0]
    np.testing.assert_array_equal(g, ok[1])
  # Eager calls too.
  assert np.isnan(lovasz_jax.lovasz_softmax(logits, LABELS, **SOFTMAX_MODES[mode]))


@pytest.mark.parametrize("name", BINARY_LOSSES)
def test_binary_non_finite_logit_gives_nan(name):
  f = jax.jit(jax.value_and_grad(BINARY_LOSSES[name]))
  where = np.ones(BINARY.shape, bool)
  where[0, 1, 1, 2] = False
  ok = f(LOGITS, BINARY, where=where)
  for bad in (np.nan, np.inf, -np.inf):
    logits = LOGITS.copy()
    logits[0, 1, 1, 2] = bad
    assert _all_nan(*f(logits, BINARY, where=np.ones(BINARY.shape, bool))), bad
    v, g = f(logits, BINARY, where=where)
    assert v == ok[0]
    np.testing.assert_array_equal(g, ok[1])


# 4. Bad labels under jit: NaN loss and a NaN gradient, so an optax step that
# checks finiteness is skipped.

def test_bad_labels_under_jit_give_a_nan_gradient():
  labels = LABELS.copy()
  labels[0, 0, 0] = 7
  for mode, kwargs in SOFTMAX_MODES.items():
    v, g = jax.jit(jax.value_and_grad(functools.partial(lovasz_jax.lovasz_softmax,
                                                        **kwargs)))(LOGITS, labels)
    assert _all_nan(v, g), mode
  binary = BINARY.copy()
  binary[0, 0, 0, 0] = 2
  for name, fn in BINARY_LOSSES.items():
    v, g = jax.jit(jax.value_and_grad(fn))(LOGITS, binary)
    assert _all_nan(v, g), name


def test_optax_apply_if_finite_skips_the_step_on_bad_labels():
  w = jnp.asarray(RNG.normal(size=(3, 3)).astype(np.float32))
  images = jnp.asarray(LOGITS)
  opt = optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=5)
  state = opt.init(w)

  @jax.jit
  def step(w, state, labels):
    loss, grads = jax.value_and_grad(
        lambda w: lovasz_jax.lovasz_softmax(images @ w, labels))(w)
    updates, state = opt.update(grads, state, w)
    return optax.apply_updates(w, updates), state, loss

  good, _, loss = step(w, state, LABELS)
  assert np.isfinite(loss) and np.any(good != w)
  bad_labels = LABELS.copy()
  bad_labels[1, 1, 1] = 3
  after, state_after, loss = step(w, state, bad_labels)
  assert np.isnan(loss)
  np.testing.assert_array_equal(after, w)              # the step was skipped
  assert int(state_after.notfinite_count) == 1


# 5. class_chunk_size with zero pixels: a zero loss and a zero gradient.

@pytest.mark.parametrize("shape, per_image", [((2, 0, 6, 4), False), ((2, 0, 6, 4), True),
                                              ((0, 3, 6, 4), True), ((0, 3, 6, 4), False)])
def test_chunks_with_zero_pixels(shape, per_image):
  logits = np.zeros(shape, np.float32)
  labels = np.zeros(shape[:-1], np.int32)
  for chunk in (None, 3, 1):
    for method in ("sort", "histogram"):
      v, g = jax.jit(jax.value_and_grad(functools.partial(
          lovasz_jax.lovasz_softmax, class_chunk_size=chunk, per_image=per_image,
          method=method)))(logits, labels)
      assert v == 0.0 and g.shape == shape and not np.any(g)


# 6. from_logits=False: inputs must be probabilities in [0, 1].

@pytest.mark.parametrize("value", [-0.25, 1.5, np.nan])
def test_probabilities_outside_0_1(value):
  probs = np.full((1, 4, 3), 1 / 3, np.float32)
  probs[0, 1, 2] = value
  labels = np.array([[0, 1, 2, 0]])
  with pytest.raises(ValueError, match=r"must be probabilities in \[0, 1\].*from_logits"):
    lovasz_jax.lovasz_softmax(probs, labels, from_logits=False)
  f = jax.jit(jax.value_and_grad(functools.partial(lovasz_jax.lovasz_softmax,
                                                   from_logits=False)))
  assert _all_nan(*f(probs, labels))
  # At a void pixel the value is not looked at.
  assert np.isfinite(lovasz_jax.lovasz_softmax(probs, np.array([[0, 9, 2, 0]]),
                                               from_logits=False, ignore_index=9))
  p = np.full((1, 4), 0.5, np.float32)
  p[0, 2] = value
  y = np.array([[0, 1, 1, 0]])
  with pytest.raises(ValueError, match=r"must be probabilities in \[0, 1\]"):
    lovasz_jax.lovasz_sigmoid(p, y, from_logits=False)
  f = jax.jit(jax.value_and_grad(functools.partial(lovasz_jax.lovasz_sigmoid,
                                                   from_logits=False)))
  assert _all_nan(*f(p, y))


# 7. class_weights must be finite and non-negative, with a positive entry.

@pytest.mark.parametrize("weights, pattern", [
    ([1.0, 1.0, -2.0], r"finite and non-negative, got -2\.0 at class 2"),
    ([1.0, np.nan, 1.0], r"finite and non-negative, got nan at class 1"),
    ([np.inf, 1.0, 1.0], r"got inf at class 0"),
    ([0.0, 0.0, 0.0], r"class_weights are all zero"),
])
def test_bad_class_weights(weights, pattern):
  with pytest.raises(ValueError, match=pattern):
    lovasz_jax.lovasz_softmax(LOGITS, LABELS, class_weights=np.array(weights))
  f = jax.jit(jax.value_and_grad(lovasz_jax.lovasz_softmax))
  assert _all_nan(*f(LOGITS, LABELS, class_weights=jnp.array(weights)))


def test_groups_whose_counted_classes_weigh_zero_do_not_count():
  # Image 0 holds only class 0 (weight 0); image 1 holds classes 1 and 2.
  labels = np.zeros((2, 5, 6), np.int32)
  labels[1] = LABELS[1] % 2 + 1
  w = np.array([0.0, 1.0, 3.0])
  got = lovasz_jax.lovasz_softmax(LOGITS, labels, class_weights=w, per_image=True)
  image1 = lovasz_jax.lovasz_softmax(LOGITS[1:], labels[1:], class_weights=w,
                                     per_image=True)
  np.testing.assert_allclose(got, image1, rtol=1e-6)
  assert float(got) > 0


# 8. 64-bit labels are checked before any narrowing.

def test_int64_labels_past_2_31_under_jit(x64):
  labels = jnp.asarray(LABELS, jnp.int64).at[0, 0, 0].set(2**32 + 1)
  with pytest.raises(ValueError, match="4294967297"):
    lovasz_jax.lovasz_softmax(LOGITS, labels)
  f = jax.jit(jax.value_and_grad(lovasz_jax.lovasz_softmax))
  assert _all_nan(*f(jnp.asarray(LOGITS), labels))
  binary = jnp.asarray(BINARY, jnp.int64).at[0, 0, 0, 0].set(2**32 + 1)
  f = jax.jit(jax.value_and_grad(lovasz_jax.lovasz_sigmoid))
  assert _all_nan(*f(jnp.asarray(LOGITS), binary))
  # An ignore_index that only a 64-bit label can hold still marks void pixels.
  void = jnp.asarray(LABELS, jnp.int64).at[0, 0, 0].set(2**40)
  v = jax.jit(functools.partial(lovasz_jax.lovasz_softmax, ignore_index=2**40))(
      jnp.asarray(LOGITS), void)
  assert np.isfinite(v)


def test_unsigned_and_narrow_labels():
  for dtype in (np.uint8, np.int8, np.uint32, np.int16):
    v = jax.jit(lovasz_jax.lovasz_softmax)(LOGITS, LABELS.astype(dtype))
    np.testing.assert_allclose(v, lovasz_jax.lovasz_softmax(LOGITS, LABELS), rtol=1e-6)
  labels = LABELS.astype(np.uint8)
  labels[0, 0, 0] = 255
  assert np.isfinite(jax.jit(functools.partial(lovasz_jax.lovasz_softmax,
                                               ignore_index=255))(LOGITS, labels))
  assert np.isnan(jax.jit(lovasz_jax.lovasz_softmax)(LOGITS, labels))
