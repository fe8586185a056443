"""The global batch's loss at the full size of issue "Batch mode across devices".

Batch (16,256,256,21) sharded over 8 host devices, K = 4096: the value and
gradient of the sharded loss equal the one-device loss of the whole batch
within 1e-5 relative. It checks both methods, on an explicit mesh (sharded
arguments), an automatic mesh under ``jax.set_mesh``, and ``shard_map`` with
``axis_name``. The tests check the same at small sizes
(tests/sharded_check.py); this run is heavier (about a minute per path on 2
cores), so CI runs it after ``make test`` (``make check-full-size``).

Run: XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  python -m tests.full_size_check --path native|portable
"""

import contextlib
import functools
import sys
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import lovasz_jax
from tests import sharded_check

SHAPE = (16, 256, 256, 21)
RTOL = 1e-5


def main():
  path = sharded_check.path_from_command_line()
  rng = np.random.default_rng(0)
  logits = rng.normal(size=SHAPE).astype(np.float32)
  labels = rng.integers(0, SHAPE[-1], SHAPE[:-1]).astype(np.int32)
  labels[:, :32] = 255                                  # some void pixels
  labels[labels == 7] = 3                               # an absent class
  methods = {"exact": {}, "histogram": dict(method="histogram", num_bins=4096)}
  meshes = sharded_check._meshes()   # explicit and automatic, over "data"
  failures = []
  with sharded_check.use_path(path):
    for method, kwargs in methods.items():
      loss = functools.partial(lovasz_jax.lovasz_softmax, ignore_index=255, **kwargs)
      step = jax.jit(jax.value_and_grad(loss))
      v1, g1 = step(logits, labels)                     # one device
      g1 = np.asarray(g1)
      scale = float(np.max(np.abs(g1)))
      runs = {}
      for kind, mesh in meshes.items():
        shard = NamedSharding(mesh, P("data"))
        xs, ys = jax.device_put(logits, shard), jax.device_put(labels, shard)
        with jax.set_mesh(mesh) if kind == "auto" else contextlib.nullcontext():
          runs[kind] = step(xs, ys)
      mesh = meshes["explicit"]

      @jax.jit
      @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data")),
                         out_specs=(P(), P("data")))
      def sharded_step(x, y, loss=loss):
        return jax.value_and_grad(lambda x: loss(x, y, axis_name="data"))(x)

      shard = NamedSharding(mesh, P("data"))
      runs["shard_map"] = sharded_step(jax.device_put(logits, shard),
                                       jax.device_put(labels, shard))
      for kind, (v8, g8) in runs.items():
        v_err = abs(float(v8) - float(v1)) / abs(float(v1))
        g_err = float(np.max(np.abs(np.asarray(g8) - g1))) / scale
        ok = v_err <= RTOL and g_err <= RTOL
        print(f"{path:9s} {method:9s} {kind:9s} loss {float(v8):.7f} vs {float(v1):.7f} "
              f"(rel. {v_err:.1e}), gradient max abs diff / max abs {g_err:.1e} "
              f"{'ok' if ok else 'FAIL'}", flush=True)
        if not ok:
          failures.append(f"{method}/{kind}")
  if failures:
    sys.exit(f"FAILED: {failures}")


if __name__ == "__main__":
  start = time.perf_counter()
  main()
  print(f"done in {time.perf_counter() - start:.0f} s")
