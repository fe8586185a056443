"""lovasz_hinge against the float64 reference."""

import functools

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lovasz_jax
from tests import reference

pytestmark = pytest.mark.usefixtures("path")


@st.composite
def problems(draw):
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  shape = (draw(st.integers(1, 3)),) + tuple(
      draw(st.lists(st.integers(1, 6), min_size=0, max_size=3)))
  labels = (rng.random(shape) < draw(st.sampled_from([0.0, 0.3, 1.0]))).astype(np.int32)
  ignore_index = draw(st.sampled_from([None, 255]))
  if ignore_index is not None:
    labels = np.where(rng.random(shape) < 0.2, ignore_index, labels)
  where = rng.random(shape) < 0.8 if draw(st.booleans()) else None
  kwargs = dict(per_image=draw(st.booleans()), ignore_index=ignore_index, where=where)
  return rng.normal(size=shape) * 2, labels, kwargs


def _value_and_grad(logits, labels, kwargs):
  static = {k: kwargs[k] for k in lovasz_jax.HINGE_STATIC_ARGNAMES if k in kwargs}
  fn = functools.partial(lovasz_jax.lovasz_hinge, **static)
  return jax.jit(jax.value_and_grad(fn))(logits, labels, where=kwargs["where"])


@settings(max_examples=10, deadline=None)
@given(problems())
def test_value_matches_reference_float32(problem):
  logits, labels, kwargs = problem
  value, grad = _value_and_grad(jnp.asarray(logits, jnp.float32), labels, kwargs)
  ref, _ = reference.lovasz_hinge(logits.astype(np.float32), labels, **kwargs)
  np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(grad))


@settings(max_examples=14, deadline=None)
@given(problems())
def test_value_and_grad_match_reference_float64(problem):
  logits, labels, kwargs = problem
  with jax.enable_x64(True):
    value, grad = _value_and_grad(jnp.asarray(logits), labels, kwargs)
  ref, ref_grad = reference.lovasz_hinge(logits, labels, **kwargs)
  np.testing.assert_allclose(value, ref, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-8, atol=1e-11)


def test_check_grads(x64):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 7, 5)))
  labels = jnp.asarray(rng.random((3, 7, 5)) < 0.4).astype(jnp.int32)
  for per_image in (True, False):
    fn = functools.partial(lovasz_jax.lovasz_hinge, labels=labels, per_image=per_image)
    check_grads(lambda x: fn(x), (logits,), order=1, modes=("rev",),
                              eps=1e-6, atol=1e-6, rtol=1e-6)


def test_all_void_is_zero_with_zero_grad():
  for per_image in (True, False):
    v, g = jax.value_and_grad(lovasz_jax.lovasz_hinge)(
        jnp.ones((2, 4)), jnp.full((2, 4), 255), ignore_index=255, per_image=per_image)
    assert v == 0.0 and not np.any(g)


def test_out_of_range_labels():
  logits, labels = np.zeros((1, 3), np.float32), np.array([[0, 2, 1]])
  try:
    lovasz_jax.lovasz_hinge(logits, labels)
  except ValueError as e:
    assert "2" in str(e) and "ignore_index" in str(e)
  else:
    raise AssertionError("expected ValueError")
  assert np.isnan(jax.jit(lovasz_jax.lovasz_hinge)(logits, labels))
