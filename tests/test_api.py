"""The public surface and every bad-input error."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lovasz_jax


def test_public_names_import():
  for name in lovasz_jax.__all__:
    assert getattr(lovasz_jax, name) is not None
  assert re.fullmatch(r"\d+\.\d+\.\d+", lovasz_jax.__version__)


def test_options_are_keyword_only():
  x, y = jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32)
  with pytest.raises(TypeError):
    lovasz_jax.lovasz_softmax(x, y, -1)  # pylint: disable=too-many-function-args
  with pytest.raises(TypeError):
    lovasz_jax.lovasz_hinge(x, y, True)  # pylint: disable=too-many-function-args


X = np.zeros((2, 4, 4, 3), np.float32)
Y = np.zeros((2, 4, 4), np.int32)


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(labels=np.zeros((2, 4, 5), np.int32)), ValueError,
     r"labels of shape \(2, 4, 4\), got \(2, 4, 5\)"),
    (dict(labels=np.zeros((2, 4, 4), np.float32)), TypeError,
     r"labels must be an integer array, got dtype float32"),
    (dict(logits=np.zeros((2, 4, 4, 3), np.int32)), TypeError,
     r"logits must be a floating-point array, got dtype int32"),
    (dict(logits=np.zeros((3,), np.float32), labels=np.zeros((), np.int32)),
     ValueError, r"at least 2 dimensions"),
    (dict(axis=4), ValueError, r"axis=4 is out of range for logits with 4 dimensions"),
    (dict(axis=-5), ValueError, r"axis=-5 is out of range"),
    (dict(axis=1.0), TypeError, r"axis must be an int, got 1.0"),
    (dict(classes=[0, 3]), ValueError, r"class id 3 in classes is outside \[0, 3\)"),
    (dict(classes=[-1]), ValueError, r"class id -1"),
    (dict(classes=[]), ValueError, r"classes must not be empty"),
    (dict(classes=[1, 1]), ValueError, r"repeated ids"),
    (dict(classes="every"), ValueError, r'"present", "all" .* got \'every\''),
    (dict(classes=1.5), TypeError, r"classes must be"),
    (dict(class_weights=np.ones(4)), ValueError, r"class_weights must have shape \(3,\).*got \(4,\)"),
    (dict(class_weights=np.ones((3, 1))), ValueError, r"got \(3, 1\)"),
    (dict(where=np.ones((2, 4), bool)), ValueError, r"where must have the shape"),
    (dict(where=np.ones((2, 4, 4), np.int32)), TypeError, r"where must be a boolean array"),
    (dict(per_image="yes"), TypeError, r"per_image must be a Python bool, got 'yes'"),
    (dict(ignore_index=2.5), TypeError, r"ignore_index must be an int or None, got 2.5"),
    (dict(class_chunk_size=0), ValueError, r"class_chunk_size must be a positive int, got 0"),
    (dict(class_chunk_size="4"), TypeError, r"class_chunk_size must be a positive int, got '4'"),
    (dict(labels=np.full((2, 4, 4), 255)), ValueError,
     r"outside \[0, 3\) for logits with 3 classes: 255. If 255 marks void pixels, pass ignore_index=255"),
    (dict(labels=np.full((2, 4, 4), -1)), ValueError, r"-1"),
    (dict(num_bins=True, method="histogram"), TypeError,
     r"num_bins must be a positive int, got True"),
    (dict(num_bins=0, method="histogram"), ValueError, r"num_bins must be a positive int"),
    (dict(class_chunk_size=True), TypeError, r"class_chunk_size must be a positive int, got True"),
    (dict(axis=True), TypeError, r"axis must be an int, got True"),
    (dict(ignore_index=False), TypeError, r"ignore_index must be an int or None, got False"),
    (dict(axis_name="data"), ValueError,
     r"axis_name='data': axis 'data' is not bound here.*jax.shard_map"),
    (dict(axis_name=3), TypeError, r"axis_name must be a mesh axis name"),
    (dict(class_weights=np.array([1.0, -1.0, 1.0])), ValueError, r"non-negative"),
    (dict(logits=np.full((2, 4, 4, 3), 2.0, np.float32), from_logits=False), ValueError,
     r"must be probabilities in \[0, 1\]"),
])
def test_softmax_bad_input(kwargs, error, pattern):
  args = dict(logits=X, labels=Y)
  args.update(kwargs)
  logits, labels = args.pop("logits"), args.pop("labels")
  with pytest.raises(error, match=pattern):
    lovasz_jax.lovasz_softmax(logits, labels, **args)
  # Trace-time checks fire inside jit too (the label-value check cannot; see
  # test_out_of_range_labels_under_jit_give_nan).
  value_checks = ("255", "non-negative", "probabilities")
  if not any(v in pattern for v in value_checks) and "-1" != pattern:
    with pytest.raises(error, match=pattern):
      jax.jit(lambda a, b: lovasz_jax.lovasz_softmax(a, b, **args))(logits, labels)


def test_traced_classes_are_rejected():
  with pytest.raises(TypeError, match="classes must be static"):
    jax.jit(lambda c: lovasz_jax.lovasz_softmax(X, Y, classes=c))(jnp.array([0, 1]))


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(labels=np.zeros((2, 5), np.int32)), ValueError, r"labels must have the logits' shape"),
    (dict(labels=np.zeros((2, 4), np.float32)), TypeError, r"integer array"),
    (dict(logits=np.zeros((2, 4), np.int32)), TypeError, r"floating-point"),
    (dict(labels=np.full((2, 4), 3)), ValueError, r"outside \[0, 2\).*: 3"),
    (dict(per_image=1), TypeError, r"per_image must be a Python bool"),
])
def test_hinge_bad_input(kwargs, error, pattern):
  args = dict(logits=np.zeros((2, 4), np.float32), labels=np.zeros((2, 4), np.int32))
  args.update(kwargs)
  logits, labels = args.pop("logits"), args.pop("labels")
  with pytest.raises(error, match=pattern):
    lovasz_jax.lovasz_hinge(logits, labels, **args)


def test_num_bins_is_ignored_by_the_sort_method():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  exact = lovasz_jax.lovasz_softmax(logits, Y)
  for num_bins in (0, -3, None):
    assert lovasz_jax.lovasz_softmax(logits, Y, method="sort", num_bins=num_bins) == exact


def test_classes_as_a_list_or_a_tuple():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  direct = lovasz_jax.lovasz_softmax(logits, Y, classes=[0, 1])
  assert direct == lovasz_jax.lovasz_softmax(logits, Y, classes=(0, 1))
  fn = jax.jit(lovasz_jax.lovasz_softmax, static_argnames=lovasz_jax.SOFTMAX_STATIC_ARGNAMES)
  assert fn(logits, Y, classes=(0, 1)) == direct
  # jit hashes static arguments, so the jit recipe needs a tuple (README).
  with pytest.raises(ValueError, match="hashable"):
    fn(logits, Y, classes=[0, 1])


def test_forward_mode_and_second_order():
  # lovasz_softmax has a hand-written reverse-mode rule (custom_vjp), so
  # jax.jvp of the loss itself is not available; reverse mode, jvp of the
  # gradient (Hessian-vector products) and jax.hessian are (README, API).
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(1, 6, 3)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 3, (1, 6)))
  f = lambda x: lovasz_jax.lovasz_softmax(x, y)
  with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
    jax.jvp(f, (x,), (jnp.ones_like(x),))
  hvp = jax.jvp(jax.grad(f), (x,), (jnp.ones_like(x),))[1]
  hess = jax.hessian(f)(x)
  np.testing.assert_allclose(hvp, jnp.einsum("...ijk,ijk->...", hess, jnp.ones_like(x)),
                             rtol=1e-4, atol=1e-6)
  g = lambda x: lovasz_jax.lovasz_sigmoid(x, (y == 1).astype(jnp.int32)[..., None]
                                         * jnp.ones((1, 1, 3), jnp.int32), axis=-1)
  _, tangent = jax.jvp(g, (x,), (jnp.ones_like(x),))
  np.testing.assert_allclose(tangent, jnp.sum(jax.grad(g)(x)), rtol=1e-5)


# A row (one class of the batch, or of one image with per_image=True) is
# counted in int32, so it may hold at most 2**31 - 1 pixels. Concrete sizes
# are checked when traced (eval_shape: nothing is allocated).

BIG = 2**31


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("loss", ["lovasz_softmax", "lovasz_sigmoid"])
def test_rows_past_int32_raise_when_traced(loss, per_image):
  batch = 2   # in batch mode the row is the batch's two images together

  def trace(pixels):
    x = jax.ShapeDtypeStruct((batch, pixels, 2), jnp.float32)
    if loss == "lovasz_softmax":
      y = jax.ShapeDtypeStruct((batch, pixels), jnp.int32)
      fn = lambda x, y: lovasz_jax.lovasz_softmax(x, y, per_image=per_image)
    else:
      y = jax.ShapeDtypeStruct((batch, pixels, 2), jnp.int32)
      fn = lambda x, y: lovasz_jax.lovasz_sigmoid(x, y, axis=-1, per_image=per_image)
    return jax.eval_shape(fn, x, y)

  with pytest.raises(ValueError, match=f"{loss} has {BIG} pixels in one row"):
    trace(BIG if per_image else BIG // 2)
  trace(BIG - 1 if per_image else BIG // 2 - 1)   # fewer pixels trace


@pytest.mark.parametrize("dims", [(65536, 32768, 1), (65536, 32767, 1), (2**31 - 1, 1),
                                  (46341, 46341), (46340, 46341), (65536, 65536, 0),
                                  (3, 0, 2**31 - 1, 2**31 - 1), (7,)])
def test_row_length_at_run_time_for_symbolic_sizes(dims):
  # With symbolic sizes (jax.export) the check runs in the program: a row
  # past 2**31 - 1 pixels makes the loss NaN. Traced ints stand in for the
  # symbolic sizes; the product is formed without wrapping in int32.
  from lovasz_jax import _inputs  # pylint: disable=import-outside-toplevel
  too_long = jax.jit(lambda *d: _inputs.row_too_long(d))(*dims)
  assert bool(too_long) == (0 not in dims and np.prod(dims, dtype=object) > 2**31 - 1)
  assert _inputs.row_too_long(dims) is False   # concrete: checked when traced
