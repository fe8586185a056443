"""IoUState over a batch sharded on 8 host devices, run by test_streaming.py.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX
starts, so this runs as its own process. It prints one JSON line: for each
way of sharding, the state's words from the sharded batch and from one
device (or the error raised); the assertions are in test_streaming.py.
"""

import functools
import json
import os
import traceback

import jax
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lovasz_jax import IoUState

VOID = 255


def _error(e):
  return {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"}


def _words(state):
  return [np.asarray(x).tolist() for x in jax.tree.leaves(state)]


def main():
  assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(16, 12, 12, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (16, 12, 12)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.1] = VOID
  labels[3] = VOID  # one all-void image
  where = rng.random(labels.shape) < 0.9
  step = jax.jit(lambda s, y, z, w: s.update(y, logits=z, where=w, ignore_index=VOID))
  single = _words(step(IoUState.empty(5), labels, logits, where))
  out = {"devices": jax.device_count()}
  meshes = {
      # jax.make_mesh's default axis types are Explicit in this jax.
      "explicit": jax.make_mesh((8,), ("data",)),
      "auto": jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,)),
  }
  for name, mesh in (("explicit", meshes["explicit"]), ("auto", meshes["auto"]),
                     ("auto_set_mesh", meshes["auto"])):
    shard = NamedSharding(mesh, P("data"))
    args = jax.device_put((labels, logits, where), shard)
    try:
      if name.endswith("set_mesh"):
        with jax.set_mesh(mesh):
          state = step(IoUState.empty(5), *args)
      else:
        state = step(IoUState.empty(5), *args)
      out[name] = {"sharded": _words(state), "single": single,
                   "batch_sharded": len(args[0].sharding.device_set) == 8}
    except Exception as e:  # pylint: disable=broad-exception-caught
      out[name] = _error(e)
  mesh = meshes["explicit"]

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, out_specs=P(),
                     in_specs=(P(), P("data"), P("data"), P("data")))
  def sharded_step(state, y, z, w):
    return state.update(y, logits=z, where=w, ignore_index=VOID, axis_name="data")

  args = jax.device_put((labels, logits, where), NamedSharding(mesh, P("data")))
  try:
    out["shard_map"] = {"sharded": _words(sharded_step(IoUState.empty(5), *args)),
                        "single": single, "batch_sharded": True}
  except Exception as e:  # pylint: disable=broad-exception-caught
    out["shard_map"] = _error(e)
  # Images split over their height too: a 2-D mesh, on an explicit mesh
  # (jit) and in shard_map with image_axis_name.
  grid = jax.make_mesh((2, 4), ("data", "space"))
  args = jax.device_put((labels, logits, where), NamedSharding(grid, P("data", "space")))
  try:
    out["explicit_split_images"] = {"sharded": _words(step(IoUState.empty(5), *args)),
                                    "single": single, "batch_sharded": True}
  except Exception as e:  # pylint: disable=broad-exception-caught
    out["explicit_split_images"] = _error(e)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=grid, out_specs=P(),
                     in_specs=(P(),) + (P("data", "space"),) * 3)
  def split_step(state, y, z, w):
    return state.update(y, logits=z, where=w, ignore_index=VOID,
                        axis_name=("data", "space"), image_axis_name="space")

  try:
    out["shard_map_split_images"] = {
        "sharded": _words(split_step(IoUState.empty(5), *args)), "single": single,
        "batch_sharded": True}
  except Exception as e:  # pylint: disable=broad-exception-caught
    out["shard_map_split_images"] = _error(e)
  # The Flax NNX metric inside nnx.jit, with the batch sharded.
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel

    import lovasz_jax.nnx  # pylint: disable=import-outside-toplevel

    @nnx.jit
    def nnx_step(metric, y, z, w):
      metric.update(labels=y, logits=z, where=w)

    for name in ("explicit", "auto"):
      args = jax.device_put((labels, logits, where),
                            NamedSharding(meshes[name], P("data")))
      metric = lovasz_jax.nnx.MeanIoU(5, ignore_index=VOID)
      try:
        nnx_step(metric, *args)
        out[f"nnx_{name}"] = {"sharded": _words(metric.state), "single": single,
                              "batch_sharded": True}
      except Exception as e:  # pylint: disable=broad-exception-caught
        out[f"nnx_{name}"] = _error(e)
  except ImportError:
    pass
  print(json.dumps(out))


if __name__ == "__main__":
  main()
