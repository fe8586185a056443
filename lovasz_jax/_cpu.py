"""The native CPU kernel: build it once, register it with XLA, and call it.

XLA's CPU sort compares keys through a generic comparator and is several times
slower than a radix sort, and the sort is most of the loss. So on CPU the
sorting and the Alg. 1 weights run in a small C++ XLA FFI kernel
(``_cpu_kernel.cc``). It is an ordinary XLA custom call, not a Python
callback, so it needs no GIL and is safe under multi-device ``jax.jit``.

The kernel is compiled on first use with the system C++ compiler (``$CXX``, or
``c++``/``g++``) against the FFI headers that ship with jaxlib, and cached in
``$LOVASZ_JAX_CACHE`` (default ``~/.cache/lovasz_jax``). Set
``LOVASZ_JAX_CPU_KERNEL=0`` to use the portable XLA path on CPU as well. When
no compiler is found, the portable path is used and a warning says so.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.custom_batching
import jaxlib
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from lovasz_jax import _sharding

_TARGET = "lovasz_jax_weights"
_SOURCE = pathlib.Path(__file__).with_name("_cpu_kernel.cc")


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("LOVASZ_JAX_CACHE")
  if root:
    return pathlib.Path(root)
  return pathlib.Path.home() / ".cache" / "lovasz_jax"


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return name
  return None


def _build() -> pathlib.Path:
  """Compiles the kernel (once per source and jaxlib version) and returns it."""
  source = _SOURCE.read_bytes()
  tag = hashlib.sha256(source + jaxlib.__version__.encode()).hexdigest()[:16]
  target = _cache_dir() / f"lovasz_jax_cpu_{tag}.so"
  if target.exists():
    return target
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set $CXX)")
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    tmp_so = pathlib.Path(tmp) / target.name
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-pthread",
           "-w", f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(tmp_so)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    os.replace(tmp_so, target)  # atomic, so concurrent builds are safe
  return target


@functools.cache
def available() -> bool:
  """Whether the native CPU kernel is built and registered with XLA."""
  if os.environ.get("LOVASZ_JAX_CPU_KERNEL", "1") == "0":
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(_build()))
    jax.ffi.register_ffi_target(
        _TARGET, jax.ffi.pycapsule(lib.LovaszJaxWeights), platform="cpu")
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(
        f"lovasz_jax: the native CPU kernel is unavailable ({e}); falling "
        "back to the portable XLA path, which gives the same values but is "
        "slower on CPU.", RuntimeWarning, stacklevel=3)
    return False
  return True


def _call(num_bins: int, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  out_dtype = "float32" if keys.dtype.itemsize == 4 else "float64"
  call = jax.ffi.ffi_call(
      _TARGET,
      (jax.ShapeDtypeStruct(keys.shape, out_dtype),
       jax.ShapeDtypeStruct(keys.shape[:-1], out_dtype)),
      vmap_method="broadcast_all")
  return call(keys, num_bins=np.int64(num_bins))


# Rows are independent, so under a sharded jit each device runs the kernel on
# its own rows: the leading axes keep their sharding, and only the pixel axis
# of a row must be whole on one device. Without this rule the partitioner
# would gather every row to every device.
def _shardings(mesh, keys):
  spec = tuple(getattr(keys.sharding, "spec", ()))
  spec = (spec + (None,) * keys.ndim)[:keys.ndim - 1]
  return (NamedSharding(mesh, PartitionSpec(*spec, None)),
          NamedSharding(mesh, PartitionSpec(*spec)))


@functools.cache
def _wrapped_call(num_bins: int):
  """The kernel call with a partitioning rule and a batching rule."""
  call = functools.partial(_call, num_bins)

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    return _shardings(mesh, arg_shapes[0])

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    rows, losses = _shardings(mesh, arg_shapes[0])
    return mesh, call, (rows, losses), (rows,)

  sharded = custom_partitioning(call)
  sharded.def_partition(
      infer_sharding_from_operands=infer, partition=partition,
      sharding_rule="... p -> ... p, ...", need_replication_factors=("p",))

  # custom_partitioning has no batching rule; under vmap the mapped axis is
  # just one more leading axis of rows.
  @jax.custom_batching.custom_vmap
  def batchable(keys):
    return sharded(keys)

  @batchable.def_vmap
  def _(axis_size, in_batched, keys):
    del axis_size
    batched = bool(in_batched[0])
    return batchable(keys), (batched, batched)

  return batchable


def weights_and_losses(keys: jax.Array,
                       num_bins: int = 0) -> tuple[jax.Array, jax.Array]:
  """Lovász weights in pixel order and row losses, on CPU.

  Args:
    keys: ``encode_keys`` keys (``num_bins == 0``: exact, sorted) or
      ``encode_bins`` keys (``num_bins > 0``: histogram mode, no sort).
    num_bins: 0, or the number of bins the keys were quantised to.
  """
  if not available():
    raise RuntimeError("the lovasz_jax native CPU kernel is unavailable")
  w, losses = _wrapped_call(num_bins)(keys)
  # Inside shard_map the custom call's results vary over the same mesh axes
  # as its operand.
  vma = _sharding.varying_axes(keys)
  if vma:
    w, losses = (jax.lax.pcast(a, vma, to="varying") for a in (w, losses))
  return w, losses
