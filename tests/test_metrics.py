"""confusion_matrix, iou_per_class and mean_iou against a NumPy reference."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lovasz_jax


# An independent NumPy reference: explicit loops, no shared code.
def ref_confusion(preds, labels, num_classes, ignore_index=None, where=None):
  preds, labels = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
  mask = (np.ones(labels.shape, bool) if where is None
          else np.asarray(where).reshape(-1))
  cm = np.zeros((num_classes, num_classes), np.int64)
  for p, t, m in zip(preds, labels, mask):
    if not m or (ignore_index is not None and t == ignore_index):
      continue
    cm[t, p] += 1
  return cm


def ref_iou(cm):
  cm = np.asarray(cm, np.float64)
  out = []
  for c in range(cm.shape[0]):
    tp = cm[c, c]
    fn = cm[c].sum() - tp
    fp = cm[:, c].sum() - tp
    out.append(np.nan if tp + fp + fn == 0 else tp / (tp + fp + fn))
  return np.array(out)


def ref_mean_iou(cm):
  iou = ref_iou(cm)
  iou = iou[~np.isnan(iou)]
  return float(iou.mean()) if iou.size else 0.0


def random_case(seed, shape, num_classes, void_frac=0.0, void=255):
  rng = np.random.default_rng(seed)
  # Skewed class frequencies, so that some classes are often absent.
  p = rng.dirichlet(np.full(num_classes, 0.5))
  labels = rng.choice(num_classes, size=shape, p=p).astype(np.int32)
  preds = np.where(rng.random(shape) < 0.6, labels,
                   rng.choice(num_classes, size=shape, p=p)).astype(np.int32)
  if void_frac:
    labels = np.where(rng.random(shape) < void_frac, void, labels).astype(np.int32)
  return preds, labels


@pytest.mark.parametrize("seed, shape, num_classes", [
    (0, (2, 8, 8), 3),
    (1, (4, 5, 7), 6),
    (2, (37,), 2),
    (3, (1, 16, 16), 1),
    (4, (3, 4, 4, 4), 10),
])
def test_matches_reference(seed, shape, num_classes):
  preds, labels = random_case(seed, shape, num_classes)
  cm = lovasz_jax.confusion_matrix(preds, labels, num_classes)
  assert cm.dtype == jnp.int32 and cm.shape == (num_classes, num_classes)
  expected = ref_confusion(preds, labels, num_classes)
  np.testing.assert_array_equal(cm, expected)
  assert int(cm.sum()) == labels.size
  np.testing.assert_allclose(lovasz_jax.iou_per_class(cm), ref_iou(expected),
                             rtol=1e-6)
  np.testing.assert_allclose(lovasz_jax.mean_iou(cm), ref_mean_iou(expected),
                             rtol=1e-6)


@st.composite
def problems(draw):
  seed = draw(st.integers(0, 2**31))
  ndim = draw(st.integers(1, 3))
  shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
  num_classes = draw(st.integers(1, 5))
  void_frac = draw(st.sampled_from([0.0, 0.3]))
  use_where = draw(st.booleans())
  return seed, shape, num_classes, void_frac, use_where


@settings(max_examples=20, deadline=None)
@given(problems())
def test_matches_reference_property(problem):
  seed, shape, num_classes, void_frac, use_where = problem
  preds, labels = random_case(seed, shape, num_classes, void_frac, void=-1)
  where = np.random.default_rng(seed + 1).random(shape) < 0.7 if use_where else None
  ignore = -1 if void_frac else None
  cm = lovasz_jax.confusion_matrix(preds, labels, num_classes,
                                   ignore_index=ignore, where=where)
  expected = ref_confusion(preds, labels, num_classes, ignore, where)
  np.testing.assert_array_equal(cm, expected)
  np.testing.assert_allclose(lovasz_jax.iou_per_class(cm), ref_iou(expected),
                             rtol=1e-6)
  np.testing.assert_allclose(lovasz_jax.mean_iou(cm), ref_mean_iou(expected),
                             rtol=1e-6)


def test_ignore_index_and_where():
  preds, labels = random_case(5, (4, 9, 9), 4, void_frac=0.25)
  where = np.random.default_rng(6).random(labels.shape) < 0.5
  cm_void = lovasz_jax.confusion_matrix(preds, labels, 4, ignore_index=255)
  np.testing.assert_array_equal(cm_void, ref_confusion(preds, labels, 4, 255))
  assert int(cm_void.sum()) == int((labels != 255).sum())
  cm_both = lovasz_jax.confusion_matrix(preds, labels, 4, ignore_index=255,
                                        where=where)
  np.testing.assert_array_equal(cm_both,
                                ref_confusion(preds, labels, 4, 255, where))
  assert int(cm_both.sum()) == int(((labels != 255) & where).sum())
  # An ignore_index inside [0, C): those labels are void, predictions of that
  # id still count (as false positives of the class).
  labels_in = np.where(labels == 255, 3, labels)
  preds_in = preds.copy()
  preds_in[tuple(np.argwhere(labels_in != 3)[0])] = 3
  cm_in = lovasz_jax.confusion_matrix(preds_in, labels_in, 4, ignore_index=3)
  np.testing.assert_array_equal(cm_in, ref_confusion(preds_in, labels_in, 4, 3))
  assert int(cm_in[3].sum()) == 0 and int(cm_in[:, 3].sum()) > 0
  # where alone, on in-range labels.
  clean = np.where(labels == 255, 0, labels)
  cm_where = lovasz_jax.confusion_matrix(preds, clean, 4, where=where)
  np.testing.assert_array_equal(cm_where,
                                ref_confusion(preds, clean, 4, None, where))


def test_void_pixels_may_hold_any_prediction():
  labels = np.array([0, 1, 255, 255])
  preds = np.array([0, 1, 7, -3])  # out of range, but only on void pixels
  cm = lovasz_jax.confusion_matrix(preds, labels, 2, ignore_index=255)
  np.testing.assert_array_equal(cm, [[1, 0], [0, 1]])
  where = np.array([True, True, False, False])
  cm = lovasz_jax.confusion_matrix(preds, np.array([0, 1, 9, 9]), 2, where=where)
  np.testing.assert_array_equal(cm, [[1, 0], [0, 1]])


def test_batches_add_up():
  preds, labels = random_case(7, (6, 8, 8), 5, void_frac=0.1)
  whole = lovasz_jax.confusion_matrix(preds, labels, 5, ignore_index=255)
  parts = sum(lovasz_jax.confusion_matrix(preds[i:i + 2], labels[i:i + 2], 5,
                                          ignore_index=255)
              for i in range(0, 6, 2))
  np.testing.assert_array_equal(whole, parts)


def test_jit_static_args_and_user_jit():
  preds, labels = random_case(8, (2, 8, 8), 4, void_frac=0.2)
  where = np.random.default_rng(9).random(labels.shape) < 0.8
  expected = ref_confusion(preds, labels, 4, 255, where)
  jitted = jax.jit(lovasz_jax.confusion_matrix,
                   static_argnames=("num_classes", "ignore_index"))
  np.testing.assert_array_equal(
      jitted(preds, labels, num_classes=4, ignore_index=255, where=where),
      expected)

  @jax.jit
  def metrics(logits, labels, where):
    cm = lovasz_jax.confusion_matrix(jnp.argmax(logits, -1), labels, 4,
                                     ignore_index=255, where=where)
    return cm, lovasz_jax.iou_per_class(cm), lovasz_jax.mean_iou(cm)

  logits = jax.nn.one_hot(preds, 4)
  cm, iou, miou = metrics(logits, labels, where)
  np.testing.assert_array_equal(cm, expected)
  np.testing.assert_allclose(iou, ref_iou(expected), rtol=1e-6)
  np.testing.assert_allclose(miou, ref_mean_iou(expected), rtol=1e-6)


def test_out_of_range_ids_raise_when_concrete():
  with pytest.raises(ValueError, match=r"labels hold values outside \[0, 3\).*: 3, 255"
                     r".*ignore_index=3"):
    lovasz_jax.confusion_matrix(np.array([0, 1, 2, 0]), np.array([0, 3, 255, 1]), 3)
  with pytest.raises(ValueError, match=r"labels hold values outside \[0, 3\).*: -1"):
    lovasz_jax.confusion_matrix(np.array([0, 1]), np.array([0, -1]), 3,
                                ignore_index=255)
  with pytest.raises(ValueError, match=r"predictions hold values outside \[0, 2\)"
                     r".*: 2.*argmax"):
    lovasz_jax.confusion_matrix(np.array([0, 2]), np.array([0, 1]), 2)


def test_out_of_range_ids_do_not_count_under_jit():
  labels = jnp.array([0, 1, 3, -1, 1, 0])
  preds = jnp.array([0, 1, 1, 0, 5, -2])
  cm = jax.jit(lovasz_jax.confusion_matrix, static_argnums=2)(preds, labels, 2)
  # Only the first two pixels have both ids in [0, 2).
  np.testing.assert_array_equal(cm, [[1, 0], [0, 1]])


def test_absent_classes_are_nan_and_left_out_of_the_mean():
  labels = np.array([0, 0, 1, 1, 1])
  preds = np.array([0, 1, 1, 1, 3])  # class 2 absent everywhere, 3 only predicted
  cm = lovasz_jax.confusion_matrix(preds, labels, 4)
  iou = np.asarray(lovasz_jax.iou_per_class(cm))
  np.testing.assert_allclose(iou[:2], [1 / 2, 2 / 4], rtol=1e-6)
  assert np.isnan(iou[2])
  assert iou[3] == 0.0  # predicted but absent from the labels: IoU 0, counted
  np.testing.assert_allclose(lovasz_jax.mean_iou(cm), (0.5 + 0.5 + 0.0) / 3,
                             rtol=1e-6)
  # Class absent from the predictions only: IoU 0 and counted.
  cm = lovasz_jax.confusion_matrix(np.array([0, 0]), np.array([0, 1]), 3)
  iou = np.asarray(lovasz_jax.iou_per_class(cm))
  assert iou[0] == 0.5 and iou[1] == 0.0 and np.isnan(iou[2])
  np.testing.assert_allclose(lovasz_jax.mean_iou(cm), 0.25, rtol=1e-6)


def test_nothing_counted_gives_zero_mean():
  cm = lovasz_jax.confusion_matrix(np.array([0, 1]), np.array([255, 255]), 3,
                                   ignore_index=255)
  np.testing.assert_array_equal(cm, np.zeros((3, 3)))
  assert np.isnan(np.asarray(lovasz_jax.iou_per_class(cm))).all()
  miou = lovasz_jax.mean_iou(cm)
  assert float(miou) == 0.0 and not np.isnan(float(miou))
  assert float(jax.jit(lovasz_jax.mean_iou)(jnp.zeros((4, 4), jnp.int32))) == 0.0


def test_perfect_and_empty_predictions():
  labels = np.array([[0, 1], [2, 2]])
  cm = lovasz_jax.confusion_matrix(labels, labels, 3)
  np.testing.assert_array_equal(lovasz_jax.iou_per_class(cm), [1.0, 1.0, 1.0])
  assert float(lovasz_jax.mean_iou(cm)) == 1.0


def test_one_minus_mean_iou_is_the_lovasz_loss_on_hard_predictions():
  # With every class in the labels, the Lovász-Softmax loss of one-hot
  # probabilities is the mean over classes of 1 - IoU.
  preds, labels = random_case(10, (2, 6, 6), 3)
  labels[0, 0, :3] = [0, 1, 2]
  cm = lovasz_jax.confusion_matrix(preds, labels, 3)
  loss = lovasz_jax.lovasz_softmax(jax.nn.one_hot(preds, 3), labels,
                                   from_logits=False)
  np.testing.assert_allclose(1 - lovasz_jax.mean_iou(cm), loss, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int64])
def test_integer_dtypes(dtype):
  preds, labels = random_case(11, (3, 7), 4, void_frac=0.2, void=100)
  cm = lovasz_jax.confusion_matrix(preds.astype(dtype), labels.astype(dtype), 4,
                                   ignore_index=100)
  np.testing.assert_array_equal(cm, ref_confusion(preds, labels, 4, 100))


def test_bool_ids_and_float_confusion(x64):
  cm = lovasz_jax.confusion_matrix(np.array([True, False, True]),
                                   np.array([True, True, False]), 2)
  np.testing.assert_array_equal(cm, [[0, 1], [1, 1]])
  cm64 = np.array([[3.0, 1.0], [0.0, 2.0]])
  iou = lovasz_jax.iou_per_class(cm64)
  assert iou.dtype == jnp.float64
  np.testing.assert_allclose(iou, [3 / 4, 2 / 3], rtol=1e-12)
  assert lovasz_jax.mean_iou(cm64).dtype == jnp.float64
  assert lovasz_jax.iou_per_class(np.array(cm, np.int32)).dtype == jnp.float32


def test_large_counts_are_exact():
  # More pixels than float32 can count one by one: counts are integers.
  n = 2**24 + 3
  labels = jnp.zeros((n,), jnp.int8)
  cm = lovasz_jax.confusion_matrix(labels, labels, 2)
  assert int(cm[0, 0]) == n and int(cm.sum()) == n


X = np.zeros((2, 4, 4), np.int32)


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(labels=np.zeros((2, 4, 5), np.int32)), ValueError,
     r"same shape, got predictions \(2, 4, 4\) and labels \(2, 4, 5\)"),
    (dict(predictions=np.zeros((2, 4, 4, 3), np.float32)), TypeError,
     r"predictions must be an integer array, got dtype float32"),
    (dict(predictions=np.zeros((2, 4, 4, 3), np.int32)), ValueError,
     r"same shape.*argmax"),
    (dict(labels=np.zeros((2, 4, 4), np.float32)), TypeError,
     r"labels must be an integer array, got dtype float32"),
    (dict(num_classes=0), ValueError, r"num_classes must be a positive int, got 0"),
    (dict(num_classes=2.0), TypeError, r"num_classes must be a positive int, got 2.0"),
    (dict(num_classes=True), TypeError, r"num_classes must be a positive int, got True"),
    (dict(num_classes=None), TypeError, r"num_classes must be a positive int, got None"),
    (dict(num_classes=46341), ValueError,
     r"num_classes must be at most 46340 \(C \* C int32 matrix entries\), got 46341"),
    (dict(ignore_index=1.5), TypeError,
     r"ignore_index must be an int or None, got 1.5"),
    (dict(where=np.ones((2, 4, 4), np.int32)), TypeError,
     r"where must be a boolean array, got dtype int32"),
    (dict(where=np.ones((2, 4), bool)), ValueError,
     r"where must have the shape of labels \(2, 4, 4\), got \(2, 4\)"),
])
def test_confusion_bad_inputs(kwargs, error, pattern):
  args = dict(predictions=X, labels=X, num_classes=3)
  args.update(kwargs)
  with pytest.raises(error, match=pattern):
    lovasz_jax.confusion_matrix(args.pop("predictions"), args.pop("labels"),
                                args.pop("num_classes"), **args)


def test_traced_num_classes_is_rejected():
  with pytest.raises(TypeError, match=r"num_classes must be a static Python int"):
    jax.jit(lovasz_jax.confusion_matrix)(X, X, 3)


def test_options_are_keyword_only():
  with pytest.raises(TypeError):
    lovasz_jax.confusion_matrix(X, X, 3, 255)  # pylint: disable=too-many-function-args


@pytest.mark.parametrize("fn", [lovasz_jax.iou_per_class, lovasz_jax.mean_iou])
@pytest.mark.parametrize("confusion, error, pattern", [
    (np.zeros((3, 4), np.int32), ValueError,
     r"square \[C, C\] matrix, got shape \(3, 4\)"),
    (np.zeros((3,), np.int32), ValueError, r"got shape \(3,\)"),
    (np.zeros((2, 3, 3), np.int32), ValueError, r"got shape \(2, 3, 3\)"),
    (np.zeros((0, 0), np.int32), ValueError, r"at least one class"),
    (np.zeros((2, 2), bool), TypeError,
     r"confusion must be a numeric array, got dtype bool"),
])
def test_iou_bad_inputs(fn, confusion, error, pattern):
  with pytest.raises(error, match=pattern):
    fn(confusion)


def test_predictions_dtype_error_names_predictions():
  with pytest.raises(TypeError) as info:
    lovasz_jax.confusion_matrix(np.zeros(3, np.float32), np.zeros(3, np.int32), 2)
  message = str(info.value)
  assert re.fullmatch(r"predictions must be an integer array, got dtype float32\. "
                      r"Pass class ids, e\.g\. jnp\.argmax\(logits, axis=-1\)\.",
                      message), message


def test_64_bit_ids_are_checked_before_jax_truncates_them():
  # Without x64, JAX turns int64 ids into int32: 2**32 would count as class 0.
  with pytest.raises(ValueError,
                     match=r"labels hold values outside \[0, 2\).*: 4294967296"):
    lovasz_jax.confusion_matrix(np.array([0, 1]), np.array([0, 2**32], np.int64), 2)
  with pytest.raises(ValueError,
                     match=r"predictions hold values outside \[0, 2\).*: 4294967297"):
    lovasz_jax.confusion_matrix(np.array([0, 2**32 + 1], np.int64), np.array([0, 1]),
                                2)


def test_one_call_counts_at_most_int32_max_pixels():
  # 2**31 pixels could overflow an int32 count. Traced by eval_shape, so
  # nothing is allocated.
  def shape_of(size):
    ids = jax.ShapeDtypeStruct((size,), jnp.int8)
    return jax.eval_shape(lambda p, l: lovasz_jax.confusion_matrix(p, l, 2), ids, ids)

  assert shape_of(2**31 - 1).shape == (2, 2)
  with pytest.raises(ValueError, match=r"at most 2\*\*31 - 1 pixels per call "
                     r"\(int32 counts\), got 2147483648\. Split the batch"):
    shape_of(2**31)


# Whole-data-set totals, with counts past 2**31 - 1 (int32). Class 0 has 3e9
# pixels: truncated to int32 it would be a negative count.
BIG = np.array([[3_000_000_000, 20_000_000, 5_000_000],
                [30_000_000, 400_000_000, 10_000_000],
                [1_000_000, 2_000_000, 50_000_000]], np.int64)

IOU_FNS = [lovasz_jax.iou_per_class, lovasz_jax.mean_iou]


def test_int64_total_past_int32_is_not_truncated():
  iou = lovasz_jax.iou_per_class(BIG)
  assert isinstance(iou, jax.Array) and iou.dtype == jnp.float32
  assert not np.isnan(np.asarray(iou)).any()
  np.testing.assert_allclose(iou, ref_iou(BIG), rtol=1e-7)
  miou = lovasz_jax.mean_iou(BIG)
  assert isinstance(miou, jax.Array) and miou.dtype == jnp.float32
  assert miou.shape == ()
  np.testing.assert_allclose(miou, ref_mean_iou(BIG), rtol=1e-7)


def test_large_counts_in_a_python_list():
  np.testing.assert_allclose(lovasz_jax.iou_per_class(BIG.tolist()), ref_iou(BIG),
                             rtol=1e-7)
  np.testing.assert_allclose(lovasz_jax.mean_iou(BIG.tolist()), ref_mean_iou(BIG),
                             rtol=1e-7)


def test_float64_counts_are_rounded_once():
  # IoU computed in float64, then rounded to float32: rounding the counts to
  # float32 first would move class 1 by one ulp.
  cm = np.array([[3e9 + 1, 40.0, 2.5],
                 [17.0, 2**24 + 1.0, 3.0],
                 [0.5, 9.0, 123456789.0]])
  iou = lovasz_jax.iou_per_class(cm)
  assert iou.dtype == jnp.float32
  np.testing.assert_array_equal(iou, ref_iou(cm).astype(np.float32))
  assert lovasz_jax.mean_iou(cm) == np.float32(ref_mean_iou(cm))


def test_int64_counts_with_x64():
  with jax.enable_x64(True):
    cm = jnp.asarray(BIG)
    assert cm.dtype == jnp.int64
    for fn in (lovasz_jax.iou_per_class, jax.jit(lovasz_jax.iou_per_class)):
      iou = fn(cm)
      assert iou.dtype == jnp.float64
      np.testing.assert_allclose(iou, ref_iou(BIG), rtol=1e-12)
    for fn in (lovasz_jax.mean_iou, jax.jit(lovasz_jax.mean_iou)):
      miou = fn(cm)
      assert miou.dtype == jnp.float64
      np.testing.assert_allclose(miou, ref_mean_iou(BIG), rtol=1e-12)
    # int32 counts still give float32, concrete or traced.
    small = cm // 1000
    assert lovasz_jax.iou_per_class(small.astype(jnp.int32)).dtype == jnp.float32
    assert jax.jit(lovasz_jax.mean_iou)(small.astype(jnp.int32)).dtype == jnp.float32


@pytest.mark.parametrize("fn", IOU_FNS)
def test_negative_counts_raise_naming_the_entries(fn):
  cm = np.array([[5, -2, 0], [0, 3, 0], [-7, 0, 4]], np.int64)
  with pytest.raises(ValueError, match=r"^confusion holds negative counts: "
                     r"confusion\[0, 1\] = -2, confusion\[2, 0\] = -7\. "
                     r"Counts must be >= 0\.$"):
    fn(cm)
  with pytest.raises(ValueError, match=r"negative counts: confusion\[1, 1\] = -0\.5\."):
    fn(np.array([[1.0, 0.0], [0.0, -0.5]]))


@pytest.mark.parametrize("fn", IOU_FNS)
def test_wrapped_int32_sums_raise(fn):
  # int32 matrices added on device wrap past 2**31 - 1 to negative counts.
  batch = jnp.array([[2**30, 5], [7, 2**29]], jnp.int32)
  total = batch + batch + batch
  assert int(total[0, 0]) == 3 * 2**30 - 2**32
  with pytest.raises(ValueError, match=r"negative counts: confusion\[0, 0\] = "
                     r"-1073741824\..*A sum of int32 matrices wraps.*NumPy int64"):
    fn(total)


@pytest.mark.parametrize("fn", IOU_FNS)
def test_non_finite_counts_raise(fn):
  cm = np.array([[1.0, np.inf], [np.nan, 2.0]])
  with pytest.raises(ValueError, match=r"non-finite counts: confusion\[0, 1\] = "
                     r"inf, confusion\[1, 0\] = nan\. Counts must be finite"):
    fn(cm)


def test_traced_counts_under_jit():
  # Under jit the counts cannot be checked: a class whose row or column holds
  # a negative or non-finite count is NaN, and so is the mean (the class is
  # not silently left out of it).
  iou_fn = jax.jit(lovasz_jax.iou_per_class)
  miou_fn = jax.jit(lovasz_jax.mean_iou)
  cm = np.array([[5, -1, 0], [0, 3, 0], [0, 0, 4]], np.int32)
  iou = np.asarray(iou_fn(cm))
  assert np.isnan(iou[0]) and np.isnan(iou[1]) and iou[2] == 1.0
  assert np.isnan(float(miou_fn(cm)))
  cm = np.array([[1.0, 0.0, 0.0], [0.0, np.inf, 0.0], [0.0, 0.0, 2.0]], np.float32)
  iou = np.asarray(iou_fn(cm))
  assert np.isnan(iou[1]) and iou[0] == 1.0 and iou[2] == 1.0
  assert np.isnan(float(miou_fn(cm)))
  # An int64 NumPy total passed through a jit boundary is made int32 by JAX
  # (without x64) before the metric sees it: the wrapped count gives NaN.
  assert np.isnan(float(miou_fn(BIG)))
  # Large int32 counts (past 2**24) are computed in float32, within a few
  # 1e-7 relative.
  cm = np.array([[2_000_000_000, 3, 40_000_000],
                 [5, 2**24 + 1, 7],
                 [60_000_000, 9, 1_500_000_000]], np.int32)
  iou = iou_fn(cm)
  assert iou.dtype == jnp.float32
  np.testing.assert_allclose(iou, ref_iou(cm), rtol=1e-6)
  np.testing.assert_allclose(miou_fn(cm), ref_mean_iou(cm), rtol=1e-6)
