"""Builds lovasz_jax's native CPU kernel; the metadata is in pyproject.toml.

The kernel is one C++ file, ``lovasz_jax/_cpu_kernel.cc``, compiled against
the XLA FFI headers that jaxlib ships (``jax.ffi.include_dir()``, which is
``<jaxlib>/include``). One source file with no dependencies of its own needs
no CMake: a setuptools ``Extension`` compiles it with the platform's compiler.

It is a plain shared library, not a Python module: lovasz_jax loads it with
ctypes and registers its handler with XLA. It is built as an *optional*
extension, so a source install without a C++ compiler still succeeds, and
lovasz_jax then uses its portable XLA path on CPU and says so.

On Linux with glibc the library is linked so that a wheel built here runs
on older systems too (the ``manylinux_2_27`` policy of jaxlib's own wheels):
libstdc++ is linked statically (its symbols kept private), libgcc_s stays a
system library, and on x86-64 ``_glibc_compat.cc`` keeps the two glibc
symbols that a new toolchain would otherwise require (GLIBC_2.32 and 2.34)
at their old versions. If that link fails (no static libstdc++ installed),
the kernel is built the plain way instead, for this machine only.

``pyproject.toml`` pins the build's jaxlib to the lowest supported one: XLA
accepts handlers built against its own FFI API version or an older one, so a
kernel built against the oldest supported headers loads on every supported
jaxlib.
"""

import importlib.util
import os
import platform
import sys

from setuptools import Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError
from setuptools.errors import LinkError

_COMPAT_SOURCE = "lovasz_jax/_glibc_compat.cc"


def _ffi_include_dir() -> str:
  """``<jaxlib>/include``, found without importing jaxlib."""
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    raise CompileError(
        "jaxlib is not installed in the build environment, so the XLA FFI "
        "headers are missing (pyproject.toml lists it in [build-system])")
  for location in spec.submodule_search_locations:
    include = os.path.join(location, "include")
    if os.path.isfile(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
      return include
  raise CompileError(f"jaxlib at {spec.origin} has no XLA FFI headers")


def _portable_linux_build() -> bool:
  """Linux with glibc: link for old systems (see the module docstring)."""
  return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


class BuildKernel(build_ext):
  """build_ext with the kernel's flags for the compiler at hand."""

  def build_extension(self, ext):
    include = _ffi_include_dir()
    if self.compiler.compiler_type == "msvc":
      ext.include_dirs = [include]
      ext.extra_compile_args = ["/O2", "/std:c++17", "/EHsc"]
      super().build_extension(ext)
      return
    # -isystem: the headers' own warnings are not ours; -g0: no debug info
    # in the shipped library (Python's own flags may ask for -g);
    # -fno-trapping-math: the kernel never reads floating-point exception
    # flags, and without it GCC keeps the float comparisons of the loops
    # over pixels as branches, so that they do not vectorise.
    compile_args = ["-O3", "-g0", "-std=c++17", "-fno-trapping-math", "-pthread",
                    "-isystem", include]
    sources = list(ext.sources)
    if _portable_linux_build():
      ext.extra_compile_args = compile_args + [
          "-ffunction-sections", "-fdata-sections"]
      # libstdc++ statically, libgcc_s dynamically (a static libgcc brings
      # an unwinder that needs GLIBC_2.35); the static archives' symbols stay
      # private (--exclude-libs) and unused sections are dropped.
      ext.extra_link_args = [
          "-pthread", "-static-libstdc++", "-Wl,--exclude-libs,ALL",
          "-Wl,--gc-sections"]
      if platform.machine() in ("x86_64", "AMD64"):
        ext.sources = sources + [_COMPAT_SOURCE]
        ext.extra_link_args.append("-Wl,--wrap=pthread_once")
      try:
        super().build_extension(ext)
        return
      except (CompileError, LinkError) as error:
        print(f"lovasz_jax: the portable link of the kernel failed ({error}); "
              "building it for this machine only", file=sys.stderr)
        ext.sources = sources
    ext.extra_compile_args = compile_args
    ext.extra_link_args = ["-pthread"]
    super().build_extension(ext)

  def get_export_symbols(self, ext):
    # Not a Python module: there is no PyInit_ function to export.
    return ext.export_symbols


setup(
    ext_modules=[
        Extension(
            "lovasz_jax._cpu_kernel",
            sources=["lovasz_jax/_cpu_kernel.cc"],
            language="c++",
            optional=True,
            # The library uses no Python API, so one build serves every
            # Python version (an abi3 wheel).
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": BuildKernel},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
