import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from lovasz_jax import _cpu, _order

jax.config.update("jax_numpy_rank_promotion", "raise")

# The two paths that compute every loss: the native CPU kernel, and the
# portable XLA path that GPU and TPU run (its default variant, "sort2").
# Tests that use the `path` fixture (directly, or with
# `pytestmark = pytest.mark.usefixtures("path")`) run once on each.
PATHS = ["native", "portable"]


@pytest.fixture(params=PATHS)
def path(request):
  """Runs a test on the native kernel and on the portable path."""
  if request.param == "native" and not _cpu.available():
    pytest.skip("native CPU kernel not built")
  with _order.use_path("native" if request.param == "native" else "sort2"):
    yield request.param


@pytest.fixture
def x64():
  """Runs a test in float64 (for tie-free gradient checks)."""
  with jax.enable_x64(True):
    yield


def _run_on_8_devices(module):
  """``python -m module --path P`` on 8 host devices, for both paths at once.

  Each path runs in its own process (the device-count flag must be set
  before JAX starts); the JSON they print is keyed by path.
  """
  root = pathlib.Path(__file__).parent.parent
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  env.pop("LOVASZ_JAX_CPU_KERNEL", None)
  paths = [p for p in PATHS if p != "native" or _cpu.available()]
  procs = {p: subprocess.Popen([sys.executable, "-m", module, "--path", p],
                               cwd=root, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for p in paths}
  out = {}
  for p, proc in procs.items():
    # A timeout, not a hang: a callback-based kernel was once seen to
    # deadlock under a multi-device jit; the native kernel must not.
    stdout, stderr = proc.communicate(timeout=1200)
    assert proc.returncode == 0, stderr[-3000:]
    out[p] = json.loads(stdout.strip().splitlines()[-1])
  return out


@pytest.fixture(scope="session")
def sharded_results():
  """tests/sharded_check.py on 8 host devices, on both paths, side by side."""
  return _run_on_8_devices("tests.sharded_check")


@pytest.fixture(scope="session")
def layout_results():
  """tests/layout_check.py on 8 host devices, on both paths, side by side."""
  return _run_on_8_devices("tests.layout_check")
