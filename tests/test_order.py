"""Every implementation of the row kernels against Alg. 1 and each other.

The native CPU kernel and the portable XLA path (its default "sort2" and the
"scatter" and "packed" variants the accelerator benchmark can time) must give
the same weights, bit for bit where the order is fixed, including at ties.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lovasz_jax
from lovasz_jax import _cpu, _distribute, _extension, _order
from tests import reference

ALL_PATHS = [p for p in _order.PATHS if p != "native" or _cpu.available()]


def _exact(path, keys):
  with _order.use_path(path):
    return jax.jit(_order.exact_weights)(keys)


def _histogram(path, keys, num_bins):
  with _order.use_path(path):
    return jax.jit(functools.partial(_distribute.row_weights, num_bins=num_bins))(keys)


def _distinct_problem(rng, shape, dtype):
  errors = jnp.asarray(rng.permutation(np.prod(shape)).reshape(shape) / 5e3, dtype)
  fg = jnp.asarray(rng.random(shape) < 0.2)
  valid = jnp.asarray(rng.random(shape) < 0.9)
  return errors, fg, valid


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_weights_match_alg1(path, dtype):
  with jax.enable_x64(dtype == np.float64):
    rng = np.random.default_rng(1)
    shape = (3, 5, 1000)
    errors, fg, valid = _distinct_problem(rng, shape, dtype)
    valid = valid.at[0, 0].set(False)
    keys = _extension.encode_keys(errors, fg, valid)
    w, losses = _exact(path, keys)
    assert w.dtype == losses.dtype == dtype
    assert losses.shape == (3, 5) and losses[0, 0] == 0 and not np.any(w[0, 0])
    for i in np.ndindex(3, 5):
      v = np.asarray(valid[i])
      e, f = np.asarray(errors[i], np.float64)[v], np.asarray(fg[i])[v]
      ref_loss, ref_grad = reference.extension(e, f)
      np.testing.assert_allclose(np.asarray(w[i])[v], ref_grad, rtol=1e-5, atol=1e-9)
      np.testing.assert_allclose(losses[i], ref_loss, rtol=1e-6)
      assert not np.asarray(w[i])[~v].any()


@pytest.mark.parametrize("path", ALL_PATHS)
def test_float32_loss_of_long_rows(path):
  # Rows of 17,408 pixels: summed term after term in float32, this loss
  # drifts by 2.7e-5; it must stay within 1e-6 of the float64 reference.
  logits = jax.random.normal(jax.random.key(0), (2, 128, 68, 4))
  labels = jax.random.randint(jax.random.key(1), (2, 128, 68), 0, 4)
  with _order.use_path(path):
    loss = jax.jit(lovasz_jax.lovasz_softmax)(logits, labels)
  ref, _ = reference.lovasz_softmax(np.asarray(logits, np.float64), np.asarray(labels))
  np.testing.assert_allclose(loss, ref, rtol=1e-6)


@pytest.mark.parametrize("native", [False, True] if _cpu.available() else [False])
def test_float32_histogram_loss_of_many_bins(native):
  # 8,192 bins in one row: the loss is a sum over 16,384 slots.
  num_bins = 8192
  rng = np.random.default_rng(12)
  counts = rng.integers(0, 50, (1, 2 * num_bins + 1)).astype(np.int32)
  weigh = _cpu.slot_weights if native else _extension.slot_weights
  _, losses = jax.jit(functools.partial(weigh, num_bins=num_bins, dtype=jnp.float32))(counts)
  with jax.enable_x64(True):
    _, ref = jax.jit(functools.partial(_extension.slot_weights, num_bins=num_bins,
                                       dtype=jnp.float64))(jnp.asarray(counts))
  np.testing.assert_allclose(losses, ref, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_path_gives_the_same_weights(dtype):
  with jax.enable_x64(dtype == np.float64):
    rng = np.random.default_rng(2)
    errors, fg, valid = _distinct_problem(rng, (2, 3, 777), dtype)
    keys = _extension.encode_keys(errors, fg, valid)
    results = {p: _exact(p, keys) for p in ALL_PATHS}
    first = results[ALL_PATHS[0]]
    for p, (w, losses) in results.items():
      np.testing.assert_allclose(w, first[0], rtol=3e-7, atol=0, err_msg=p)
      np.testing.assert_allclose(losses, first[1], rtol=1e-6, err_msg=p)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_ties_put_foreground_first_then_pixel_order(path):
  # Two classes with zero logits: every error is 0.5, foreground and
  # background tied. Both paths must break ties the same way: foreground
  # first, then by pixel index.
  rng = np.random.default_rng(3)
  n = 300
  fg = rng.random((2, n)) < 0.4
  errors = jnp.full((2, n), 0.5, jnp.float32)
  keys = _extension.encode_keys(errors, jnp.asarray(fg), jnp.ones((2, n), bool))
  w, _ = _exact(path, keys)
  for r in range(2):
    order = np.concatenate([np.flatnonzero(fg[r]), np.flatnonzero(~fg[r])])
    expect = np.empty(n)
    expect[order] = reference.alg1_weights(fg[r][order])
    np.testing.assert_allclose(np.asarray(w[r]), expect, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("shape", [(7,), (4, 9), (2, 3, 11), (2, 2, 2, 5)])
def test_any_number_of_leading_axes(path, shape):
  rng = np.random.default_rng(5)
  errors, fg, valid = _distinct_problem(rng, shape, np.float32)
  keys = _extension.encode_keys(errors, fg, valid)
  w, losses = _exact(path, keys)
  assert w.shape == shape and losses.shape == shape[:-1]
  flat_w, flat_l = _exact(path, keys.reshape(-1, shape[-1]))
  np.testing.assert_allclose(w.reshape(-1, shape[-1]), flat_w, rtol=3e-7, atol=0)
  np.testing.assert_allclose(losses.reshape(-1), flat_l, rtol=1e-6)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_histogram_paths_agree(path, dtype):
  with jax.enable_x64(dtype == np.float64):
    rng = np.random.default_rng(6)
    shape = (2, 3, 500)
    errors = jnp.asarray(rng.random(shape), dtype)
    fg = jnp.asarray(rng.random(shape) < 0.3)
    valid = jnp.asarray(rng.random(shape) < 0.9).at[1, 2].set(False)
    keys = _extension.encode_bins(errors, fg, valid, 50)
    w, losses = _histogram(path, keys, 50)
    # Against another path (the portable default, or the native kernel for it).
    other = "sort2" if path != "sort2" else ("native" if _cpu.available() else "scatter")
    ref_w, ref_losses = _histogram(other, keys, 50)
    assert w.dtype == losses.dtype == dtype
    np.testing.assert_allclose(w, ref_w, rtol=3e-7 if dtype == np.float32 else 1e-15,
                               atol=0)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6 if dtype == np.float32 else 1e-12)
    assert losses[1, 2] == 0 and not np.any(w[1, 2])
    # The counts themselves.
    with _order.use_path(path):
      counts = np.asarray(jax.jit(functools.partial(_order.histogram_counts,
                                                    num_bins=50))(keys))
    k = np.asarray(keys)
    for i in np.ndindex(2, 3):
      np.testing.assert_array_equal(counts[i], np.bincount(k[i], minlength=101))


@pytest.mark.parametrize("path", ALL_PATHS)
def test_empty_rows(path):
  keys = jnp.zeros((2, 0), jnp.uint32)
  w, losses = _exact(path, keys)
  assert w.shape == (2, 0)
  np.testing.assert_array_equal(losses, [0.0, 0.0])
  w, losses = _histogram(path, keys, 8)
  assert w.shape == (2, 0)
  np.testing.assert_array_equal(losses, [0.0, 0.0])


def test_use_path_rejects_unknown_paths():
  with pytest.raises(ValueError, match="path must be one of"):
    with _order.use_path("fast"):
      pass


_NO_KERNEL_PROGRAM = """
import functools, jax, jax.numpy as jnp, lovasz_jax
from lovasz_jax import _cpu
assert not _cpu.available()
x = jax.ShapeDtypeStruct((2, 64, 64, 5), jnp.float32)
y = jax.ShapeDtypeStruct((2, 64, 64), jnp.int32)
f = jax.jit(jax.value_and_grad(lovasz_jax.lovasz_softmax))
compiled = f.lower(x, y).compile()
text = compiled.as_text()
ratio = compiled.memory_analysis().temp_size_in_bytes / (2 * 64 * 64 * 5 * 4)
print("u64 sort" if "u64[" in text and "sort(" in text else "other", "while" in text, ratio)
"""


def _no_kernel_program():
  import os
  import subprocess
  import sys
  env = dict(os.environ, LOVASZ_JAX_CPU_KERNEL="0")
  proc = subprocess.run([sys.executable, "-c", _NO_KERNEL_PROGRAM], env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  kind, loops, ratio = proc.stdout.strip().splitlines()[-1].rsplit(" ", 2)
  return kind, loops == "True", float(ratio)


def test_cpu_without_the_kernel_sorts_packed_rows_one_at_a_time():
  # Where the native kernel is missing (or switched off), the CPU branch
  # sorts one packed uint64 row at a time: on XLA's CPU sort the fastest
  # variant, and the only one besides the pair sort within the memory
  # target (its sort buffers hold one row). GPU and TPU keep the pair sort.
  kind, loops, _ = _no_kernel_program()
  assert kind == "u64 sort" and loops


def test_cpu_without_the_kernel_compiled_temp_memory():
  # (Compiled temp memory depends on XLA's version: tested on the newest
  # jax only, like tests/test_memory.py.)
  assert _no_kernel_program()[2] <= 4.0
