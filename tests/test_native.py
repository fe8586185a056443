"""The native CPU kernel: shipped with the package, registered at import.

Unless ``LOVASZ_JAX_CPU_KERNEL=0`` switches it off, these tests require the
kernel: an install that lost it (a source build without a C++ compiler) fails
here, saying why, instead of silently running the 20x slower portable path.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lovasz_jax
from lovasz_jax import _cpu
from lovasz_jax import _distribute
from lovasz_jax import _extension
from lovasz_jax import _order

ROOT = pathlib.Path(__file__).parent.parent
TARGET = "lovasz_jax_weights"
SWITCHED_OFF = os.environ.get("LOVASZ_JAX_CPU_KERNEL") == "0"
needs_kernel = pytest.mark.skipif(SWITCHED_OFF, reason="LOVASZ_JAX_CPU_KERNEL=0")


def run_python(code, *args, env=None, cwd=ROOT):
  """Runs ``code`` in a fresh interpreter; returns its stdout."""
  proc = subprocess.run([sys.executable, "-W", "error", "-c", code, *map(str, args)],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def softmax_inputs(shape=(2, 16, 16, 5)):
  logits = jax.random.normal(jax.random.key(0), shape)
  labels = jax.random.randint(jax.random.key(1), shape[:-1], 0, shape[-1])
  return logits, labels


@needs_kernel
def test_kernel_is_loaded_and_registered():
  assert _cpu.available(), _cpu._registration_error()
  path = _cpu.library_path()
  assert path is not None and path.parent == pathlib.Path(lovasz_jax.__file__).parent


@needs_kernel
def test_import_registers_the_target_without_starting_a_backend():
  # After `import lovasz_jax` alone, a raw call of the FFI target works: that
  # is what an exported program needs. Importing starts no JAX backend.
  code = """
import json
import jax
import numpy as np
import lovasz_jax
from jax._src import xla_bridge
backends = sorted(getattr(xla_bridge, "_backends", {}))
keys = np.array([[3, 0, 6, 5]], np.uint32)
call = jax.ffi.ffi_call("lovasz_jax_weights", (
    jax.ShapeDtypeStruct(keys.shape, np.float32),
    jax.ShapeDtypeStruct(keys.shape[:-1], np.float32)))
w, loss = call(keys, num_bins=np.int64(0))
print(json.dumps({"backends": backends, "weights": np.asarray(w).tolist()}))
"""
  out = json.loads(run_python(code).splitlines()[-1])
  assert out["backends"] == []
  # Key 0 is void; key 6 (foreground) has the largest error and, as the only
  # foreground pixel, takes all the weight.
  np.testing.assert_array_equal(out["weights"], [[0.0, 0.0, 1.0, 0.0]])


@needs_kernel
@pytest.mark.parametrize("name", ["softmax", "softmax_histogram", "sigmoid", "hinge"])
def test_lowered_cpu_program_calls_the_kernel(name):
  logits, labels = softmax_inputs()
  binary = (labels == 1).astype(jnp.int32)
  fn, x, y = {
      "softmax": (lovasz_jax.lovasz_softmax, logits, labels),
      "softmax_histogram": (lambda x, y: lovasz_jax.lovasz_softmax(
          x, y, method="histogram"), logits, labels),
      "sigmoid": (lovasz_jax.lovasz_sigmoid, logits[..., 0], binary),
      "hinge": (lovasz_jax.lovasz_hinge, logits[..., 0], binary),
  }[name]
  text = jax.jit(jax.value_and_grad(fn)).lower(x, y).as_text()
  # Histogram mode counts the keys as it computes them, weighs the slots,
  # and looks each pixel's weight up in the gradient pass: no key or
  # per-pixel weight is stored. The exact mode orders rows.
  targets = (["lovasz_jax_encode_counts", "lovasz_jax_slots", "lovasz_jax_grad_table"]
             if name.endswith("histogram") else [TARGET])
  called = lambda target: f'"{target}"' in text or f"@{target}(" in text
  for target in targets:
    assert called(target), text[-2000:]
  if name.endswith("histogram"):
    for target in ("lovasz_jax_encode", "lovasz_jax_counts", "lovasz_jax_lookup"):
      assert not called(target), target


def test_switched_off_means_portable_path_and_no_library():
  code = """
import json
import jax
import lovasz_jax
from lovasz_jax import _cpu
logits = jax.random.normal(jax.random.key(0), (2, 16, 16, 5))
labels = jax.random.randint(jax.random.key(1), (2, 16, 16), 0, 5)
text = jax.jit(lovasz_jax.lovasz_softmax).lower(logits, labels).as_text()
print(json.dumps({"available": _cpu.available(), "loaded": _cpu._library is not None,
                  "calls": "lovasz_jax_weights" in text,
                  "loss": float(lovasz_jax.lovasz_softmax(logits, labels))}))
"""
  env = dict(os.environ, LOVASZ_JAX_CPU_KERNEL="0")
  out = json.loads(run_python(code, env=env).splitlines()[-1])  # -W error: no warning
  assert out == {"available": False, "loaded": False, "calls": False,
                 "loss": pytest.approx(float(lovasz_jax.lovasz_softmax(*softmax_inputs())),
                                       rel=1e-6)}


# Rows x pixels just over 2^16 keys: the kernel shares rows out to XLA's
# intra-op thread pool (several chunks of rows, claimed by the calling
# thread and by pool tasks).
THREADED_SHAPES = [(7, 9500), (70_000, 1), (3, 21_846)]


@needs_kernel
@pytest.mark.parametrize("shape", THREADED_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threaded_kernel_matches_portable_path(shape, dtype):
  assert np.prod(shape) > 2**16
  with jax.enable_x64(dtype == np.float64):
    rng = np.random.default_rng(3)
    errors = jnp.asarray(rng.random(shape), dtype)
    fg = jnp.asarray(rng.random(shape) < 0.3)
    valid = jnp.asarray(rng.random(shape) < 0.95)
    keys = _extension.encode_keys(errors, fg, valid)
    with _order.use_path("native"):
      native_w, native_loss = jax.jit(_order.exact_weights)(keys)
    with _order.use_path("sort2"):
      w, loss = jax.jit(_order.exact_weights)(keys)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert native_w.dtype == w.dtype == dtype
    np.testing.assert_allclose(native_w, w, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(native_loss, loss, rtol=rtol, atol=1e-12)
    # Histogram mode's counting and lookup share the same threading.
    bins = _extension.encode_bins(errors, fg, valid, 64)
    hist = jax.jit(lambda k: _distribute.row_weights(k, 64))
    with _order.use_path("native"):
      native_w, native_loss = hist(bins)
    with _order.use_path("sort2"):
      w, loss = hist(bins)
    np.testing.assert_allclose(native_w, w, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(native_loss, loss, rtol=rtol, atol=1e-12)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 20_000, 5), (3, 9_000, 7)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("softmax", [True, False])
def test_counting_encode_pass_counts_the_keys_of_the_encode_pass(shape, dtype, softmax):
  # Enough blocks of pixels that several threads count into tables of their
  # own, which are then summed: the counts must be exactly those of the
  # keys that the (storing) encode pass computes, and the log-sum-exp and
  # flags the same.
  with jax.enable_x64(dtype == np.float64):
    rng = np.random.default_rng(5)
    x = rng.normal(size=shape) * 3
    if not softmax:
      x = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    x = jnp.asarray(x, dtype)
    labels = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
    labels = jnp.asarray(np.where(rng.random(shape[:-1]) < 0.1, _extension.VOID_LABEL,
                                  labels))
    keys, lse, bad = jax.jit(lambda v, y: _cpu.encode_rows(v, y, 64, softmax))(x, labels)
    counts, lse2, bad2 = jax.jit(lambda v, y: _cpu.encode_counts(v, y, 64, softmax))(
        x, labels)
    want = jax.jit(lambda k: _cpu.histogram_counts(k, 64))(keys)
    np.testing.assert_array_equal(counts, want)
    np.testing.assert_array_equal(lse2, lse)
    np.testing.assert_array_equal(bad2, bad)
    assert int(counts.sum()) == labels.size * shape[-1]


@needs_kernel
@pytest.mark.parametrize("num_classes", list(range(1, 18)) + [21])
def test_pixel_passes_move_every_value_for_any_class_count(num_classes):
  # The float32 passes move 8 x 8 blocks between the pixel-major values and
  # the class-major tiles, the last num_classes % 8 classes with masked
  # loads and with stores that spill into the next pixels' values (then
  # overwritten): any class count, partial blocks and tiles, and values
  # whose moves can be checked exactly. Probabilities in: the keys are
  # those of the portable encode pass, bit for bit.
  rng = np.random.default_rng(num_classes)
  pixels = 203
  p = rng.random((2, pixels, num_classes)).astype(np.float32)
  labels = rng.integers(0, num_classes, (2, pixels)).astype(np.int32)
  labels[:, ::7] = _extension.VOID_LABEL
  labels, x = jnp.asarray(labels), jnp.asarray(p)
  for bins in (0, 64):
    keys, _, bad = jax.jit(lambda v, y: _cpu.encode_rows(v, y, bins, False))(x, labels)
    want, _, want_bad = _extension.encode_rows(x, labels, bins, False)
    np.testing.assert_array_equal(keys, want)
    np.testing.assert_array_equal(bad, want_bad)
  # Gradient with respect to the probabilities: ct_c w[c, i], negated in
  # the pixel's own class, one product per value.
  w = rng.random((2, num_classes, pixels)).astype(np.float32)
  ct = rng.random((2, num_classes)).astype(np.float32) + 1
  lse = jnp.zeros((2, pixels), jnp.float32)
  d = jax.jit(lambda v: _cpu.rows_grad(v, lse, labels, jnp.asarray(w), jnp.asarray(ct),
                                       False))(x)
  sign = np.where(np.asarray(labels)[:, :, None] == np.arange(num_classes), -1, 1)
  want = (sign * ct[:, None, :]).astype(np.float32) * np.swapaxes(w, 1, 2)
  np.testing.assert_array_equal(d, want)


@needs_kernel
def test_class_counts_count_each_valid_label():
  rng = np.random.default_rng(2)
  labels = rng.integers(-3, 9, (3, 70_001)).astype(np.int32)
  labels[1, :40_000] = 4  # a long run of one label
  counts = jax.jit(lambda y: _cpu.class_counts(y, 7))(jnp.asarray(labels))
  want = [np.bincount(row[(row >= 0) & (row < 7)], minlength=7) for row in labels]
  np.testing.assert_array_equal(counts, np.stack(want))


@needs_kernel
def test_threaded_loss_and_grad_match_portable_process(tmp_path):
  # 4 classes x 2 x 128 x 68 pixels = 69,632 keys in one kernel call.
  logits, labels = softmax_inputs((2, 128, 68, 4))
  np.savez(tmp_path / "inputs.npz", logits=logits, labels=labels)
  loss, grad = jax.jit(jax.value_and_grad(lovasz_jax.lovasz_softmax))(logits, labels)
  code = """
import sys
import jax
import numpy as np
import lovasz_jax
d = np.load(sys.argv[1])
loss, grad = jax.jit(jax.value_and_grad(lovasz_jax.lovasz_softmax))(d["logits"], d["labels"])
np.savez(sys.argv[2], loss=loss, grad=grad)
"""
  env = dict(os.environ, LOVASZ_JAX_CPU_KERNEL="0")
  run_python(code, tmp_path / "inputs.npz", tmp_path / "portable.npz", env=env)
  portable = np.load(tmp_path / "portable.npz")
  np.testing.assert_allclose(loss, portable["loss"], rtol=1e-6)
  # The native pass computes the softmax with its own exp and log, so the
  # probabilities may differ from XLA's in the last bit; two pixels whose
  # errors then differ by an ulp can trade places in the order, which moves
  # their weights by about 1e-9 here (gradient entries are about 1e-5).
  np.testing.assert_allclose(grad, portable["grad"], rtol=1e-5, atol=1e-8)


@needs_kernel
def test_home_directory_is_never_used(tmp_path):
  # A read-only, empty home, and one holding a garbage file where the former
  # run-time build cached its library: the kernel works the same, and nothing
  # is written there.
  code = """
import json
import jax
import lovasz_jax
from lovasz_jax import _cpu
logits = jax.random.normal(jax.random.key(0), (2, 16, 16, 5))
labels = jax.random.randint(jax.random.key(1), (2, 16, 16), 0, 5)
text = jax.jit(lovasz_jax.lovasz_softmax).lower(logits, labels).as_text()
print(json.dumps({"available": _cpu.available(), "calls": "lovasz_jax_weights" in text,
                  "loss": float(lovasz_jax.lovasz_softmax(logits, labels))}))
"""
  expected = float(lovasz_jax.lovasz_softmax(*softmax_inputs()))
  empty = tmp_path / "empty"
  empty.mkdir()
  corrupt = tmp_path / "corrupt"
  cache = corrupt / ".cache" / "lovasz_jax"
  cache.mkdir(parents=True)
  (cache / "lovasz_jax_cpu_0123456789abcdef.so").write_bytes(b"\x7fELF garbage")
  for home in (empty, corrupt):
    before = sorted(p.relative_to(home) for p in home.rglob("*"))
    home.chmod(0o555)
    try:
      env = dict(os.environ, HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
      out = json.loads(run_python(code, env=env).splitlines()[-1])
    finally:
      home.chmod(0o755)
    assert out == {"available": True, "calls": True,
                   "loss": pytest.approx(expected, rel=1e-6)}
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == before


def test_missing_kernel_warns_once_on_cpu_and_never_elsewhere(tmp_path):
  # A copy of the package without the compiled library is what a source
  # build without a C++ compiler installs.
  package = tmp_path / "lovasz_jax"
  shutil.copytree(pathlib.Path(lovasz_jax.__file__).parent, package,
                  ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
  code = """
import json
import sys
import warnings
import jax
import lovasz_jax
from lovasz_jax import _cpu
assert lovasz_jax.__file__.startswith(sys.argv[1]), lovasz_jax.__file__
if sys.argv[2] == "gpu":  # what a GPU or TPU host reports
  jax.default_backend = lambda: "gpu"
logits = jax.random.normal(jax.random.key(0), (2, 16, 16, 5))
labels = jax.random.randint(jax.random.key(1), (2, 16, 16), 0, 5)
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  losses = [float(jax.jit(lovasz_jax.lovasz_softmax)(logits, labels)),
            float(lovasz_jax.lovasz_sigmoid(logits[..., 0], (labels == 1).astype(int)))]
print(json.dumps({"warnings": [str(w.message) for w in caught], "loss": losses[0],
                  "available": _cpu.available(),
                  "where": [(w.filename, w.lineno) for w in caught]}))
"""
  env = dict(os.environ, PYTHONPATH=str(tmp_path))
  env.pop("LOVASZ_JAX_CPU_KERNEL", None)  # missing, not switched off
  expected = float(lovasz_jax.lovasz_softmax(*softmax_inputs()))
  cpu = json.loads(run_python(code, tmp_path, "cpu", env=env, cwd=tmp_path)
                   .splitlines()[-1])
  assert cpu["available"] is False
  assert cpu["loss"] == pytest.approx(expected, rel=1e-6)
  assert len(cpu["warnings"]) == 1, cpu["warnings"]
  assert "native CPU kernel is not available" in cpu["warnings"][0]
  assert "without a working C++ compiler" in cpu["warnings"][0]
  assert "portable XLA path" in cpu["warnings"][0]
  # It points at the user's line (the loss call in the script), not into
  # lovasz_jax or JAX.
  assert cpu["where"][0][0] == "<string>", cpu["where"]
  gpu = json.loads(run_python(code, tmp_path, "gpu", env=env, cwd=tmp_path)
                   .splitlines()[-1])
  assert gpu["warnings"] == [] and gpu["available"] is False
