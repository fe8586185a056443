"""Builds lovasz_jax's native CPU kernel; the metadata is in pyproject.toml.

The kernel is one C++ file, ``lovasz_jax/_cpu_kernel.cc``, compiled against
the XLA FFI headers that jaxlib ships (``jax.ffi.include_dir()``, which is
``<jaxlib>/include``). One source file with no dependencies of its own needs
no CMake: a setuptools ``Extension`` compiles it with the platform's compiler.

It is a plain shared library, not a Python module: lovasz_jax loads it with
ctypes and registers its handler with XLA. It is built as an *optional*
extension, so a source install without a C++ compiler still succeeds, and
lovasz_jax then uses its portable XLA path on CPU and says so.

``pyproject.toml`` pins the build's jaxlib to the lowest supported one: XLA
accepts handlers built against its own FFI API version or an older one, so a
kernel built against the oldest supported headers loads on every supported
jaxlib.
"""

import importlib.util
import os

from setuptools import Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError


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


class BuildKernel(build_ext):
  """build_ext with the kernel's flags for the compiler at hand."""

  def build_extension(self, ext):
    include = _ffi_include_dir()
    if self.compiler.compiler_type == "msvc":
      ext.include_dirs = [include]
      ext.extra_compile_args = ["/O2", "/std:c++17", "/EHsc"]
    else:
      # -isystem: the headers' own warnings are not ours; -g0: no debug info
      # in the shipped library (Python's own flags may ask for -g).
      ext.extra_compile_args = ["-O3", "-g0", "-std=c++17", "-pthread",
                                "-isystem", include]
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
