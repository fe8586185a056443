"""jax.export of a CPU loss program, reloaded in fresh processes.

On CPU the loss calls the native kernel, an XLA custom call; jax.export
refuses custom calls that have no compatibility guarantee unless that check
is disabled for the target. The serialized program then runs in any process
that has imported lovasz_jax, which registers the target.
"""

import os
import pathlib
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
# The exact loss and the histogram loss: every custom call the kernel has.
fn = jax.jit(jax.value_and_grad(lambda x, y: lovasz_jax.lovasz_softmax(x, y)
                                + lovasz_jax.lovasz_softmax(x, y, method="histogram")))
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
  check = export.DisabledSafetyCheck.custom_call(TARGET)
  exported = export.export(fn, platforms=["cpu"], disabled_checks=[check])(logits, labels)
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
  # Without the import, nothing registers the kernel's target.
  proc = run_python(CALL.format(imports=""), blob, data)
  assert proc.returncode != 0
  assert f"No FFI handler registered for {TARGET}" in proc.stderr, proc.stderr[-3000:]
