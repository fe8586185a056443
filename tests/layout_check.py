"""Every layout on 8 host devices, run by tests/test_layouts.py in a subprocess.

The layouts that sharded_check.py does not cover: the class axis split over
a 2-D explicit mesh, sizes that the devices do not divide under
``jax.set_mesh``, per-image losses with images split inside ``shard_map``
(``image_axis_name``), ``jax.vmap`` over a sharded axis, and the metrics on
every layout. Each case is compared with one device's value and gradient.
Prints one JSON line; the assertions are in test_layouts.py.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import lovasz_jax
from tests.sharded_check import collectives, path_from_command_line, use_path

_C = 5


def _softmax_losses():
  softmax = functools.partial(lovasz_jax.lovasz_softmax, ignore_index=255)
  return {
      "batch": softmax,
      "batch_hist": functools.partial(softmax, method="histogram"),
      "batch_lean": functools.partial(softmax, class_chunk_size=2),
      "per_image": functools.partial(softmax, per_image=True),
      "per_image_hist": functools.partial(softmax, per_image=True, method="histogram"),
      "per_image_lean": functools.partial(softmax, per_image=True, class_chunk_size=2),
  }


def _binary_losses():
  """Losses of [B, ..., K] logits and [B, ...] labels with 255 as void."""
  hot = lambda y, k: jax.nn.one_hot(y, k, dtype=jnp.int32)
  keep = lambda y, x: jnp.broadcast_to((y != 255)[..., None], x.shape)
  return {
      "sigmoid_multilabel": lambda x, y, **k: lovasz_jax.lovasz_sigmoid(
          x, hot(y, x.shape[-1]), axis=-1, where=keep(y, x), **k),
      "sigmoid_multilabel_per_image": lambda x, y, **k: lovasz_jax.lovasz_sigmoid(
          x, hot(y, x.shape[-1]), axis=-1, per_image=True, where=keep(y, x), **k),
      "hinge_multilabel": lambda x, y, **k: lovasz_jax.lovasz_hinge(
          x, hot(y, x.shape[-1]), axis=-1, where=keep(y, x), **k),
  }


def _data(shape, seed, classes=_C):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=shape + (classes,)).astype(np.float32)
  labels = rng.integers(0, classes, shape)
  labels[0, 0] = 255                      # some void pixels
  return logits, labels


def _compare(out, key, single, sharded):
  (v1, g1), (v8, g8) = single, sharded
  out[key] = {"value_single": float(v1), "value_sharded": float(v8),
              "grad_max_abs_diff": float(jnp.max(jnp.abs(g1 - g8))),
              "grad_max_abs": float(jnp.max(jnp.abs(g1)))}


def class_axis_checks(out):
  """Logits whose class axis is split over a `model` axis (2-D explicit mesh)."""
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  logits, labels = _data((4, 6, 6), 0, classes=6)
  xs = jax.device_put(logits, NamedSharding(mesh, P("data", None, None, "model")))
  ys = jax.device_put(labels, NamedSharding(mesh, P("data")))
  losses = {**_softmax_losses(), **_binary_losses()}
  for name in ("per_image_lean", "hinge_multilabel"):
    del losses[name]   # the same layouts as the lean batch mode and the sigmoid
  for name, fn in losses.items():
    step = jax.jit(jax.value_and_grad(fn))
    single = step(logits, labels)
    _compare(out, f"class_axis/args/{name}", single, step(xs, ys))
    if name == "batch":
      with jax.set_mesh(mesh):
        _compare(out, f"class_axis/set_mesh/{name}", single, step(xs, ys))
    out[f"class_axis/eager/{name}"] = {"value_single": float(single[0]),
                                       "value_sharded": float(fn(xs, ys))}
    out[f"class_axis/grad_spec/{name}"] = [
        a if isinstance(a, (str, type(None))) else list(a)
        for a in step(xs, ys)[1].sharding.spec]


def indivisible_checks(out):
  """Replicated inputs whose sizes 8 devices do not divide, under set_mesh."""
  meshes = {"auto": jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,)),
            "explicit": jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))}
  shapes = {"3x5x5": (3, 5, 5), "1x375x500": (1, 375, 500)}
  losses = {**{k: v for k, v in _softmax_losses().items()
               if k in ("batch", "batch_hist", "per_image")},
            "sigmoid_binary": lambda x, y: lovasz_jax.lovasz_sigmoid(
                x[..., 1], (y == 1).astype(jnp.int32), where=y != 255),
            "hinge_batch": lambda x, y: lovasz_jax.lovasz_hinge(
                x[..., 1], (y == 1).astype(jnp.int32), where=y != 255, per_image=False)}
  for shape_name, shape in shapes.items():
    logits, labels = _data(shape, 1)
    for name, fn in losses.items():
      if shape_name == "1x375x500" and name not in ("batch", "batch_hist"):
        continue  # the batch-mode rows are what set_mesh splits over devices
      step = jax.jit(jax.value_and_grad(fn))
      single = step(logits, labels)
      for kind, mesh in meshes.items():
        with jax.set_mesh(mesh):
          _compare(out, f"indivisible/{kind}/{shape_name}/{name}", single,
                   step(logits, labels))


def split_image_checks(out):
  """per_image in shard_map with each image's height split (image_axis_name)."""
  mesh = jax.make_mesh((2, 4), ("data", "space"), axis_types=(AxisType.Explicit,) * 2)
  logits, labels = _data((4, 8, 6), 2)
  labels[1] = 255                         # an all-void image
  losses = {k: v for k, v in _softmax_losses().items() if k.startswith("per_image")}
  losses.update({
      "sigmoid_multilabel_per_image": _binary_losses()["sigmoid_multilabel_per_image"],
      "hinge_per_image": lambda x, y, **k: lovasz_jax.lovasz_hinge(
          x[..., 1], (y == 1).astype(jnp.int32), where=y != 255, **k),
  })
  spec = NamedSharding(mesh, P("data", "space"))
  xs, ys = jax.device_put(logits, spec), jax.device_put(labels, spec)
  for name, fn in losses.items():
    single = jax.jit(jax.value_and_grad(fn))(logits, labels)
    for image_axis in ("space", None):

      @jax.jit
      @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data", "space"),) * 2,
                         out_specs=(P(), P("data", "space")))
      def step(x, y, fn=fn, image_axis=image_axis):
        return jax.value_and_grad(lambda x: fn(
            x, y, axis_name=("data", "space"), image_axis_name=image_axis))(x)

      key = "with" if image_axis else "without"
      _compare(out, f"split_image/{key}/{name}", single, step(xs, ys))


def vmap_checks(out):
  """jax.vmap of a loss over a leading axis that is itself sharded."""
  logits, labels = _data((8, 2, 4, 4), 3)
  meshes = {"explicit": jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,)),
            "auto": jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))}
  losses = {k: v for k, v in {**_softmax_losses(), **_binary_losses()}.items()
            if k in ("batch", "batch_hist", "per_image", "hinge_multilabel")}
  for name, fn in losses.items():
    step = jax.jit(jax.vmap(jax.value_and_grad(fn)))
    v1, g1 = step(logits, labels)
    for kind, mesh in meshes.items():
      sh = NamedSharding(mesh, P("data"))
      v8, g8 = step(jax.device_put(logits, sh), jax.device_put(labels, sh))
      out[f"vmap/{kind}/{name}"] = {
          "value_max_abs_diff": float(jnp.max(jnp.abs(v1 - v8))),
          "value_max_abs": float(jnp.max(jnp.abs(v1))),
          "grad_max_abs_diff": float(jnp.max(jnp.abs(g1 - g8))),
          "grad_max_abs": float(jnp.max(jnp.abs(g1)))}


def metric_checks(out):
  """confusion_matrix (and the IoU readers) on every layout: exact counts."""
  rng = np.random.default_rng(4)
  preds = rng.integers(0, _C, (8, 12, 10))
  labels = rng.integers(0, _C, (8, 12, 10))
  labels[2, :3] = 255
  where = rng.random((8, 12, 10)) > 0.2
  cm = functools.partial(lovasz_jax.confusion_matrix, num_classes=_C, ignore_index=255)
  ref = np.asarray(cm(preds, labels, where=where))
  record = lambda key, got: out.__setitem__(key, {
      "equal": bool(np.array_equal(np.asarray(got), ref)),
      "total": int(np.asarray(got).sum()), "ref_total": int(ref.sum())})
  meshes = {
      "explicit_1d": (jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,)),
                      P("data")),
      "auto_1d": (jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,)), P("data")),
      "explicit_2d": (jax.make_mesh((2, 4), ("data", "space"),
                                    axis_types=(AxisType.Explicit,) * 2), P("data", "space")),
      "explicit_width": (jax.make_mesh((2, 4), ("data", "space"),
                                       axis_types=(AxisType.Explicit,) * 2),
                         P(None, "space", "data")),
  }
  jitted = jax.jit(cm)
  for kind, (mesh, spec) in meshes.items():
    put = lambda a: jax.device_put(a, NamedSharding(mesh, spec))
    args = (put(preds), put(labels))
    record(f"metrics/{kind}/eager", cm(*args, where=put(where)))
    record(f"metrics/{kind}/jit", jitted(*args, where=put(where)))
    with jax.set_mesh(mesh):
      record(f"metrics/{kind}/set_mesh", jitted(*args, where=put(where)))
      record(f"metrics/{kind}/set_mesh_eager", cm(*args, where=put(where)))
    # A where mask laid out differently from the ids.
    record(f"metrics/{kind}/replicated_where", jitted(*args, where=where))
    text = jitted.lower(*args, where=put(where)).compile().as_text()
    out[f"metrics/{kind}/collectives"] = collectives(text)
    miou = lovasz_jax.mean_iou(jitted(*args, where=put(where)))
    out[f"metrics/{kind}/mean_iou"] = [float(miou), float(lovasz_jax.mean_iou(ref))]
    names = tuple(mesh.axis_names)

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(spec,) * 3, out_specs=P())
    def in_shard_map(p, y, w, names=names):
      return cm(p, y, where=w, axis_name=names)

    record(f"metrics/{kind}/shard_map", in_shard_map(*args, put(where)))
  # vmap over a sharded axis: one matrix per image.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
  per = jax.jit(jax.vmap(lambda p, y, w: cm(p, y, where=w)))
  got = np.asarray(per(put(preds), put(labels), put(where)))
  single = np.stack([np.asarray(cm(p, y, where=w)) for p, y, w in zip(preds, labels, where)])
  out["metrics/vmap"] = {"equal": bool(np.array_equal(got, single)),
                         "total": int(got.sum()), "ref_total": int(single.sum())}


def lovasz_grad_checks(out):
  """lovasz_grad of rows split over devices along the sorted axis."""
  rng = np.random.default_rng(5)
  fg = rng.random((4, 64)) > 0.6
  ref = np.asarray(lovasz_jax.lovasz_grad(fg))
  for kind, axes in (("explicit", (AxisType.Explicit,)), ("auto", (AxisType.Auto,))):
    mesh = jax.make_mesh((8,), ("data",), axis_types=axes)
    got = lovasz_jax.lovasz_grad(jax.device_put(fg, NamedSharding(mesh, P(None, "data"))))
    out[f"lovasz_grad/{kind}"] = float(np.max(np.abs(np.asarray(got) - ref)))


def main():
  path = path_from_command_line()
  out = {"devices": jax.device_count(), "path": path}
  with use_path(path):
    class_axis_checks(out)
    indivisible_checks(out)
    split_image_checks(out)
    vmap_checks(out)
    if path == "portable":  # the metrics and lovasz_grad use no row kernel
      metric_checks(out)
      lovasz_grad_checks(out)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
