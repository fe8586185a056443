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
