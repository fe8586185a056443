"""IoUState: streaming exact counts, data-set and per-image mIoU.

Everything is checked against NumPy references written here: int64 counts
(np.bincount) and float64 scores.
"""

import functools
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lovasz_jax
from lovasz_jax import _streaming
from lovasz_jax import IoUState

VOID = 255


# NumPy references -------------------------------------------------------------

def _valid(labels, where, num_classes, ignore_index):
  valid = np.ones(labels.shape, bool) if where is None else np.asarray(where, bool)
  if ignore_index is not None:
    valid &= labels != ignore_index
  return valid & (labels >= 0) & (labels < num_classes)


def ref_confusion(preds, labels, num_classes, where=None, ignore_index=None):
  valid = _valid(labels, where, num_classes, ignore_index)
  index = labels[valid].astype(np.int64) * num_classes + preds[valid]
  return np.bincount(index, minlength=num_classes**2).astype(np.int64).reshape(
      num_classes, num_classes)


def ref_scores(cm):
  """float64 per-class IoU, mean IoU, pixel accuracy, mean class accuracy."""
  cm = cm.astype(np.float64)
  tp, rows, cols = np.diagonal(cm), cm.sum(1), cm.sum(0)
  union = rows + cols - tp
  iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
  miou = np.nanmean(iou) if (union > 0).any() else 0.0
  acc = tp.sum() / cm.sum() if cm.sum() else 0.0
  mca = np.mean(tp[rows > 0] / rows[rows > 0]) if (rows > 0).any() else 0.0
  return iou, miou, acc, mca


def ref_image_mious(preds, labels, num_classes, where=None, ignore_index=None):
  """float64 mIoU of each image with a valid pixel (images: axis 0)."""
  valid = _valid(labels, where, num_classes, ignore_index)
  out = []
  for p, y, v in zip(preds, labels, valid):
    p, y = p[v].astype(np.int64), y[v].astype(np.int64)
    if not y.size:
      continue
    tp = np.bincount(y[p == y], minlength=num_classes)
    union = (np.bincount(y, minlength=num_classes)
             + np.bincount(p, minlength=num_classes) - tp)
    out.append(np.mean(tp[union > 0] / union[union > 0]))
  return np.asarray(out, np.float64)


def _batch(rng, shape=(4, 8, 8), num_classes=6):
  """Labels with void pixels, an all-void image, absent classes; a mask."""
  labels = rng.integers(0, num_classes - 2, shape)  # the last 2 never labelled
  labels[rng.random(shape) < 0.15] = VOID
  labels[rng.integers(shape[0])] = VOID             # one image all void
  preds = rng.integers(0, num_classes - 1, shape)   # the last never predicted
  preds = np.where(rng.random(shape) < 0.6, np.where(labels == VOID, 0, labels), preds)
  where = rng.random(shape) < 0.9
  logits = rng.normal(size=shape + (num_classes,)).astype(np.float32)
  logits += 20 * np.eye(num_classes, dtype=np.float32)[preds]  # argmax = preds
  return labels.astype(np.int32), preds.astype(np.int32), where, logits


def _check_against_reference(state, cm, mious, rtol=1e-6):
  np.testing.assert_array_equal(state.confusion_matrix(), cm)
  assert state.confusion_matrix().dtype == np.int64
  iou, miou, acc, mca = ref_scores(cm)
  np.testing.assert_allclose(state.iou_per_class(), iou, rtol=rtol, atol=1e-7)
  assert abs(float(state.mean_iou()) - miou) <= 1e-6
  assert abs(float(state.pixel_accuracy()) - acc) <= 1e-6
  assert abs(float(state.mean_class_accuracy()) - mca) <= 1e-6
  assert int(state.num_images()) == len(mious)
  assert abs(float(state.per_image_miou()) - np.mean(mious)) <= 1e-6


# Exact counts -----------------------------------------------------------------

def test_fifty_random_batches_equal_numpy_int64_counts():
  rng = np.random.default_rng(0)
  num_classes = 6
  step_logits = jax.jit(functools.partial(IoUState.update, ignore_index=VOID))
  step_preds = jax.jit(lambda s, y, p, w: s.update(y, predictions=p, where=w,
                                                   ignore_index=VOID))
  state = IoUState.empty(num_classes)
  cm = np.zeros((num_classes, num_classes), np.int64)
  mious = []
  for i in range(50):
    labels, preds, where, logits = _batch(rng, num_classes=num_classes)
    if i % 2:
      state = step_preds(state, labels, preds, where)
    else:
      state = step_logits(state, labels, logits=logits, where=where)
    cm += ref_confusion(preds, labels, num_classes, where, VOID)
    mious.extend(ref_image_mious(preds, labels, num_classes, where, VOID))
  assert cm[:, -1].sum() == 0 and cm[-2:].sum() == 0  # absent classes
  assert np.isnan(state.iou_per_class()[-1])
  _check_against_reference(state, cm, np.asarray(mious))


def test_eager_jit_and_channels_first_give_the_same_state():
  rng = np.random.default_rng(1)
  labels, preds, where, logits = _batch(rng)
  eager = IoUState.empty(6).update(labels, logits=logits, where=where,
                                   ignore_index=VOID)
  jitted = jax.jit(lambda s, y, z, w: s.update(y, logits=z, where=w,
                                               ignore_index=VOID))(
      IoUState.empty(6), labels, logits, where)
  first = IoUState.empty(6).update(labels, logits=np.moveaxis(logits, -1, 1),
                                   axis=1, where=where, ignore_index=VOID)
  for other in (jitted, first):
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(other)):
      np.testing.assert_array_equal(a, b)
  _check_against_reference(eager, ref_confusion(preds, labels, 6, where, VOID),
                           ref_image_mious(preds, labels, 6, where, VOID))


def test_readers_under_jit_match_the_host_readers():
  rng = np.random.default_rng(2)
  labels, preds, where, _ = _batch(rng)
  state = IoUState.empty(6).update(labels, predictions=preds, where=where,
                                   ignore_index=VOID)
  traced = jax.jit(lambda s: (s.iou_per_class(), s.mean_iou(), s.pixel_accuracy(),
                              s.mean_class_accuracy(), s.per_image_miou(),
                              s.confusion_matrix(), s.num_images()))(state)
  host = (state.iou_per_class(), state.mean_iou(), state.pixel_accuracy(),
          state.mean_class_accuracy(), state.per_image_miou(),
          state.confusion_matrix(), state.num_images())
  for t, h in zip(traced, host):
    np.testing.assert_allclose(t, h, rtol=1e-6)
  empty = IoUState.empty(3)
  for reader in ("mean_iou", "pixel_accuracy", "mean_class_accuracy", "per_image_miou"):
    assert float(getattr(empty, reader)()) == 0.0
    assert float(jax.jit(lambda s, r=reader: getattr(s, r)())(empty)) == 0.0


def test_counts_past_2_to_the_32_are_exact_with_x64_off():
  assert not jax.config.jax_enable_x64
  # 16 images of 512x512 = 2**22 pixels per update, mostly class 0: its
  # count, 2**22 - 2215, is not a power of two, so doubling it by merges
  # leaves the low word just under 2**32, and the next real update carries.
  shape = (16, 512, 512)
  labels = np.zeros(shape, np.uint8)
  labels[:, 0, :128] = 1
  labels[3, 1, :100] = 2
  labels[0, 2, :3] = VOID
  preds = labels.copy()
  preds[:, 3, :4] = 1
  step = jax.jit(lambda s, y, p: s.update(y, predictions=p, ignore_index=VOID),
                 donate_argnums=0)
  one = ref_confusion(preds, labels, 3, ignore_index=VOID)
  mious = ref_image_mious(preds, labels, 3, ignore_index=VOID)
  state = step(IoUState.empty(3), labels, preds)
  cm, images, mious_all = one.copy(), 16, [mious]
  assert one[0, 0] == 2**22 - 2215
  for _ in range(10):       # real counts doubled: 2**10 * (2**22 - 2215) < 2**32
    state = state.merge(state)
    cm, images, mious_all = 2 * cm, 2 * images, mious_all * 2
  assert cm.max() < 2**32 < cm.max() + one.max()
  state = step(state, labels, preds)  # this update's add carries into the high word
  cm, images, mious_all = cm + one, images + 16, mious_all + [mious]
  assert cm.max() > 2**32
  state = state.merge(step(IoUState.empty(3), labels, preds)).merge(state)
  cm = 2 * cm + one
  images, mious_all = 2 * images + 16, mious_all * 2 + [mious]
  assert cm.max() > 2**33 and (state.confusion_words[0] > 0).any()
  _check_against_reference(state, cm, np.concatenate(mious_all))
  assert int(state.num_images()) == images


def test_x64_on_keeps_the_representation_and_reads_float64():
  rng = np.random.default_rng(7)
  labels, preds, where, logits = _batch(rng)
  with jax.enable_x64(False):
    off = IoUState.empty(6).update(labels, logits=logits, where=where,
                                   ignore_index=VOID)
  with jax.enable_x64(True):
    on = jax.jit(lambda s, y, z, w: s.update(y, logits=z, where=w, ignore_index=VOID))(
        IoUState.empty(6), labels, logits, where)
    for a, b in zip(jax.tree.leaves(off), jax.tree.leaves(on)):
      assert a.dtype == b.dtype == jnp.uint32
      np.testing.assert_array_equal(a, b)
    assert on.mean_iou().dtype == jnp.float64
    assert jax.jit(IoUState.per_image_miou)(on).dtype == jnp.float64
    _, miou, _, _ = ref_scores(ref_confusion(preds, labels, 6, where, VOID))
    assert abs(float(on.mean_iou()) - miou) <= 1e-12


# Transformations -------------------------------------------------------------

def test_lax_scan_and_donated_buffers():
  rng = np.random.default_rng(3)
  batches = [_batch(rng) for _ in range(5)]
  labels, preds, where, logits = (np.stack(x) for x in zip(*batches))

  @jax.jit
  def evaluate(state, labels, logits, where):
    def body(state, batch):
      y, z, w = batch
      return state.update(y, logits=z, where=w, ignore_index=VOID), None
    return lax.scan(body, state, (labels, logits, where))[0]

  scanned = evaluate(IoUState.empty(6), labels, logits, where)
  step = jax.jit(lambda s, y, z, w: s.update(y, logits=z, where=w, ignore_index=VOID),
                 donate_argnums=0)
  state = IoUState.empty(6)
  for y, _, w, z in batches:
    old = state
    state = step(state, y, z, w)
    assert old.confusion_words.is_deleted()  # the donated buffers were reused
  for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  cm = sum(ref_confusion(p, y, 6, w, VOID) for y, p, w, _ in batches)
  mious = np.concatenate([ref_image_mious(p, y, 6, w, VOID) for y, p, w, _ in batches])
  _check_against_reference(state, cm, mious)


def test_merge_is_exact_and_independent_of_order():
  rng = np.random.default_rng(4)
  batches = [_batch(rng) for _ in range(6)]
  states = [IoUState.empty(6).update(y, predictions=p, where=w, ignore_index=VOID)
            for y, p, w, _ in batches]
  forward = functools.reduce(IoUState.merge, states)
  backward = functools.reduce(IoUState.merge, states[::-1])
  tree = states[0].merge(states[1]).merge(states[2].merge(states[3])).merge(
      states[4].merge(states[5]))
  sequential = IoUState.empty(6)
  for y, p, w, _ in batches:
    sequential = sequential.update(y, predictions=p, where=w, ignore_index=VOID)
  for other in (backward, tree, sequential):
    for a, b in zip(jax.tree.leaves(forward), jax.tree.leaves(other)):
      np.testing.assert_array_equal(a, b)  # bit for bit, per-image sum included
  with pytest.raises(ValueError, match="cannot merge states of 6 and 5 classes"):
    forward.merge(IoUState.empty(5))
  with pytest.raises(TypeError, match="other must be a lovasz_jax.IoUState"):
    forward.merge(np.zeros((2, 6, 6)))


# Per-image mIoU ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["uniform", "constant"])
def test_fixed_point_sum_of_a_million_values_does_not_drift(kind):
  # 10**6 float32 values in [0, 1], added 1000 at a time: uniform ones, and
  # a constant, whose float32 running sum rounds the same way at every add.
  rng = np.random.default_rng(5)
  values = (rng.random(10**6) if kind == "uniform" else np.full(10**6, 0.7)
            ).astype(np.float32)

  @jax.jit
  def run(values):
    def body(words, chunk):
      return _streaming._add_words(
          words, _streaming.fixed_point_sum(chunk, jnp.ones(chunk.shape, bool))), None
    return lax.scan(body, jnp.zeros(2, jnp.uint32), values.reshape(1000, 1000))[0]

  exact = values.astype(np.float64).sum()
  total = float(_streaming._host_words(run(values))) / 2**24
  assert abs(total - exact) / 10**6 <= 1e-8, (total - exact) / 10**6
  if kind == "constant":  # a plain float32 running sum drifts far past 1e-6
    naive = np.cumsum(values, dtype=np.float32)[-1]
    assert abs(float(naive) - exact) / 10**6 > 1e-3, (float(naive) - exact) / 10**6


def test_per_image_miou_over_a_million_images_matches_float64():
  # 10**6 images of 2x3 pixels, 1000 per update, in one lax.scan; about 1%
  # of them all void (not counted).
  rng = np.random.default_rng(6)
  labels = rng.integers(0, 4, (1000, 1000, 2, 3)).astype(np.int8)
  labels[rng.random(labels.shape) < 0.1] = -1
  labels[rng.random(labels.shape[:2]) < 0.01] = -1
  preds = np.where(rng.random(labels.shape) < 0.5, np.maximum(labels, 0),
                   rng.integers(0, 4, labels.shape)).astype(np.int8)

  @jax.jit
  def evaluate(labels, preds):
    def body(state, batch):
      return state.update(batch[0], predictions=batch[1], ignore_index=-1), None
    return lax.scan(body, IoUState.empty(4), (labels, preds))[0]

  state = evaluate(labels, preds)
  flat_l, flat_p = labels.reshape(10**6, 6), preds.reshape(10**6, 6)
  # Vectorised float64 reference: per-image per-class counts by bincount.
  valid = flat_l >= 0
  img = np.broadcast_to(np.arange(10**6)[:, None], flat_l.shape)[valid]
  lab, pred = flat_l[valid].astype(np.int64), flat_p[valid].astype(np.int64)
  count = lambda cls, w=None: np.bincount(img * 4 + cls, weights=w, minlength=4 * 10**6
                                          ).reshape(10**6, 4)
  tp = count(lab, (lab == pred).astype(np.float64))
  union = count(lab) + count(pred) - tp
  present = union > 0
  per_image = np.where(present, tp / np.maximum(union, 1), 0).sum(1) / np.maximum(
      present.sum(1), 1)
  counted = present.any(1)
  assert 5_000 < (~counted).sum() < 20_000
  assert int(state.num_images()) == counted.sum()
  ref = per_image[counted].mean()
  assert abs(float(state.per_image_miou()) - ref) <= 1e-6, float(state.per_image_miou()) - ref
  np.testing.assert_array_equal(state.confusion_matrix(),
                                ref_confusion(flat_p, flat_l, 4, ignore_index=-1))


def test_per_image_miou_counts_classes_present_in_labels_or_predictions():
  labels = np.array([[0, 0, 1, 1], [2, 2, 2, VOID], [VOID] * 4, [1, 1, 1, 1]])
  preds = np.array([[0, 1, 1, 1], [2, 2, 0, 0], [0, 1, 2, 0], [1, 1, 1, 1]])
  state = IoUState.empty(4).update(labels, predictions=preds, ignore_index=VOID)
  # (1/2 + 2/3) / 2, (2/3 + 0) / 2, (no valid pixel: left out), 1 / 1
  expected = np.mean([7 / 12, 1 / 3, 1.0])
  assert int(state.num_images()) == 3
  assert abs(float(state.per_image_miou()) - expected) <= 1e-7
  np.testing.assert_allclose(ref_image_mious(preds, labels, 4, ignore_index=VOID),
                             [7 / 12, 1 / 3, 1.0])


# Bad input ------------------------------------------------------------------

Y = np.zeros((2, 4, 4), np.int32)
Z = np.zeros((2, 4, 4, 3), np.float32)


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(), TypeError, r"exactly one of predictions= .* and logits= .*got neither"),
    (dict(predictions=Y, logits=Z), TypeError, r"exactly one .*got both"),
    (dict(labels=Y.astype(np.float32), predictions=Y), TypeError,
     r"labels must be an integer array, got dtype float32"),
    (dict(predictions=Y.astype(np.float32)), TypeError,
     r"predictions must be an integer array, got dtype float32"),
    (dict(logits=Z.astype(np.int32)), TypeError,
     r"logits must be a floating-point array, got dtype int32"),
    (dict(predictions=Y[:, :3]), ValueError,
     r"predictions and labels must have the same shape, got predictions \(2, 3, 4\) "
     r"and labels \(2, 4, 4\)"),
    (dict(predictions=Z.astype(np.int32)), ValueError, r"same shape.*Pass scores as logits="),
    (dict(logits=Z[..., :2]), ValueError,
     r"logits have 2 classes along axis=3 \(shape \(2, 4, 4, 2\)\), but the state has "
     r"num_classes=3"),
    (dict(logits=np.zeros((2, 4, 5, 3), np.float32)), ValueError,
     r"labels must have the shape of logits \(2, 4, 5, 3\) without the class axis "
     r"\(axis=3\), i.e. \(2, 4, 5\); got labels \(2, 4, 4\)"),
    (dict(logits=Z, axis=4), ValueError, r"axis=4 is out of range"),
    (dict(labels=np.int32(0), predictions=np.int32(0)), ValueError,
     r"leading image axis"),
    (dict(predictions=Y, where=np.ones((2, 4), bool)), ValueError,
     r"where must have the shape of labels \(2, 4, 4\), got \(2, 4\)"),
    (dict(predictions=Y, where=np.ones((2, 4, 4), np.int32)), TypeError,
     r"where must be a boolean array, got dtype int32"),
    (dict(predictions=Y, ignore_index=2.5), TypeError,
     r"ignore_index must be an int or None, got 2.5"),
    (dict(predictions=Y, axis_name="data"), ValueError,
     r"axis_name='data': axis 'data' is not bound here"),
    (dict(labels=np.full((2, 4, 4), 7), predictions=Y), ValueError,
     r"labels hold values outside \[0, 3\) for num_classes=3: 7"),
    (dict(predictions=np.full((2, 4, 4), -1)), ValueError,
     r"predictions hold values outside \[0, 3\) for num_classes=3: -1"),
])
def test_bad_input_raises_naming_the_value(kwargs, error, pattern):
  kwargs = dict(kwargs)
  labels = kwargs.pop("labels", Y)
  with pytest.raises(error, match=pattern):
    IoUState.empty(3).update(labels, **kwargs)


def test_bad_state_and_num_classes():
  with pytest.raises(TypeError, match="state must be a lovasz_jax.IoUState"):
    IoUState.update(np.zeros((2, 3, 3), np.uint32), Y, predictions=Y)
  with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
    IoUState.empty(0)
  with pytest.raises(TypeError, match="num_classes must be a positive int, got True"):
    IoUState.empty(True)
  with pytest.raises(ValueError, match="at most 2\\*\\*31 - 1 pixels"):
    jax.eval_shape(lambda y: IoUState.empty(3).update(y, predictions=y),
                   jax.ShapeDtypeStruct((2**16, 2**15), jnp.int8))


def test_out_of_range_ids_under_jit_are_not_counted():
  # Eager calls raise (test above); under jit the check cannot run, and such
  # pixels count nowhere, as void pixels do.
  labels = np.array([[0, 1, 7, 1]], np.int32)
  preds = np.array([[0, 1, 1, -3]], np.int32)
  state = jax.jit(lambda s, y, p: s.update(y, predictions=p))(IoUState.empty(3),
                                                              labels, preds)
  np.testing.assert_array_equal(state.confusion_matrix(),
                                [[1, 0, 0], [0, 1, 0], [0, 0, 0]])
  assert float(state.per_image_miou()) == 1.0


# Documentation -----------------------------------------------------------------

DOCS = pathlib.Path(__file__).parent.parent / "docs" / "streaming_metrics.md"


def test_docs_python_blocks_run(capsys):
  if not DOCS.exists():  # a copy of tests/ outside the source tree (make check-wheel)
    pytest.skip("docs/ is not next to tests/")
  blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"),
                      re.DOTALL)
  assert len(blocks) >= 4
  for block in blocks:
    if "flax" in block:
      pytest.importorskip("flax")
    exec(compile(block, str(DOCS), "exec"), {})  # pylint: disable=exec-used
  assert "per-image mIoU" in capsys.readouterr().out


# Sharded updates (8 host devices, in a subprocess) ---------------------------

CASES = ["explicit", "auto", "auto_set_mesh", "shard_map", "explicit_split_images",
         "shard_map_split_images", "nnx_explicit", "nnx_auto"]


@pytest.fixture(scope="module")
def sharded():
  root = pathlib.Path(__file__).parent.parent
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-m", "tests.streaming_sharded_check"],
                        cwd=root, env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_sharded_update_equals_one_device(sharded, case):
  assert sharded["devices"] == 8
  if case.startswith("nnx"):
    pytest.importorskip("flax")
  r = sharded[case]
  if "error" in r:
    pytest.fail(r["error"])
  # Exact words (the per-image sum too: fixed point is associative).
  assert r["sharded"] == r["single"]
  assert r["batch_sharded"]
