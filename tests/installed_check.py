"""Checks an installed lovasz_jax (``make check-wheel``, ``check-floor``, ...).

Run as ``python -m tests.installed_check [--jax VERSION] [--expect-no-kernel]``
from a directory outside the source tree. Exits non-zero, saying why, unless:
- lovasz_jax is imported from site-packages, not from a source tree;
- jax is the expected version (with ``--jax``);
- the native CPU kernel shipped in the wheel is loaded and registered, and
  the lowered CPU loss programs call it (custom call ``lovasz_jax_weights``);
  or, with ``--expect-no-kernel`` (a source install without a C++ compiler),
  there is no kernel, the programs do not call it, and the first CPU use
  warned exactly once, saying why;
- and the loss has the value of the portable path (``LOVASZ_JAX_CPU_KERNEL=0``
  in another process).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import sysconfig
import warnings

TARGET = "lovasz_jax_weights"

PORTABLE = """
import jax, lovasz_jax
logits = jax.random.normal(jax.random.key(0), (2, 16, 16, 5))
labels = jax.random.randint(jax.random.key(1), (2, 16, 16), 0, 5)
print(float(jax.jit(lovasz_jax.lovasz_softmax)(logits, labels)))
"""


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--jax", help="the jax version that must be installed")
  parser.add_argument("--expect-no-kernel", action="store_true",
                      help="the install has no native kernel (no compiler)")
  args = parser.parse_args(argv)
  expect_kernel = not args.expect_no_kernel

  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel

  import lovasz_jax  # pylint: disable=import-outside-toplevel
  from lovasz_jax import _cpu  # pylint: disable=import-outside-toplevel

  failures = []
  package = pathlib.Path(lovasz_jax.__file__).resolve().parent
  site = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
  if site not in package.parents:
    failures.append(f"lovasz_jax was imported from {package}, not from {site}")
  if args.jax and jax.__version__ != args.jax:
    failures.append(f"jax is {jax.__version__}, expected {args.jax}")

  logits = jax.random.normal(jax.random.key(0), (2, 16, 16, 5))
  labels = jax.random.randint(jax.random.key(1), (2, 16, 16), 0, 5)
  binary = (labels == 1).astype(int)
  programs = {
      "lovasz_softmax": (lovasz_jax.lovasz_softmax, logits, labels),
      "lovasz_sigmoid": (lovasz_jax.lovasz_sigmoid, logits[..., 0], binary),
      "lovasz_hinge": (lovasz_jax.lovasz_hinge, logits[..., 0], binary),
  }
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for name, (fn, x, y) in programs.items():
      text = jax.jit(jax.value_and_grad(fn)).lower(x, y).as_text()
      if (TARGET in text) != expect_kernel:
        failures.append(f"the lowered CPU program of {name} "
                        f"{'does not call' if expect_kernel else 'calls'} {TARGET}")
  messages = [str(w.message) for w in caught]

  reason = _cpu._registration_error()  # pylint: disable=protected-access
  if expect_kernel:
    if not _cpu.available():
      failures.append(f"the native CPU kernel is not available: {reason}")
    if messages:
      failures.append(f"unexpected warnings: {messages}")
  else:
    if _cpu.library_path() is not None or _cpu.available():
      failures.append(f"a kernel was installed: {_cpu.library_path()}")
    kernel_warnings = [m for m in messages if "native CPU kernel" in m]
    if len(kernel_warnings) != 1 or "C++ compiler" not in kernel_warnings[0]:
      failures.append(f"expected one warning naming the missing compiler, got "
                      f"{messages}")
    else:
      print(f"warned once: {kernel_warnings[0]}")

  loss = float(jax.jit(lovasz_jax.lovasz_softmax)(logits, labels))
  env = dict(os.environ, LOVASZ_JAX_CPU_KERNEL="0")
  proc = subprocess.run([sys.executable, "-c", PORTABLE], env=env, text=True,
                        capture_output=True, check=False)
  if proc.returncode != 0:
    failures.append(f"the portable path failed:\n{proc.stderr[-2000:]}")
  elif abs(float(proc.stdout) - loss) > 1e-6:
    failures.append(f"loss {loss} != portable loss {proc.stdout.strip()}")

  print(f"lovasz_jax {lovasz_jax.__version__} from {package}; jax {jax.__version__}, "
        f"jaxlib {jaxlib.__version__}; kernel {_cpu.library_path()}")
  for failure in failures:
    print(f"FAILED: {failure}", file=sys.stderr)
  if not failures:
    what = (f"the wheel's kernel is registered and the lowered CPU programs call "
            f"{TARGET}" if expect_kernel else "no kernel, portable path")
    print(f"OK: {what}; the loss {loss:.6f} matches the portable path")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
