"""Multi-device checks, run by tests/test_sharding.py in a subprocess.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX
starts, so this runs as its own process (once per path: ``native`` or
``portable``). It prints one JSON line of results; the assertions are in
test_sharding.py.
"""

import argparse
import contextlib
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import lovasz_jax
from lovasz_jax import _order

_COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter",
                "collective-permute")
_LINE = re.compile(r"= (.*) (" + "|".join(_COLLECTIVES) + r")(?:-start)?\(")


def collectives(compiled_text):
  """[(op, elements in its result)] for every collective in the compiled HLO."""
  out = []
  for line in compiled_text.splitlines():
    m = _LINE.search(line)
    if m:
      dims = re.findall(r"\[([\d,]*)\]", m.group(1))
      out.append((m.group(2), sum(int(np.prod([int(d) for d in ds.split(",") if d]))
                                  for ds in dims)))
  return out


def _losses(num_classes):
  hot = lambda y: jax.nn.one_hot(y, num_classes, dtype=jnp.int32)
  keep = lambda y, x: jnp.broadcast_to((y != 255)[..., None], x.shape)
  softmax = functools.partial(lovasz_jax.lovasz_softmax, ignore_index=255)
  return {
      "batch": softmax,
      "batch_hist": functools.partial(softmax, method="histogram"),
      "batch_lean": functools.partial(softmax, class_chunk_size=2),
      "per_image": functools.partial(softmax, per_image=True),
      "per_image_lean": functools.partial(softmax, per_image=True, class_chunk_size=2),
      "per_image_hist": functools.partial(softmax, per_image=True, method="histogram"),
      "hinge": lambda x, y: lovasz_jax.lovasz_hinge(x[..., 0], (y == 1).astype(jnp.int32)),
      "sigmoid_multilabel": lambda x, y: lovasz_jax.lovasz_sigmoid(
          x, hot(y), axis=-1, where=keep(y, x)),
      "sigmoid_multilabel_per_image": lambda x, y: lovasz_jax.lovasz_sigmoid(
          x, hot(y), axis=-1, per_image=True, where=keep(y, x)),
      "sigmoid_binary": lambda x, y: lovasz_jax.lovasz_sigmoid(
          x[..., 1], (y == 1).astype(jnp.int32), where=y != 255),
      "sigmoid_binary_hist": lambda x, y: lovasz_jax.lovasz_sigmoid(
          x[..., 1], (y == 1).astype(jnp.int32), where=y != 255, method="histogram"),
  }


def _meshes():
  return {
      "explicit": jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,)),
      "auto": jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
  }


def jit_checks(out):
  """Sharded arguments under jit, with and without jax.set_mesh."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(8, 16, 16, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (8, 16, 16))
  labels[3] = 255  # one all-void image
  for kind, mesh in _meshes().items():
    shard = NamedSharding(mesh, P("data"))
    xs, ys = jax.device_put(logits, shard), jax.device_put(labels, shard)
    for name, fn in _losses(5).items():
      step = jax.jit(jax.value_and_grad(fn))
      v1, g1 = step(logits, labels)             # one device
      for way in ("args", "set_mesh"):
        if way == "set_mesh":
          with jax.set_mesh(mesh):
            v8, g8 = step(xs, ys)
            text = step.lower(xs, ys).compile().as_text()
        else:
          v8, g8 = step(xs, ys)
          text = step.lower(xs, ys).compile().as_text()
        out[f"jit/{kind}/{way}/{name}"] = {
            "value_single": float(v1), "value_sharded": float(v8),
            "grad_max_abs_diff": float(jnp.max(jnp.abs(g1 - g8))),
            "grad_max_abs": float(jnp.max(jnp.abs(g1))),
            # A list: the spec's repr differs between jax versions.
            "grad_spec": [a if isinstance(a, (str, type(None))) else list(a)
                          for a in g8.sharding.spec],
            "collectives": collectives(text),
        }
    # Eager calls under jax.set_mesh.
    with jax.set_mesh(mesh):
      for name in ("batch", "per_image", "hinge"):
        v = _losses(5)[name](xs, ys)
        out[f"eager/{kind}/{name}"] = {"value_sharded": float(v),
                                       "value_single": float(_losses(5)[name](logits, labels))}


def many_rows_checks(out):
  """Batch mode with more rows than devices: 19 classes over 8 devices.

  The exact split pads the 19 rows to 24, so each device orders 3 whole
  rows, and each device's row losses must land at its own offset of the
  all-reduced losses. (With 5 classes every device holds at most one row.)
  Classes 15 to 18 are absent (not counted) and the classes weigh
  differently: a plain mean over all 19 rows would not notice row losses
  put in the wrong rows, since their sum is the same.
  """
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(8, 8, 8, 19)).astype(np.float32)
  labels = rng.integers(0, 15, (8, 8, 8))
  labels[5] = 255  # one all-void image
  loss = functools.partial(lovasz_jax.lovasz_softmax, ignore_index=255,
                           class_weights=np.linspace(0.5, 2.0, 19, dtype=np.float32))
  step = jax.jit(jax.value_and_grad(loss))
  v1, g1 = step(logits, labels)              # one device

  def record(key, v8, g8):
    out[key] = {"value_single": float(v1), "value_sharded": float(v8),
                "grad_max_abs_diff": float(jnp.max(jnp.abs(g1 - g8))),
                "grad_max_abs": float(jnp.max(jnp.abs(g1)))}

  for kind, mesh in _meshes().items():
    shard = NamedSharding(mesh, P("data"))
    xs, ys = jax.device_put(logits, shard), jax.device_put(labels, shard)
    record(f"many_rows/{kind}/args", *step(xs, ys))
    with jax.set_mesh(mesh):
      record(f"many_rows/{kind}/set_mesh", *step(xs, ys))
  mesh = jax.make_mesh((8,), ("data",))

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data")),
                     out_specs=(P(), P("data")))
  def sharded_step(x, y):
    return jax.value_and_grad(lambda x: loss(x, y, axis_name="data"))(x)

  shard = NamedSharding(mesh, P("data"))
  record("many_rows/shard_map", *sharded_step(jax.device_put(logits, shard),
                                              jax.device_put(labels, shard)))


def shard_map_checks(out):
  """axis_name inside shard_map: the loss of the global batch."""
  rng = np.random.default_rng(1)
  images = rng.normal(size=(8, 12, 12, 3)).astype(np.float32)
  labels = rng.integers(0, 5, (8, 12, 12))
  labels[2] = 255
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  batch = NamedSharding(mesh, P("data"))
  params = {
      "conv": jnp.asarray(rng.normal(size=(3, 3, 3, 6)).astype(np.float32) * 0.3),
      "head": jnp.asarray(rng.normal(size=(6, 5)).astype(np.float32) * 0.3),
  }

  def model(p, x):                       # a small conv net: [B, H, W, 3] -> [B, H, W, 5]
    h = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(h) @ p["head"]

  hot = lambda y: jax.nn.one_hot(y, 5, dtype=jnp.int32)
  cases = {
      "batch": lambda z, y, **k: lovasz_jax.lovasz_softmax(z, y, ignore_index=255, **k),
      "batch_hist": lambda z, y, **k: lovasz_jax.lovasz_softmax(
          z, y, ignore_index=255, method="histogram", **k),
      "batch_lean": lambda z, y, **k: lovasz_jax.lovasz_softmax(
          z, y, ignore_index=255, class_chunk_size=2, **k),
      "per_image": lambda z, y, **k: lovasz_jax.lovasz_softmax(
          z, y, ignore_index=255, per_image=True, **k),
      "sigmoid_multilabel": lambda z, y, **k: lovasz_jax.lovasz_sigmoid(
          z, hot(y), axis=-1, where=jnp.broadcast_to((y != 255)[..., None], z.shape), **k),
      "sigmoid_binary_hist": lambda z, y, **k: lovasz_jax.lovasz_sigmoid(
          z[..., 0], (y == 1).astype(jnp.int32), where=y != 255, method="histogram", **k),
      "hinge_batch": lambda z, y, **k: lovasz_jax.lovasz_hinge(
          z[..., 0], (y == 1).astype(jnp.int32), where=y != 255, per_image=False, **k),
  }
  for name, loss in cases.items():
    ref_loss, ref_grads = jax.value_and_grad(
        lambda p: loss(model(p, images), labels))(params)

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                       out_specs=(P(), P()))
    def train_grads(p, x, y):
      # No pmean: the loss is already that of the global batch, and the
      # parameters' gradient is summed over devices by shard_map itself.
      return jax.value_and_grad(lambda p: loss(model(p, x), y, axis_name="data"))(p)

    sm_loss, sm_grads = train_grads(params, jax.device_put(images, batch),
                                    jax.device_put(labels, batch))
    diff = max(float(jnp.max(jnp.abs(sm_grads[k] - ref_grads[k]))) for k in params)
    scale = max(float(jnp.max(jnp.abs(ref_grads[k]))) for k in params)
    text = train_grads.lower(params, jax.device_put(images, batch),
                             jax.device_put(labels, batch)).compile().as_text()
    out[f"shard_map/{name}"] = {"loss": float(sm_loss), "loss_ref": float(ref_loss),
                                "grad_max_abs_diff": diff, "grad_max_abs": scale,
                                "collectives": collectives(text)}


def memory_checks(out):
  """Issue "Batch mode across devices": (16,256,256,21), K = 4096, 8 devices."""
  shape = (16, 256, 256, 21)
  ml = lambda x, y: lovasz_jax.lovasz_sigmoid(x, y, axis=-1)
  cases = {
      "exact": (functools.partial(lovasz_jax.lovasz_softmax), shape[:-1]),
      "histogram": (functools.partial(lovasz_jax.lovasz_softmax, method="histogram"),
                    shape[:-1]),
      "per_image": (functools.partial(lovasz_jax.lovasz_softmax, per_image=True),
                    shape[:-1]),
      "sigmoid_multilabel": (ml, shape),
      "sigmoid_binary_hist": (
          lambda x, y: lovasz_jax.lovasz_sigmoid(x[..., 0], y[..., 0], method="histogram"),
          shape),
  }
  for name, (fn, label_shape) in cases.items():
    f = jax.jit(jax.value_and_grad(fn))
    single = f.lower(jax.ShapeDtypeStruct(shape, jnp.float32),
                     jax.ShapeDtypeStruct(label_shape, jnp.int32)).compile()
    for kind, mesh in _meshes().items():
      sh = NamedSharding(mesh, P("data"))
      # The automatic mesh is set with jax.set_mesh, as the README asks:
      # without a mesh in context, the portable path's exact rows are left
      # to the partitioner (see test_batch_exact_sends_rows_with_all_to_all).
      with jax.set_mesh(mesh) if kind == "auto" else contextlib.nullcontext():
        compiled = f.lower(jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh),
                           jax.ShapeDtypeStruct(label_shape, jnp.int32,
                                                sharding=sh)).compile()
      out[f"memory/{kind}/{name}"] = {
          "single_temp": single.memory_analysis().temp_size_in_bytes,
          "device_temp": compiled.memory_analysis().temp_size_in_bytes,
          "collectives": collectives(compiled.as_text()),
          "device_pixels": int(np.prod(shape[:-1])) // 8,
          "classes": shape[-1], "num_bins": 4096,
      }


def _lowering_counts(text):
  return {"sort": len(re.findall(r"stablehlo\.sort", text)),
          "scatter": len(re.findall(r"stablehlo\.scatter", text)),
          "cpu_kernel": len(re.findall(r"lovasz_jax_", text)),
          "custom_partitioning": len(re.findall(r"CustomSPMDPartitioning", text)),
          "all_to_all": len(re.findall(r"all_to_all", text)),
          "all_gather": len(re.findall(r"all_gather", text))}


def export_checks(out):
  """The sharded forms lower for TPU and CUDA (jax.export, no hardware)."""
  shape = (8, 16, 16, 5)
  modes = {"sort": {}, "histogram": dict(method="histogram"),
           "per_image": dict(per_image=True), "lean": dict(class_chunk_size=2)}
  for platform in ("tpu", "cuda"):
    for kind, mesh in _meshes().items():
      sh = NamedSharding(mesh, P("data"))
      args = (jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh),
              jax.ShapeDtypeStruct(shape[:-1], jnp.int32, sharding=sh))
      for name, kwargs in modes.items():
        f = jax.jit(jax.value_and_grad(functools.partial(lovasz_jax.lovasz_softmax, **kwargs)))
        with jax.set_mesh(mesh):
          exported = jax.export.export(f, platforms=(platform,))(*args)
        out[f"export/{platform}/{kind}/{name}"] = {
            "devices": exported.nr_devices, **_lowering_counts(exported.mlir_module())}
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    sh = NamedSharding(mesh, P("data"))

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data")),
                       out_specs=(P(), P("data")))
    def step(x, y):
      return jax.value_and_grad(
          lambda x: lovasz_jax.lovasz_softmax(x, y, axis_name="data"))(x)

    exported = jax.export.export(jax.jit(step), platforms=(platform,))(
        jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh),
        jax.ShapeDtypeStruct(shape[:-1], jnp.int32, sharding=sh))
    out[f"export/{platform}/shard_map/sort"] = {
        "devices": exported.nr_devices, **_lowering_counts(exported.mlir_module())}


def path_from_command_line():
  """``--path native|portable``; the 8 host devices must be set already."""
  assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", ""), (
      "run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
  parser = argparse.ArgumentParser()
  parser.add_argument("--path", choices=["native", "portable"], default="native")
  return parser.parse_args().path


def use_path(path):
  """The row kernel of ``path``: the native kernel, or the portable sort2."""
  return _order.use_path("native" if path == "native" else "sort2")


def main():
  path = path_from_command_line()
  out = {"devices": jax.device_count(), "path": path}
  with use_path(path):
    jit_checks(out)
    many_rows_checks(out)
    shard_map_checks(out)
    memory_checks(out)
    if path == "portable":
      export_checks(out)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
