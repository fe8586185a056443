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
import jaxlib
import numpy as np

from lovasz_jax import _sharding

_TARGET = "lovasz_jax_weights"
_COUNTS_TARGET = "lovasz_jax_counts"
_LOOKUP_TARGET = "lovasz_jax_lookup"
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
    jax.ffi.register_ffi_target(
        _COUNTS_TARGET, jax.ffi.pycapsule(lib.LovaszJaxCounts), platform="cpu")
    jax.ffi.register_ffi_target(
        _LOOKUP_TARGET, jax.ffi.pycapsule(lib.LovaszJaxLookup), platform="cpu")
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(
        f"lovasz_jax: the native CPU kernel is unavailable ({e}); falling "
        "back to the portable XLA path, which gives the same values but is "
        "slower on CPU.", RuntimeWarning, stacklevel=3)
    return False
  return True


def _varying_like(keys: jax.Array, *outs: jax.Array) -> tuple[jax.Array, ...]:
  # Inside shard_map a custom call's results vary over the same mesh axes as
  # its operand.
  vma = _sharding.varying_axes(keys)
  return tuple(_sharding.pcast_varying(a, vma) for a in outs)


def exact_weights(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Lovász weights in pixel order and row losses of whole rows, on CPU.

  Args:
    keys: ``encode_keys`` keys ``[..., P]`` (uint32, or uint64 for float64).
  """
  if not available():
    raise RuntimeError("the lovasz_jax native CPU kernel is unavailable")
  out_dtype = "float32" if keys.dtype.itemsize == 4 else "float64"
  call = jax.ffi.ffi_call(
      _TARGET,
      (jax.ShapeDtypeStruct(keys.shape, out_dtype),
       jax.ShapeDtypeStruct(keys.shape[:-1], out_dtype)),
      vmap_method="broadcast_all")
  return _varying_like(keys, *call(keys, num_bins=np.int64(0)))


def histogram_counts(keys: jax.Array, num_bins: int) -> jax.Array:
  """Pixels per slot ``[..., 2K + 1]`` (int32) of ``encode_bins`` keys, on CPU."""
  if not available():
    raise RuntimeError("the lovasz_jax native CPU kernel is unavailable")
  call = jax.ffi.ffi_call(
      _COUNTS_TARGET,
      jax.ShapeDtypeStruct(keys.shape[:-1] + (2 * num_bins + 1,), "int32"),
      vmap_method="broadcast_all")
  return _varying_like(keys, call(keys, num_bins=np.int64(num_bins)))[0]


def lookup(omega: jax.Array, keys: jax.Array) -> jax.Array:
  """``omega[..., keys]`` along the last axis (each pixel's slot weight), on CPU."""
  if not available():
    raise RuntimeError("the lovasz_jax native CPU kernel is unavailable")
  call = jax.ffi.ffi_call(
      _LOOKUP_TARGET, jax.ShapeDtypeStruct(keys.shape, omega.dtype),
      vmap_method="broadcast_all")
  return _varying_like(keys, call(omega, keys))[0]
