"""The value checks that run when an array spans several processes.

In a multi-process run no process can read such an array whole, so the
eager checks reduce the bad values to a few scalars inside a small program
that every process runs, and every process raises the same ValueError.
`make check-multihost` runs them on two real processes; here the branch is
forced in one process (``spans_processes`` patched to True) so that its
messages and verdicts are checked on every run of `make test`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lovasz_jax
from lovasz_jax import _inputs


@pytest.fixture
def spanning(monkeypatch):
  """Every concrete array is treated as one that spans processes."""
  monkeypatch.setattr(_inputs, "spans_processes", lambda *xs: True)


def test_labels_out_of_range_name_count_and_range(spanning):
  logits = jnp.zeros((2, 4, 4, 3))
  labels = np.zeros((2, 4, 4), np.int32)
  labels[0, 0, :3] = [7, 9, -2]
  labels[1, 3, 3] = 255                     # void: not reported
  with pytest.raises(ValueError, match=r"outside \[0, 3\).*3 entries \(values from -2 to 9"):
    lovasz_jax.lovasz_softmax(logits, labels, ignore_index=255)
  # The same labels with the bad ones masked out pass.
  where = labels >= 0
  where[0, 0, :3] = False
  assert np.isfinite(float(lovasz_jax.lovasz_softmax(logits, labels, where=where,
                                                     ignore_index=255)))


def test_one_bad_label_is_named(spanning):
  labels = np.ones((1, 3, 3), np.int32)
  labels[0, 1, 1] = 2
  with pytest.raises(ValueError, match=r"labels must be 0 or 1.*1 entries \(2;"):
    lovasz_jax.lovasz_hinge(jnp.zeros((1, 3, 3)), labels)


def test_probabilities_report_nan_and_range(spanning):
  probs = np.full((1, 2, 2, 2), 0.5, np.float32)
  probs[0, 0, 0, 0] = 1.5
  probs[0, 1, 1, 1] = np.nan
  with pytest.raises(ValueError, match=r"2 entries \(1\.5, 1 NaN"):
    lovasz_jax.lovasz_softmax(probs, np.zeros((1, 2, 2), np.int32), from_logits=False)


def test_predictions_and_labels_of_the_metric(spanning):
  preds = np.array([[0, 1, 5, -3]])
  labels = np.array([[0, 1, 1, 255]])
  with pytest.raises(ValueError, match=r"predictions hold .*1 entries \(5;"):
    lovasz_jax.confusion_matrix(preds, labels, 2, ignore_index=255)
  with pytest.raises(ValueError, match=r"labels hold .*1 entries \(4;"):
    lovasz_jax.confusion_matrix(np.array([[0, 1]]), np.array([[4, 1]]), 2)


def test_small_arrays_are_gathered_and_checked_as_with_one_process(spanning):
  with pytest.raises(ValueError, match=r"confusion\[1, 0\] = -7"):
    lovasz_jax.mean_iou(np.array([[3, 0], [-7, 2]]))
  with pytest.raises(ValueError, match="class_weights must be finite"):
    lovasz_jax.lovasz_softmax(jnp.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2), np.int32),
                              class_weights=jnp.array([1.0, -1.0]))


def test_good_input_passes_the_global_checks(spanning):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 5, 4)).astype(np.float32)
  labels = rng.integers(0, 4, (2, 5, 5))
  want = float(jax.jit(lovasz_jax.lovasz_softmax)(logits, labels))
  assert float(lovasz_jax.lovasz_softmax(logits, labels)) == pytest.approx(want, rel=1e-6)
  cm = lovasz_jax.confusion_matrix(labels, labels, 4)
  assert int(np.trace(np.asarray(cm))) == labels.size


def test_image_axis_name_must_be_among_axis_name():
  mesh = jax.make_mesh((1, 1), ("data", "space"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  x, y = jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2), jnp.int32)

  def run(**kwargs):
    return jax.shard_map(
        functools.partial(lovasz_jax.lovasz_softmax, per_image=True, **kwargs),
        mesh=mesh, in_specs=(jax.P(),) * 2, out_specs=jax.P())(x, y)

  with pytest.raises(ValueError, match="image_axis_name='space' must name mesh axes among"):
    run(image_axis_name="space")
  with pytest.raises(ValueError, match=r"among axis_name=\('data',\)"):
    run(axis_name="data", image_axis_name="space")
  assert float(run(axis_name=("data", "space"), image_axis_name="space")) == pytest.approx(
      float(lovasz_jax.lovasz_softmax(x, y, per_image=True)))
