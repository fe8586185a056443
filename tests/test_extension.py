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


@pytest.mark.skipif(not _cpu.available(), reason="native CPU kernel not built")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_native_and_portable_kernels_agree(dtype):
  with jax.enable_x64(dtype == np.float64):
    rng = np.random.default_rng(1)
    shape = (3, 5, 1000)
    errors = jnp.asarray(rng.permutation(np.prod(shape)).reshape(shape) / 5e3,
                         dtype)  # distinct errors: one valid order
    fg = jnp.asarray(rng.random(shape) < 0.2)
    valid = jnp.asarray(rng.random(shape) < 0.9).at[0, 0].set(False)
    keys = _extension.encode_keys(errors, fg, valid)
    native, native_loss = jax.jit(_cpu.weights_and_losses)(keys)
    portable, portable_loss = jax.jit(_extension._weights_and_losses_xla)(keys)
    native = np.asarray(native)
    assert native.dtype == portable.dtype == native_loss.dtype == dtype
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(native, portable, rtol=rtol)
    np.testing.assert_allclose(native_loss, portable_loss, rtol=rtol)
    assert native_loss.shape == (3, 5) and native_loss[0, 0] == 0
    assert not native[0, 0].any()
    # And both match Alg. 1 row by row.
    for i in np.ndindex(3, 5):
      v = np.asarray(valid[i])
      e, f = np.asarray(errors[i], np.float64)[v], np.asarray(fg[i])[v]
      ref_loss, ref_grad = reference.extension(e, f)
      np.testing.assert_allclose(native[i][v], ref_grad, rtol=1e-5, atol=1e-9)
      np.testing.assert_allclose(native_loss[i], ref_loss, rtol=1e-6)
      assert not native[i][~v].any()


@pytest.mark.skipif(not _cpu.available(), reason="native CPU kernel not built")
def test_native_kernel_under_vmap():
  rng = np.random.default_rng(2)
  errors = jnp.asarray(rng.random((4, 3, 50)), jnp.float32)
  fg = jnp.asarray(rng.random((4, 3, 50)) < 0.3)
  valid = jnp.ones((4, 3, 50), bool)
  direct = _extension.row_losses(errors, fg, valid)
  mapped = jax.vmap(_extension.row_losses)(errors, fg, valid)
  np.testing.assert_allclose(direct, mapped, rtol=1e-6)


def test_empty_rows():
  out = _extension.row_losses(jnp.zeros((2, 0)), jnp.zeros((2, 0), bool),
                              jnp.zeros((2, 0), bool))
  np.testing.assert_array_equal(out, [0.0, 0.0])
