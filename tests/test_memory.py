"""Compiled temp memory of jit(value_and_grad(loss)), as a multiple of the logits.

``memory_analysis()`` of the compiled program, on CPU. The native kernel's
buffers are its own (not in XLA's count), so the portable path, which is what
GPU and TPU run, is measured too: compiled on CPU with the native kernel
switched off (``_order.use_path``), its buffers are all XLA's. The benchmark
(``make bench``) reports the same numbers beside the timings.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lovasz_jax
from lovasz_jax import _cpu, _extension, _order

SHAPES = [(2, 256, 256, 21), (1, 96, 96, 19)]

# (mode, native limit, portable limit)
LIMITS = [
    (dict(), 4.0, 4.0),
    (dict(per_image=True), 4.0, 4.0),
    (dict(method="histogram"), 3.0, 3.0),
    (dict(class_chunk_size=4), 1.5, 1.5),
    (dict(class_chunk_size=4, per_image=True), 1.5, 1.5),
]


def temp_ratio(shape, **kwargs):
  logits = jax.ShapeDtypeStruct(shape, jnp.float32)
  labels = jax.ShapeDtypeStruct(shape[:-1], jnp.int32)
  fn = jax.jit(jax.value_and_grad(functools.partial(lovasz_jax.lovasz_softmax, **kwargs)))
  mem = fn.lower(logits, labels).compile().memory_analysis()
  return mem.temp_size_in_bytes / (np.prod(shape) * 4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", ["native", "portable"])
def test_compiled_temp_memory(shape, path):
  if path == "native" and not _cpu.available():
    pytest.skip("native CPU kernel not built")
  with _order.use_path("native" if path == "native" else "sort2"):
    for kwargs, native_limit, portable_limit in LIMITS:
      if kwargs.get("method") == "histogram" and np.prod(shape[1:-1]) < 16 * 4096:
        # The [C, 2K + 1] slot arrays (K = 4096) are as large as the logits
        # when an image has not many more pixels than slots.
        continue
      limit = native_limit if path == "native" else portable_limit
      ratio = temp_ratio(shape, **kwargs)
      assert ratio <= limit, (kwargs, ratio)


@pytest.mark.parametrize("shape", [(1, 96, 96, 19), (1, 100, 100, 7)])
def test_blocked_row_sum_takes_no_memory_of_its_own(shape, monkeypatch):
  # _extension.row_dot sums each row's loss by blocks (exact on every XLA
  # version); on the portable path it must cost no more than one reduce.
  # 9,216 pixels are whole blocks, 10,000 leave a part block.
  # (The inner jitted functions' traces are cached: cleared around the swap
  # so that each measurement traces the sum it names, and no later test
  # sees the swapped one.)
  with _order.use_path("sort2"):
    jax.clear_caches()
    blocked = temp_ratio(shape)
    monkeypatch.setattr(_extension, "_blocked_sum", lambda v: jnp.sum(v, axis=-1))
    jax.clear_caches()
    try:
      one_reduce = temp_ratio(shape)
    finally:
      monkeypatch.undo()
      jax.clear_caches()
  assert blocked <= one_reduce * 1.01, (blocked, one_reduce)
