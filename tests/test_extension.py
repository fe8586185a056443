"""Alg. 1 weights, keys, and the two ordering kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lovasz_jax
from lovasz_jax import _cpu, _extension
from tests import reference


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=64))
def test_lovasz_grad_matches_alg1(fg):
  fg = np.array(fg)
  got = np.asarray(lovasz_jax.lovasz_grad(fg))
  np.testing.assert_allclose(got, reference.alg1_weights(fg), rtol=1e-6, atol=1e-7)


def test_lovasz_grad_no_foreground_puts_all_weight_first():
  np.testing.assert_array_equal(lovasz_jax.lovasz_grad(np.zeros(4)), [1, 0, 0, 0])


def test_lovasz_grad_batches_over_leading_axes():
  rng = np.random.default_rng(0)
  fg = rng.random((3, 2, 17)) < 0.3
  got = np.asarray(jax.jit(lovasz_jax.lovasz_grad)(fg))
  for i in np.ndindex(3, 2):
    np.testing.assert_allclose(got[i], reference.alg1_weights(fg[i]), atol=1e-7)
  assert got.dtype == np.float32


def test_lovasz_grad_float64_input(x64):
  got = lovasz_jax.lovasz_grad(np.array([0.0, 1.0, 1.0, 0.0]))
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, reference.alg1_weights([0, 1, 1, 0]), atol=1e-15)


def test_weights_exact_past_2_24_pixels():
  # Float32 running counts stall at 2^24; integer counts do not. The weights
  # telescope to J_P = 1.
  n = 2**24 + 2**22
  fg = np.zeros(n, bool)
  fg[::3] = True
  w = np.asarray(jax.jit(lovasz_jax.lovasz_grad)(fg), np.float64)
  g = fg.sum()
  np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
  # Every weight within a few ulps of its float64 closed form.
  tp = np.cumsum(fg)
  fp = np.arange(1, n + 1) - tp
  expect = np.where(fg, 1.0 / (g + fp), (g - tp) / ((g + fp - 1.0) * (g + fp)))
  np.testing.assert_allclose(w, expect, rtol=5e-7)


def test_keys_order_errors_then_foreground():
  errors = jnp.array([0.5, 0.25, 0.5, 0.0, 1.0, 0.7])
  fg = jnp.array([False, True, True, False, False, True])
  valid = jnp.array([True, True, True, True, True, False])
  keys = np.asarray(_extension.encode_keys(errors, fg, valid))
  assert keys.dtype == np.uint32
  assert keys[5] == 0  # void
  order = np.argsort(-keys.astype(np.int64), kind="stable")
  np.testing.assert_array_equal(order, [4, 2, 0, 1, 3, 5])


def test_prefix_counts_equal_cumsum():
  rng = np.random.default_rng(4)
  for shape in [(1,), (31,), (32,), (33,), (3, 2, 1000), (2, 64)]:
    flags = rng.random(shape) < 0.4
    got = np.asarray(jax.jit(_extension.prefix_counts)(flags))
    np.testing.assert_array_equal(got, np.cumsum(flags, axis=-1))
    assert got.dtype == np.int32


def test_lovasz_grad_rejects_0d_input():
  with pytest.raises(ValueError, match=r"lovasz_grad needs at least one axis"):
    lovasz_jax.lovasz_grad(np.float32(1.0))
  with pytest.raises(TypeError, match=r"lovasz_grad takes 0/1 or boolean"):
    lovasz_jax.lovasz_grad(np.array([1 + 1j, 0j]))
