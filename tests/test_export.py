"""jax.export of a CPU loss program, reloaded in fresh processes.

On CPU the loss calls the native kernel, an XLA custom call; jax.export
refuses custom calls that have no compatibility guarantee unless that check
is disabled for the target. The serialized program then runs in any process
that has imported lovasz_jax, which registers the target.
"""

import os
import pathlib
import re
import subprocess
import sys

import jax
from jax import export
import numpy as np
import pytest

import lovasz_jax

ROOT = pathlib.Path(__file__).parent.parent
TARGET = "lovasz_jax_weights"
needs_kernel = pytest.mark.skipif(os.environ.get("LOVASZ_JAX_CPU_KERNEL") == "0",
                                  reason="LOVASZ_JAX_CPU_KERNEL=0")

EXPORT = """
import sys
import jax
from jax import export
import numpy as np
import lovasz_jax

logits = jax.random.normal(jax.random.key(0), (2, 24, 24, 5))
labels = jax.random.randint(jax.random.key(1), (2, 24, 24), 0, 5)
# The exact loss and the histogram loss, also in the lean mode (whose
# histogram chunks look their weights up apart from the gradient pass):
# every custom call the kernel has.
fn = jax.jit(jax.value_and_grad(
    lambda x, y: lovasz_jax.lovasz_softmax(x, y)
    + lovasz_jax.lovasz_softmax(x, y, method="histogram")
    + lovasz_jax.lovasz_softmax(x, y, method="histogram", class_chunk_size=2)))
exported = export.export(
    fn, platforms=["cpu"],
    disabled_checks=[export.DisabledSafetyCheck.custom_call(t)
                     for t in lovasz_jax.CPU_CUSTOM_CALL_TARGETS],
)(logits, labels)
for target in lovasz_jax.CPU_CUSTOM_CALL_TARGETS:
  assert target in exported.mlir_module(), target
with open(sys.argv[1], "wb") as f:
  f.write(exported.serialize())
loss, grad = fn(logits, labels)
np.savez(sys.argv[2], logits=logits, labels=labels, loss=loss, grad=grad)
"""

CALL = """
import sys
import jax
import numpy as np
{imports}
with open(sys.argv[1], "rb") as f:
  exported = jax.export.deserialize(bytearray(f.read()))
d = np.load(sys.argv[2])
loss, grad = exported.call(d["logits"], d["labels"])
np.testing.assert_allclose(loss, d["loss"], rtol=1e-6)
np.testing.assert_allclose(grad, d["grad"], rtol=1e-6, atol=1e-9)
print("ok", float(loss))
"""


def run_python(code, *args):
  return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)


@needs_kernel
def test_export_refuses_the_custom_call_unless_its_check_is_disabled():
  logits = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
  labels = jax.random.randint(jax.random.key(1), (1, 8, 8), 0, 3)
  fn = jax.jit(lovasz_jax.lovasz_softmax)
  with pytest.raises(ValueError, match="custom calls .*no compatibility guarantees"):
    export.export(fn, platforms=["cpu"])(logits, labels)
  checks = [export.DisabledSafetyCheck.custom_call(t)
            for t in lovasz_jax.CPU_CUSTOM_CALL_TARGETS]
  exported = export.export(fn, platforms=["cpu"], disabled_checks=checks)(logits, labels)
  assert TARGET in exported.mlir_module()


@needs_kernel
def test_exported_loss_runs_in_a_fresh_process_after_import(tmp_path):
  blob, data = tmp_path / "loss.jax_exported", tmp_path / "expected.npz"
  proc = run_python(EXPORT, blob, data)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # A fresh process that only imports lovasz_jax runs it and gets the same
  # loss and gradient.
  proc = run_python(CALL.format(imports="import lovasz_jax"), blob, data)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("ok")
  # Without the import, nothing registers the kernel's targets.
  proc = run_python(CALL.format(imports=""), blob, data)
  assert proc.returncode != 0
  assert re.search("No FFI handler registered for lovasz_jax_", proc.stderr), \
      proc.stderr[-3000:]


# A program exported by lovasz_jax 0.2.0 (the EXPORT script above, run on
# that release's source tree, git 362c89b, with its kernel built): it names the custom calls of that release (lovasz_jax_weights,
# lovasz_jax_counts and lovasz_jax_lookup), which this version still
# registers with the same meaning, so it still loads and gives this
# version's loss and gradient.
OLD_EXPORT = pathlib.Path(__file__).parent / "data" / "loss_v0.2.0.jax_exported"


@needs_kernel
def test_program_exported_by_the_previous_release_still_runs():
  with open(OLD_EXPORT, "rb") as f:
    exported = export.deserialize(bytearray(f.read()))
  module = exported.mlir_module()
  old_targets = ("lovasz_jax_weights", "lovasz_jax_counts", "lovasz_jax_lookup")
  assert all(t in module for t in old_targets)
  assert "lovasz_jax_encode" not in module
  logits = jax.random.normal(jax.random.key(0), (2, 24, 24, 5))
  labels = jax.random.randint(jax.random.key(1), (2, 24, 24), 0, 5)
  fn = jax.jit(jax.value_and_grad(lambda x, y: lovasz_jax.lovasz_softmax(x, y)
                                  + lovasz_jax.lovasz_softmax(x, y, method="histogram")))
  loss, grad = exported.call(logits, labels)
  want_loss, want_grad = fn(logits, labels)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-8)


# Shape polymorphism: one export serves every batch and height. Sizes are
# symbolic while the loss is traced, so no size may be compared in Python;
# the exported program must give jit's value and gradient at several shapes,
# on the native kernel and on the portable path.

RNG = np.random.default_rng(0)
SOFTMAX, SIGMOID = lovasz_jax.lovasz_softmax, lovasz_jax.lovasz_sigmoid
POLY_CASES = {
    "sort": (SOFTMAX, {}),
    "histogram": (SOFTMAX, dict(method="histogram")),
    "per_image": (SOFTMAX, dict(per_image=True)),
    "lean": (SOFTMAX, dict(class_chunk_size=3)),
    "per_image_histogram_lean": (SOFTMAX, dict(per_image=True, method="histogram",
                                               class_chunk_size=1)),
    "sigmoid_multilabel": (SIGMOID, dict(axis=-1)),
    "sigmoid_binary_histogram": (SIGMOID, dict(method="histogram")),
    "hinge": (lovasz_jax.lovasz_hinge, {}),
}


def _custom_calls(exported):
  """The program's custom-call targets, less those of export itself.

  With symbolic sizes, jax.export adds shape assertions and StableHLO's
  dynamic ops (``stablehlo.dynamic_*``, refined to static ops when the
  program is called with concrete shapes).
  """
  targets = set(re.findall(r"custom_call @([\w.]+)", exported.mlir_module()))
  return {t for t in targets if t != "shape_assertion" and not t.startswith("stablehlo.")}


def _poly_specs(fn, kw):
  b, h = export.symbolic_shape("b, h")
  multi = fn is SOFTMAX or kw.get("axis") == -1
  x = jax.ShapeDtypeStruct((b, h, 6) + ((4,) if multi else ()), np.float32)
  y = jax.ShapeDtypeStruct((b, h, 6) + ((4,) if multi and fn is not SOFTMAX else ()),
                           np.int32)
  return x, y


def _poly_args(fn, kw, batch, height):
  multi = fn is SOFTMAX or kw.get("axis") == -1
  x = RNG.normal(size=(batch, height, 6) + ((4,) if multi else ())).astype(np.float32)
  if fn is SOFTMAX:
    y = RNG.integers(0, 4, (batch, height, 6)).astype(np.int32)
  else:
    y = (RNG.random(x.shape) < 0.3).astype(np.int32)
  return x, y


@pytest.mark.parametrize("name", POLY_CASES)
def test_shape_polymorphic_export_matches_jit(path, name):
  fn, kw = POLY_CASES[name]
  f = jax.jit(jax.value_and_grad(lambda x, y: fn(x, y, **kw)))
  checks = [export.DisabledSafetyCheck.custom_call(t)
            for t in lovasz_jax.CPU_CUSTOM_CALL_TARGETS]
  exported = export.export(f, platforms=["cpu"], disabled_checks=checks)(
      *_poly_specs(fn, kw))
  calls = _custom_calls(exported)
  if path == "native":
    assert calls and calls <= set(lovasz_jax.CPU_CUSTOM_CALL_TARGETS), calls
  else:
    assert not calls, calls
  for batch, height in [(1, 3), (3, 5), (2, 1)]:  # symbolic sizes are >= 1
    x, y = _poly_args(fn, kw, batch, height)
    loss, grad = exported.call(x, y)
    want_loss, want_grad = f(x, y)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-9)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", POLY_CASES)
def test_shape_polymorphic_export_lowers_for_accelerators(platform, name):
  fn, kw = POLY_CASES[name]
  f = jax.jit(jax.value_and_grad(lambda x, y: fn(x, y, **kw)))
  exported = export.export(f, platforms=[platform])(*_poly_specs(fn, kw))
  assert exported.platforms == (platform,)
  assert not _custom_calls(exported)


def test_shape_polymorphic_export_of_the_metrics():
  b, h = export.symbolic_shape("b, h")
  ids = jax.ShapeDtypeStruct((b, h), np.int32)
  f = jax.jit(lambda p, y: lovasz_jax.confusion_matrix(p, y, 4, ignore_index=3))
  exported = export.export(f)(ids, ids)
  for shape in [(1, 1), (3, 5)]:
    p, y = (RNG.integers(0, 4, shape).astype(np.int32) for _ in range(2))
    np.testing.assert_array_equal(exported.call(p, y), f(p, y))
