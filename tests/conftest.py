import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
  """Runs a test in float64 (for tie-free gradient checks)."""
  with jax.enable_x64(True):
    yield
