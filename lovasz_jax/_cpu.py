"""The native CPU kernel: load it, register it with XLA, and call it.

XLA's CPU sort compares keys through a generic comparator and is several times
slower than a radix sort, and the sort is most of the loss. So on CPU the
sorting and the Alg. 1 weights run in a small C++ XLA FFI kernel
(``_cpu_kernel.cc``), as do the two passes of the softmax losses between
pixel-major logits and class-major rows (the softmax and keys on the way in,
the gradient on the way out), which XLA would run as separate passes and
transposes. These are ordinary XLA custom calls, not Python callbacks, so
they need no GIL and are safe under multi-device ``jax.jit``.

The kernel is compiled when the package is built (``setup.py``; wheels ship
it), as a shared library next to this file. Importing ``lovasz_jax`` loads it
with ctypes and registers its entry points as XLA FFI targets
(``CPU_CUSTOM_CALL_TARGETS``) for the CPU platform, without starting any JAX
backend; nothing is compiled or
written at run time. So a program exported with ``jax.export`` that calls the
kernel runs in any process that has imported ``lovasz_jax``.

Set ``LOVASZ_JAX_CPU_KERNEL=0`` to use the portable XLA path on CPU as well
(the library is then not even loaded). When the kernel is missing (a source
build without a C++ compiler) or cannot be used with the installed jaxlib, the
portable path is used, and the first trace on a CPU default backend warns
once, saying why. GPU and TPU never use the kernel and never warn about it.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
import pathlib
import re
import sys
import types
import warnings

import jax
import jaxlib
import numpy as np

from lovasz_jax import _sharding

# The kernel's entry points (one shared library): exact weights, the steps
# of histogram mode (counts, slot weights from counts, lookup; counts can be
# summed over devices in between), and the passes between the softmax
# losses' pixel-major logits and class-major rows (keys in, gradient out;
# in histogram mode, counts in and a gradient that looks the slot weights
# up itself).
_TARGET = "lovasz_jax_weights"
_COUNTS_TARGET = "lovasz_jax_counts"
_LOOKUP_TARGET = "lovasz_jax_lookup"
_ENCODE_TARGET = "lovasz_jax_encode"
_GRAD_TARGET = "lovasz_jax_grad"
_SLOTS_TARGET = "lovasz_jax_slots"
_GRAD_TABLE_TARGET = "lovasz_jax_grad_table"
_ENCODE_COUNTS_TARGET = "lovasz_jax_encode_counts"
_CLASS_COUNTS_TARGET = "lovasz_jax_class_counts"
_HANDLERS = {_TARGET: "LovaszJaxWeights", _COUNTS_TARGET: "LovaszJaxCounts",
             _LOOKUP_TARGET: "LovaszJaxLookup", _ENCODE_TARGET: "LovaszJaxEncode",
             _GRAD_TARGET: "LovaszJaxGrad", _SLOTS_TARGET: "LovaszJaxSlots",
             _GRAD_TABLE_TARGET: "LovaszJaxGradTable",
             _ENCODE_COUNTS_TARGET: "LovaszJaxEncodeCounts",
             _CLASS_COUNTS_TARGET: "LovaszJaxClassCounts"}
# Public (lovasz_jax.CPU_CUSTOM_CALL_TARGETS): the custom calls a CPU program
# may hold, for jax.export's DisabledSafetyCheck.custom_call.
CPU_CUSTOM_CALL_TARGETS = tuple(_HANDLERS)
_LIBRARY_STEM = "_cpu_kernel"


def switched_off() -> bool:
  """Whether ``LOVASZ_JAX_CPU_KERNEL=0`` asks for the portable path."""
  return os.environ.get("LOVASZ_JAX_CPU_KERNEL", "1") == "0"


def library_path() -> pathlib.Path | None:
  """The compiled kernel next to this file (named with an extension suffix)."""
  here = pathlib.Path(__file__).parent
  for suffix in importlib.machinery.EXTENSION_SUFFIXES:
    path = here / f"{_LIBRARY_STEM}{suffix}"
    if path.is_file():
      return path
  return None


def _runtime_ffi_api_version() -> tuple[int, int] | None:
  """The newest XLA FFI API version that the installed jaxlib accepts.

  jaxlib ships the FFI headers of its own runtime (``jax.ffi.include_dir()``);
  their ``XLA_FFI_API_MAJOR``/``MINOR`` are that runtime's version.
  """
  header = (pathlib.Path(jaxlib.__file__).parent / "include" / "xla" / "ffi" /
            "api" / "c_api.h")
  try:
    text = header.read_text()
  except OSError:
    return None
  major = re.search(r"#define XLA_FFI_API_MAJOR\s+(\d+)", text)
  minor = re.search(r"#define XLA_FFI_API_MINOR\s+(\d+)", text)
  if major is None or minor is None:
    return None
  return int(major[1]), int(minor[1])


class _Unavailable(Exception):
  """Why the native kernel cannot be used."""


_library: ctypes.CDLL | None = None  # kept alive while registered


def _load_and_register() -> None:
  """Loads the kernel and registers it with XLA.

  Raises:
    _Unavailable: saying why the kernel cannot be used.
  """
  global _library
  path = library_path()
  if path is None:
    raise _Unavailable(
        f"there is no compiled kernel in {pathlib.Path(__file__).parent}: "
        "this copy of lovasz_jax was built from source without a working C++ "
        "compiler")
  try:
    lib = ctypes.CDLL(str(path))
    version = lib.LovaszJaxFfiApiVersion
    handlers = {target: getattr(lib, symbol) for target, symbol in _HANDLERS.items()}
  except (OSError, AttributeError) as e:
    raise _Unavailable(f"cannot load {path}: {e}") from e
  major, minor = ctypes.c_int32(), ctypes.c_int32()
  version(ctypes.byref(major), ctypes.byref(minor))
  built = (major.value, minor.value)
  runtime = _runtime_ffi_api_version()
  # XLA checks a handler's API version only when it starts the CPU backend,
  # where a mismatch fails the whole backend: so check it here first.
  if runtime is None:
    raise _Unavailable(
        f"cannot read the XLA FFI API version of jaxlib {jaxlib.__version__}")
  if built[0] != runtime[0] or built[1] > runtime[1]:
    raise _Unavailable(
        f"{path.name} was built for XLA FFI API {built[0]}.{built[1]}, and "
        f"jaxlib {jaxlib.__version__} accepts at most {runtime[0]}.{runtime[1]}")
  for target, handler in handlers.items():
    try:
      jax.ffi.register_ffi_target(
          target, jax.ffi.pycapsule(handler), platform="cpu")
    except Exception as e:
      raise _Unavailable(f"registering {target} with XLA failed: {e}") from e
  _library = lib


@functools.cache
def _registration_error() -> str | None:
  """Loads and registers the kernel once; why it failed, or None."""
  try:
    _load_and_register()
  except _Unavailable as e:
    return str(e)
  return None


def register() -> None:
  """Loads and registers the kernel, unless switched off (called at import)."""
  if not switched_off():
    _registration_error()


_warned = False


def _user_stacklevel() -> int:
  """The ``stacklevel`` that points a warning at the user's own line.

  The first frame outside lovasz_jax and JAX (which trace the loss) is the
  caller's: the line that called the loss, or jitted a function that does.
  """
  frame: types.FrameType | None = sys._getframe(1)  # pylint: disable=protected-access
  level = 1
  package = str(pathlib.Path(__file__).parent)
  jax_dir = str(pathlib.Path(jax.__file__).parent)
  while frame is not None:
    name = frame.f_code.co_filename
    if not name.startswith((package, jax_dir, "<frozen")):
      return level
    frame, level = frame.f_back, level + 1
  return 2


@functools.cache
def available() -> bool:
  """Whether the native CPU kernel is loaded, registered and not switched off.

  When it is missing or unusable (not when switched off), the first call with
  a CPU default backend warns once that the portable path is used, and why.
  """
  global _warned
  if switched_off():
    return False
  reason = _registration_error()
  if reason is None:
    return True
  if not _warned and jax.default_backend() == "cpu":
    _warned = True
    warnings.warn(
        f"lovasz_jax: the native CPU kernel is not available ({reason}). The "
        "losses use the portable XLA path, which gives the same values but is "
        "about 20x slower on CPU. Install a lovasz_jax wheel, or reinstall "
        "from source with a C++ compiler (setuptools uses $CXX).",
        RuntimeWarning, stacklevel=_user_stacklevel())
  return False


register()


def _need_kernel() -> None:
  if not available():
    raise RuntimeError("the lovasz_jax native CPU kernel is not available: "
                       f"{_registration_error() or 'switched off'}")


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
  _need_kernel()
  out_dtype = "float32" if keys.dtype.itemsize == 4 else "float64"
  call = jax.ffi.ffi_call(
      _TARGET,
      (jax.ShapeDtypeStruct(keys.shape, out_dtype),
       jax.ShapeDtypeStruct(keys.shape[:-1], out_dtype)),
      vmap_method="broadcast_all")
  w, losses = _varying_like(keys, *call(keys, num_bins=np.int64(0)))
  return w, losses


def histogram_counts(keys: jax.Array, num_bins: int) -> jax.Array:
  """Pixels per slot ``[..., 2K + 1]`` (int32) of ``encode_bins`` keys, on CPU."""
  _need_kernel()
  call = jax.ffi.ffi_call(
      _COUNTS_TARGET,
      jax.ShapeDtypeStruct(keys.shape[:-1] + (2 * num_bins + 1,), "int32"),
      vmap_method="broadcast_all")
  return _varying_like(keys, call(keys, num_bins=np.int64(num_bins)))[0]


def slot_weights(counts: jax.Array, num_bins: int,
                 dtype) -> tuple[jax.Array, jax.Array]:
  """``_extension.slot_weights`` on CPU: ``(omega [..., 2K + 1], losses [...])``."""
  _need_kernel()
  call = jax.ffi.ffi_call(
      _SLOTS_TARGET, (jax.ShapeDtypeStruct(counts.shape, dtype),
                      jax.ShapeDtypeStruct(counts.shape[:-1], dtype)),
      vmap_method="broadcast_all")
  omega, losses = _varying_like(counts, *call(counts, num_bins=np.int64(num_bins)))
  return omega, losses


def lookup(omega: jax.Array, keys: jax.Array) -> jax.Array:
  """``omega[..., keys]`` along the last axis (each pixel's slot weight), on CPU."""
  _need_kernel()
  call = jax.ffi.ffi_call(
      _LOOKUP_TARGET, jax.ShapeDtypeStruct(keys.shape, omega.dtype),
      vmap_method="broadcast_all")
  return _varying_like(keys, call(omega, keys))[0]


def encode_rows(x: jax.Array, labels: jax.Array, num_bins: int,
                softmax: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``_extension.encode_rows`` on CPU: ``[..., P, C]`` -> keys ``[..., C, P]``.

  Args:
    x: float32 or float64 ``[..., P, C]``: logits (``softmax``) or
      probabilities.
    labels: int32 ``[..., P]``, ``_extension.VOID_LABEL`` for void pixels
      (whose ``x`` is never used).
    num_bins: 0 (``encode_keys`` keys) or the histogram's bins.
    softmax: whether ``x`` are logits.

  Returns:
    The keys, the log-sum-exp ``[..., P]`` of the logits (0 if not
    ``softmax``), and int32 ``[..., P]``: 1 at valid pixels with a value out
    of its domain (a non-finite logit, or a probability outside [0, 1]).
  """
  shape = x.shape[:-2] + (x.shape[-1], x.shape[-2])
  key = "uint32" if x.dtype.itemsize == 4 else "uint64"
  return _encode_call(_ENCODE_TARGET, jax.ShapeDtypeStruct(shape, key), x, labels,
                      num_bins, softmax)


def _encode_call(target: str, first: jax.ShapeDtypeStruct, x: jax.Array,
                 labels: jax.Array, num_bins: int,
                 softmax: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """An encode pass: (``first``, log-sum-exp, out-of-range flags)."""
  _need_kernel()
  call = jax.ffi.ffi_call(
      target, (first, jax.ShapeDtypeStruct(x.shape[:-1], x.dtype),
               jax.ShapeDtypeStruct(x.shape[:-1], "int32")),
      vmap_method="broadcast_all")
  out, lse, bad = _varying_like(x, *call(x, labels, num_bins=np.int64(num_bins),
                                         softmax=np.int64(bool(softmax))))
  return out, lse, bad


def encode_counts(x: jax.Array, labels: jax.Array, num_bins: int,
                  softmax: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``encode_rows`` in histogram mode with each row's keys counted per slot
  (``[..., C, 2K + 1]``, int32) as they are computed, instead of stored;
  with the log-sum-exp and out-of-range flags of ``encode_rows``."""
  counts = jax.ShapeDtypeStruct(x.shape[:-2] + (x.shape[-1], 2 * num_bins + 1), "int32")
  return _encode_call(_ENCODE_COUNTS_TARGET, counts, x, labels, num_bins, softmax)


def class_counts(labels: jax.Array, num_classes: int) -> jax.Array:
  """Pixels per label in ``[0, num_classes)``: int32 labels ``[..., P]`` ->
  ``[..., num_classes]`` (int32; other labels are not counted)."""
  _need_kernel()
  call = jax.ffi.ffi_call(
      _CLASS_COUNTS_TARGET,
      jax.ShapeDtypeStruct(labels.shape[:-1] + (num_classes,), "int32"),
      vmap_method="broadcast_all")
  return _varying_like(labels, call(labels))[0]


def rows_grad(x: jax.Array, lse: jax.Array, labels: jax.Array, w: jax.Array,
              ct: jax.Array, softmax: bool) -> jax.Array:
  """``_extension.rows_grad`` on CPU: the gradient ``[..., P, C]``.

  ``lse`` is ``[..., P]`` (any values when not ``softmax``).
  """
  _need_kernel()
  call = jax.ffi.ffi_call(_GRAD_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype),
                          vmap_method="broadcast_all")
  return _varying_like(x, call(x, lse, labels, w, ct,
                               softmax=np.int64(bool(softmax))))[0]


def rows_grad_table(x: jax.Array, labels: jax.Array, omega: jax.Array,
                    ct: jax.Array, softmax: bool) -> jax.Array:
  """``rows_grad`` in histogram mode: each pixel's weight is ``omega[..., c,
  key]``, its key recomputed from ``x`` exactly as ``encode_rows`` (with
  ``num_bins = (omega.shape[-1] - 1) // 2``) computed it on CPU."""
  _need_kernel()
  call = jax.ffi.ffi_call(_GRAD_TABLE_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype),
                          vmap_method="broadcast_all")
  return _varying_like(x, call(x, labels, omega, ct,
                               softmax=np.int64(bool(softmax))))[0]
