"""The program lowers for TPU and CUDA without the hardware (jax.export).

What GPU and TPU users run is the portable XLA path: the lowering must hold
no CPU custom call, and the sorts and scatters the design says (README,
"The GPU/TPU path"): exact mode sorts twice (once to order each row, once to
put the weights back in pixel order) and scatters nothing; histogram mode
sorts nothing and counts with one scatter-add. The sharded forms are checked
in tests/sharded_check.py (they need 8 devices to lower).
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

import lovasz_jax
from tests import sharded_check

X = jax.ShapeDtypeStruct((2, 16, 16, 5), jnp.float32)
Y = jax.ShapeDtypeStruct((2, 16, 16), jnp.int32)
MULTI = jax.ShapeDtypeStruct((2, 16, 16, 5), jnp.int32)

CASES = {
    "sort": (lambda x, y: lovasz_jax.lovasz_softmax(x, y), Y, 2, 0),
    "histogram": (lambda x, y: lovasz_jax.lovasz_softmax(x, y, method="histogram"), Y,
                  0, None),
    "per_image": (lambda x, y: lovasz_jax.lovasz_softmax(x, y, per_image=True), Y, 2, 0),
    "lean": (lambda x, y: lovasz_jax.lovasz_softmax(x, y, class_chunk_size=2), Y, 2, 0),
    "per_image_histogram": (lambda x, y: lovasz_jax.lovasz_softmax(
        x, y, per_image=True, method="histogram", class_chunk_size=3), Y, 0, None),
    "sigmoid": (lambda x, y: lovasz_jax.lovasz_sigmoid(x, y, axis=-1), MULTI, 2, 0),
    "sigmoid_histogram": (lambda x, y: lovasz_jax.lovasz_sigmoid(
        x, y, method="histogram"), MULTI, 0, None),
    "hinge": (lambda x, y: lovasz_jax.lovasz_hinge(x, y), MULTI, 2, 0),
}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", CASES)
def test_lowers_for_accelerators(platform, name):
  fn, labels, sorts, scatters = CASES[name]
  exported = jax.export.export(jax.jit(jax.value_and_grad(fn)), platforms=(platform,))(
      X, labels)
  counts = sharded_check._lowering_counts(exported.mlir_module())
  assert counts["cpu_kernel"] == 0 and counts["custom_partitioning"] == 0
  assert not re.search(r"stablehlo\.custom_call", exported.mlir_module())
  assert counts["sort"] == sorts
  if scatters is not None:
    assert counts["scatter"] == scatters
  else:  # histogram: counted by a scatter-add (in a loop over rows), no sort
    assert counts["scatter"] >= 1
  assert exported.platforms == (platform,)


SHARDED = [(mesh, name) for mesh in ("explicit", "auto")
           for name in ("sort", "histogram", "per_image", "lean")] + [("shard_map", "sort")]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("mesh, name", SHARDED)
def test_sharded_forms_lower_for_accelerators(sharded_results, platform, mesh, name):
  r = sharded_results["portable"][f"export/{platform}/{mesh}/{name}"]
  assert r["devices"] == 8
  assert r["cpu_kernel"] == 0 and r["custom_partitioning"] == 0
  assert r["all_gather"] == 0
  if name == "per_image":
    assert r["all_to_all"] == 0
  if name in ("sort", "lean"):
    assert r["all_to_all"] >= 2   # whole rows out, weights back
  assert r["sort"] == (0 if name == "histogram" else 2)


def test_native_kernel_is_only_in_the_cpu_lowering():
  f = jax.jit(jax.value_and_grad(functools.partial(lovasz_jax.lovasz_softmax)))
  from lovasz_jax import _cpu  # pylint: disable=import-outside-toplevel
  text = f.lower(X, Y).as_text()
  if _cpu.available():
    assert "lovasz_jax_weights" in text
  both = jax.export.export(f, platforms=("cpu", "cuda"))
  if _cpu.available():
    with pytest.raises(ValueError, match="custom call"):
      both(X, Y)   # the CPU kernel is a custom call: exporting it is opt-in
