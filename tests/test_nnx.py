"""lovasz_jax.nnx.MeanIoU: a Flax NNX metric, inside nnx.jit and MultiMetric."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lovasz_jax
from tests.test_streaming import VOID
from tests.test_streaming import _batch
from tests.test_streaming import ref_confusion
from tests.test_streaming import ref_image_mious
from tests.test_streaming import ref_scores

nnx = pytest.importorskip("flax.nnx")
import lovasz_jax.nnx  # pylint: disable=wrong-import-position  # noqa: E402


def test_import_lovasz_jax_does_not_import_flax():
  code = ("import sys, lovasz_jax; lovasz_jax.IoUState.empty(2); "
          "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'flax' "
          "or m == 'lovasz_jax.nnx'); assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_is_an_nnx_metric():
  metric = lovasz_jax.nnx.MeanIoU(21)
  assert isinstance(metric, nnx.metrics.Metric)
  states = jax.tree.leaves(nnx.state(metric, nnx.metrics.MetricState))
  assert [x.dtype for x in states] == [jnp.uint32] * 3


def test_multimetric_with_average_inside_nnx_jit():
  rng = np.random.default_rng(0)
  metrics = nnx.MultiMetric(loss=nnx.metrics.Average("loss"),
                            miou=lovasz_jax.nnx.MeanIoU(6, ignore_index=VOID))

  @nnx.jit
  def eval_step(metrics, logits, labels, where, loss, loss_mask):
    # mask= is flax's Average's (a mask of the loss values); the pixel mask
    # is where=, which Average does not read.
    metrics.update(loss=loss, mask=loss_mask, logits=logits, labels=labels,
                   where=where)

  cm = np.zeros((6, 6), np.int64)
  mious, losses = [], []
  for _ in range(8):
    labels, preds, where, logits = _batch(rng)
    loss = rng.random(3).astype(np.float32)
    loss_mask = np.array([True, False, True])
    eval_step(metrics, logits, labels, where, loss, loss_mask)
    cm += ref_confusion(preds, labels, 6, where, VOID)
    mious.extend(ref_image_mious(preds, labels, 6, where, VOID))
    losses.extend(loss[loss_mask])
  out = metrics.compute()
  iou, miou, _, _ = ref_scores(cm)
  assert abs(float(out["miou"]) - miou) <= 1e-6
  assert abs(float(out["loss"]) - np.mean(losses)) <= 1e-6  # not pixel-weighted
  np.testing.assert_allclose(metrics.miou.iou_per_class(), iou, rtol=1e-6)
  assert abs(float(metrics.miou.per_image_miou()) - np.mean(mious)) <= 1e-6
  np.testing.assert_array_equal(metrics.miou.state.confusion_matrix(), cm)
  metrics.reset()
  assert float(metrics.compute()["miou"]) == 0.0
  assert int(metrics.miou.state.confusion_matrix().sum()) == 0


def test_equals_the_functional_state_and_takes_predictions_and_channels_first():
  rng = np.random.default_rng(1)
  labels, preds, where, logits = _batch(rng)
  first = lovasz_jax.nnx.MeanIoU(6, ignore_index=VOID, axis=1)
  first.update(labels=labels, logits=np.moveaxis(logits, -1, 1), where=where)
  ids = lovasz_jax.nnx.MeanIoU(6, ignore_index=VOID)
  ids.update(labels=labels, predictions=preds, where=where, values=1.0)
  state = lovasz_jax.IoUState.empty(6).update(labels, predictions=preds, where=where,
                                              ignore_index=VOID)
  for metric in (first, ids):
    for a, b in zip(jax.tree.leaves(metric.state), jax.tree.leaves(state)):
      np.testing.assert_array_equal(a, b)
    assert float(metric.compute()) == float(state.mean_iou())


def test_bad_input():
  metric = lovasz_jax.nnx.MeanIoU(3)
  y = np.zeros((2, 4), np.int32)
  with pytest.raises(TypeError, match="exactly one of predictions= .*got neither"):
    metric.update(labels=y)
  with pytest.raises(TypeError, match="exactly one .*got both"):
    metric.update(labels=y, predictions=y, logits=np.zeros((2, 4, 3), np.float32))
  with pytest.raises(TypeError, match="labels must be an integer array, got dtype float32"):
    metric.update(labels=y.astype(np.float32), predictions=y)
  with pytest.raises(ValueError, match=r"logits have 2 classes along axis=2"):
    metric.update(labels=y, logits=np.zeros((2, 4, 2), np.float32))
  with pytest.raises(TypeError, match="axis must be an int, got 'x'"):
    lovasz_jax.nnx.MeanIoU(3, axis="x")
  with pytest.raises(TypeError, match="ignore_index must be an int or None, got 1.5"):
    lovasz_jax.nnx.MeanIoU(3, ignore_index=1.5)
  with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
    lovasz_jax.nnx.MeanIoU(0)
  assert int(metric.state.confusion_matrix().sum()) == 0  # nothing was counted
