"""Sharded-jit checks, run by tests/test_sharding.py in a subprocess.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX
starts, so this runs as its own process. It prints one JSON line of results.
"""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import lovasz_jax

_COLLECTIVE = re.compile(
    r"= (\S+) (all-gather|all-to-all|all-reduce|reduce-scatter|collective-permute)"
    r"(?:-start)?\(")


def collectives(compiled_text):
  """[(op, result shape)] of every collective in the compiled HLO."""
  return [(op, shape) for shape, op in _COLLECTIVE.findall(compiled_text)]


def shape_elements(shape):
  dims = re.findall(r"\[([\d,]*)\]", shape)
  return sum(int(np.prod([int(d) for d in ds.split(",") if d])) for ds in dims)


def main():
  assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", ""), (
      "run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(8, 32, 32, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (8, 32, 32))
  labels[3] = 255  # one all-void image
  out = {"devices": jax.device_count()}
  meshes = {
      "explicit": jax.make_mesh((8,), ("data",)),  # explicit axis types
      "auto": jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
  }
  for kind, mesh in meshes.items():
    shard = NamedSharding(mesh, P("data"))
    xs, ys = jax.device_put(logits, shard), jax.device_put(labels, shard)
    for name, fn in {
        "batch": functools.partial(lovasz_jax.lovasz_softmax, ignore_index=255),
        "per_image": functools.partial(lovasz_jax.lovasz_softmax, ignore_index=255,
                                       per_image=True),
        "per_image_lean": functools.partial(lovasz_jax.lovasz_softmax, ignore_index=255,
                                            per_image=True, class_chunk_size=2),
        "hinge": lambda x, y: lovasz_jax.lovasz_hinge(x[..., 0], (y == 1).astype(jnp.int32)),
        "sigmoid_multilabel": lambda x, y: lovasz_jax.lovasz_sigmoid(
            x, jax.nn.one_hot(y, 5, dtype=jnp.int32), axis=-1, per_image=True,
            where=jnp.broadcast_to((y != 255)[..., None], x.shape)),
        "batch_hist": functools.partial(lovasz_jax.lovasz_softmax, ignore_index=255,
                                        method="histogram"),
        "per_image_hist": functools.partial(lovasz_jax.lovasz_softmax, ignore_index=255,
                                            per_image=True, method="histogram"),
    }.items():
      step = jax.jit(jax.value_and_grad(fn))
      v1, g1 = step(logits, labels)             # one device
      v8, g8 = step(xs, ys)                     # sharded over 8
      text = step.lower(xs, ys).compile().as_text()
      colls = collectives(text)
      out[f"{kind}/{name}"] = {
          "value_single": float(v1), "value_sharded": float(v8),
          "grad_max_abs_diff": float(jnp.max(jnp.abs(g1 - g8))),
          # Axis by axis (the spec's repr differs between jax versions).
          "grad_spec": [None if a is None else str(a) for a in g8.sharding.spec],
          "collectives": sorted({op for op, _ in colls}),
          "largest_collective_elements": max([shape_elements(s) for _, s in colls] or [0]),
          "all_gather_bytes": sum(shape_elements(s) * 4 for op, s in colls
                                  if op == "all-gather"),
      }
  mesh = meshes["explicit"]
  shard = NamedSharding(mesh, P("data"))
  # The README's shard_map recipe: per-device per_image losses, pmean'd.
  w = jnp.asarray(rng.normal(size=(5, 5)).astype(np.float32))

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                     out_specs=(P(), P()))
  def grads_fn(params, images, targets):
    def loss_fn(params):
      local = lovasz_jax.lovasz_softmax(images @ params, targets, per_image=True)
      return jax.lax.pmean(local, "data")   # the mean over devices
    return jax.value_and_grad(loss_fn)(params)

  labels_ok = rng.integers(0, 5, (8, 32, 32))
  loss_sm, grads_sm = grads_fn(w, jax.device_put(logits, shard),
                               jax.device_put(labels_ok, shard))
  loss_ref, grads_ref = jax.value_and_grad(
      lambda p: lovasz_jax.lovasz_softmax(logits @ p, labels_ok, per_image=True))(w)
  out["shard_map"] = {"loss": float(loss_sm), "loss_ref": float(loss_ref),
                      "grad_max_abs_diff": float(jnp.max(jnp.abs(grads_sm - grads_ref)))}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
