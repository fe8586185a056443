"""Two JAX processes x 4 CPU devices on localhost: `make check-multihost`.

The launcher (``python -m tests.multihost_check``) starts two worker
processes of this file that join one ``jax.distributed`` run over a free
localhost port (CPU collectives: gloo), each under a time limit, so that a
hang fails fast. Each worker builds the same global arrays on a mesh of all
8 devices, runs every loss and metric on them (eagerly, under ``jax.jit``,
under ``jax.set_mesh``, and inside ``shard_map``), and compares each result
with the same computation on one of its own devices (one process's result).
Bad input must raise the same ``ValueError`` on both processes. Both paths
(the native CPU kernel and the portable XLA path) run in one worker.

The launcher checks what both workers report and exits non-zero on any
mismatch, error or time-out; it retries once with a new port if the first
one was taken.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import subprocess
import sys
import time

TIME_LIMIT_S = 600  # per worker; on 2 cores the whole run takes about 2-3 min
NUM_PROCESSES = 2
LOCAL_DEVICES = 4


# -- the launcher -------------------------------------------------------------

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(port: int, paths: list[str]) -> tuple[list[dict | None], list[str], bool]:
  """Runs the workers; returns their reports, their stderr, and port trouble."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(LOCAL_DEVICES), PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  env.pop("LOVASZ_JAX_CPU_KERNEL", None)
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.multihost_check", "--worker", str(i),
       "--port", str(port), "--paths", ",".join(paths)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(NUM_PROCESSES)]
  deadline = time.monotonic() + TIME_LIMIT_S
  reports, errors = [], []
  for proc in procs:
    try:
      stdout, stderr = proc.communicate(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      stdout, stderr = proc.communicate()
      stderr += f"\nworker timed out after {TIME_LIMIT_S} s (a hang?)"
    lines = [l for l in stdout.splitlines() if l.startswith("{")]
    reports.append(json.loads(lines[-1]) if proc.returncode == 0 and lines else None)
    errors.append(stderr)
  taken = any("address already in use" in e.lower() for e in errors)
  return reports, errors, taken


def _failures(report: dict) -> list[str]:
  """What a worker's report says went wrong (empty when all is well)."""
  bad = []
  for key, r in report["results"].items():
    kind = r["kind"]
    if kind == "loss":
      tol = 1e-5 * max(1.0, abs(r["single"]))
      if not abs(r["value"] - r["single"]) <= tol:
        bad.append(f"{key}: value {r['value']} != one process's {r['single']}")
      if "grad_diff" in r and not r["grad_diff"] <= 1e-5 * max(r["grad_scale"], 1e-12):
        bad.append(f"{key}: gradient differs by {r['grad_diff']} (scale {r['grad_scale']})")
    elif kind == "exact":
      if not r["equal"]:
        bad.append(f"{key}: {r['got']} != one process's {r['want']}")
    elif kind == "raises":
      if r["error"] is None or not all(s in r["error"] for s in r["must_name"]):
        bad.append(f"{key}: expected a ValueError naming {r['must_name']}, got {r['error']!r}")
    elif kind == "nan":
      if not r["is_nan"]:
        bad.append(f"{key}: expected NaN, got {r['value']}")
  return bad


def launch(paths: list[str]) -> int:
  for attempt in range(2):
    port = _free_port()
    start = time.monotonic()
    reports, errors, taken = _launch(port, paths)
    if taken and attempt == 0:
      print(f"port {port} was taken; retrying with a new port", flush=True)
      continue
    break
  took = time.monotonic() - start
  ok = True
  for i, (report, err) in enumerate(zip(reports, errors)):
    if report is None:
      print(f"process {i} failed:\n{err[-4000:]}")
      ok = False
      continue
    bad = _failures(report)
    print(f"process {i}: {report['devices']} devices ({report['local_devices']} local), "
          f"{len(report['results'])} checks, {len(bad)} failed")
    for line in bad:
      print("  FAIL", line)
    ok &= not bad
  if ok and reports[0]["results"].keys() != reports[1]["results"].keys():
    print("the processes ran different checks")
    ok = False
  if ok:
    # The same errors, word for word, on every process.
    for key, r in reports[0]["results"].items():
      if r["kind"] == "raises" and r["error"] != reports[1]["results"][key]["error"]:
        print(f"{key}: the processes raised different errors")
        ok = False
  print(f"check-multihost: {'passed' if ok else 'FAILED'} in {took:.0f} s")
  return 0 if ok else 1


# -- the worker -----------------------------------------------------------------

def worker(process_id: int, port: int, paths: list[str]) -> None:
  import jax  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=NUM_PROCESSES,
                             process_id=process_id,
                             initialization_timeout=120)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import AxisType, NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  import lovasz_jax  # pylint: disable=import-outside-toplevel
  from lovasz_jax import _order  # pylint: disable=import-outside-toplevel

  assert jax.device_count() == NUM_PROCESSES * LOCAL_DEVICES, jax.devices()
  results: dict[str, dict] = {}
  one = jax.local_devices()[0]

  def global_array(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  def local(x):
    return jax.device_put(np.asarray(x), one)

  def grad_diff(g_global, g_single):
    """Max |difference| over this process's shards of a global gradient."""
    ref = np.asarray(g_single)
    return max(float(np.max(np.abs(np.asarray(s.data) - ref[s.index])))
               for s in g_global.addressable_shards)

  def record_loss(key, value, single, grad=None, grad_single=None):
    r = {"kind": "loss", "value": float(value), "single": float(single)}
    if grad is not None:
      r["grad_diff"] = grad_diff(grad, grad_single)
      r["grad_scale"] = float(np.max(np.abs(np.asarray(grad_single))))
    results[key] = r

  def record_raises(key, fn, must_name):
    try:
      fn()
      error = None
    except ValueError as e:
      error = str(e)
    results[key] = {"kind": "raises", "error": error, "must_name": must_name}

  rng = np.random.default_rng(0)
  num_classes = 5
  logits = rng.normal(size=(8, 12, 10, num_classes)).astype(np.float32)
  labels = rng.integers(0, num_classes, (8, 12, 10)).astype(np.int32)
  labels[3] = 255                       # an all-void image
  labels[5, :4] = 255
  hot = lambda y: jax.nn.one_hot(y, num_classes, dtype=jnp.int32)
  keep = lambda y, x: jnp.broadcast_to((y != 255)[..., None], x.shape)
  softmax = functools.partial(lovasz_jax.lovasz_softmax, ignore_index=255)
  losses = {
      "batch": softmax,
      "batch_hist": functools.partial(softmax, method="histogram"),
      "batch_lean": functools.partial(softmax, class_chunk_size=2),
      "per_image": functools.partial(softmax, per_image=True),
      "per_image_hist": functools.partial(softmax, per_image=True, method="histogram"),
      "per_image_lean": functools.partial(softmax, per_image=True, class_chunk_size=2),
      "sigmoid_multilabel": lambda x, y, **k: lovasz_jax.lovasz_sigmoid(
          x, hot(y), axis=-1, where=keep(y, x), **k),
      "sigmoid_binary": lambda x, y, **k: lovasz_jax.lovasz_sigmoid(
          x[..., 1], (y == 1).astype(jnp.int32), where=y != 255, **k),
      "sigmoid_binary_hist": lambda x, y, **k: lovasz_jax.lovasz_sigmoid(
          x[..., 1], (y == 1).astype(jnp.int32), where=y != 255, method="histogram", **k),
      "hinge": lambda x, y, **k: lovasz_jax.lovasz_hinge(
          x[..., 1], (y == 1).astype(jnp.int32), where=y != 255, **k),
  }
  explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  auto = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  grid = jax.make_mesh((2, 4), ("data", "space"), axis_types=(AxisType.Explicit,) * 2)

  for path in paths:
    with _order.use_path("native" if path == "native" else "sort2"):
      for name, fn in losses.items():
        step = jax.jit(jax.value_and_grad(fn))
        v1, g1 = step(local(logits), local(labels))
        sh = NamedSharding(explicit, P("data"))
        xs, ys = global_array(logits, sh), global_array(labels, sh)
        v8, g8 = step(xs, ys)
        record_loss(f"{path}/explicit/jit/{name}", v8, v1, g8, g1)
        record_loss(f"{path}/explicit/eager/{name}", fn(xs, ys), v1)
        with jax.set_mesh(explicit):
          v8, g8 = step(xs, ys)
        record_loss(f"{path}/explicit/set_mesh/{name}", v8, v1, g8, g1)
        if name in ("batch", "batch_hist", "per_image", "sigmoid_binary"):
          # An automatic mesh, set in context as the README asks.
          sh = NamedSharding(auto, P("data"))
          with jax.set_mesh(auto):
            v8, g8 = step(global_array(logits, sh), global_array(labels, sh))
          record_loss(f"{path}/auto/set_mesh/{name}", v8, v1, g8, g1)

      # shard_map: the batch split (axis_name), and images split over their
      # height too (image_axis_name) for the per-image losses.
      for name in ("batch", "batch_hist", "per_image", "per_image_hist", "hinge"):
        fn = losses[name]
        v1, g1 = jax.jit(jax.value_and_grad(fn))(local(logits), local(labels))
        for mesh, spec, image_axis in ((explicit, P("data"), None),
                                       (grid, P("data", "space"), "space")):
          names = tuple(mesh.axis_names)

          @jax.jit
          @functools.partial(jax.shard_map, mesh=mesh, in_specs=(spec, spec),
                             out_specs=(P(), spec))
          def step(x, y, fn=fn, names=names, image_axis=image_axis):
            extra = {"image_axis_name": image_axis} if image_axis else {}
            return jax.value_and_grad(lambda x: fn(x, y, axis_name=names, **extra))(x)

          sh = NamedSharding(mesh, spec)
          v8, g8 = step(global_array(logits, sh), global_array(labels, sh))
          record_loss(f"{path}/shard_map/{'x'.join(names)}/{name}", v8, v1, g8, g1)

  # The metrics: exact counts, on every layout, eagerly and under jit.
  preds = rng.integers(0, num_classes, labels.shape).astype(np.int32)
  where = rng.random(labels.shape) > 0.2
  cm = functools.partial(lovasz_jax.confusion_matrix, num_classes=num_classes,
                         ignore_index=255)
  want = np.asarray(cm(local(preds), local(labels), where=local(where)))
  want_miou = float(lovasz_jax.mean_iou(want))

  def record_exact(key, got, want):
    if not isinstance(got, list):   # an array (a list: already state words)
      got, want = np.asarray(got).tolist(), np.asarray(want).tolist()
    results[key] = {"kind": "exact", "equal": got == want, "got": got, "want": want}

  for kind, mesh, spec in (("explicit", explicit, P("data")), ("auto", auto, P("data")),
                           ("grid", grid, P("data", "space"))):
    sh = NamedSharding(mesh, spec)
    args = [global_array(a, sh) for a in (preds, labels, where)]
    record_exact(f"metrics/{kind}/eager", cm(*args[:2], where=args[2]), want)
    jitted = jax.jit(cm)(*args[:2], where=args[2])
    record_exact(f"metrics/{kind}/jit", jitted, want)
    with jax.set_mesh(mesh):
      record_exact(f"metrics/{kind}/set_mesh", jax.jit(cm)(*args[:2], where=args[2]), want)
    record_loss(f"metrics/{kind}/mean_iou_eager", lovasz_jax.mean_iou(jitted), want_miou)
    record_loss(f"metrics/{kind}/mean_iou_jit", jax.jit(lovasz_jax.mean_iou)(jitted),
                want_miou)
    names = tuple(mesh.axis_names)

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(spec,) * 3, out_specs=P())
    def counts(p, y, w, names=names):
      return cm(p, y, where=w, axis_name=names)

    record_exact(f"metrics/{kind}/shard_map", counts(*args), want)

  # The streaming state (lovasz_jax.IoUState), eagerly and under jit.
  words = lambda state: [np.asarray(w).tolist() for w in jax.tree.leaves(state)]
  update = lambda s, y, p, w: s.update(y, predictions=p, where=w, ignore_index=255)
  want_state = jax.jit(update)(lovasz_jax.IoUState.empty(num_classes), local(labels),
                               local(preds), local(where))
  for kind, mesh, spec in (("explicit", explicit, P("data")),
                           ("grid", grid, P("data", "space"))):
    sh = NamedSharding(mesh, spec)
    args = [global_array(a, sh) for a in (labels, preds, where)]
    for way, fn in (("jit", jax.jit(update)), ("eager", update)):
      state = fn(lovasz_jax.IoUState.empty(num_classes), *args)
      record_exact(f"iou_state/{kind}/{way}", words(state), words(want_state))
      record_loss(f"iou_state/{kind}/{way}/per_image_miou", state.per_image_miou(),
                  float(want_state.per_image_miou()))

  # Counts that are not replicated: one row of the matrix per device pair.
  c8 = rng.integers(0, 1000, (8, 8)).astype(np.int32)
  c8_global = global_array(c8, NamedSharding(explicit, P("data")))
  record_exact("metrics/iou_per_class/split_counts",
               lovasz_jax.iou_per_class(c8_global), np.asarray(lovasz_jax.iou_per_class(c8)))
  record_loss("metrics/mean_iou/split_counts", lovasz_jax.mean_iou(c8_global),
              float(lovasz_jax.mean_iou(c8)))

  iou_jit = jax.jit(lovasz_jax.iou_per_class)(c8_global)
  record_loss("metrics/iou_per_class/split_counts_jit", 0.0, 0.0, iou_jit,
              np.asarray(lovasz_jax.iou_per_class(c8)))
  record_loss("metrics/mean_iou/split_counts_jit",
              jax.jit(lovasz_jax.mean_iou)(c8_global), float(lovasz_jax.mean_iou(c8)))

  # lovasz_grad of rows split over the processes along the sorted axis.
  fg = rng.random((4, 64)) > 0.6
  fg_global = global_array(fg, NamedSharding(explicit, P(None, "data")))
  want_grad = np.asarray(lovasz_jax.lovasz_grad(local(fg)))
  record_loss("lovasz_grad/split_rows", 0.0, 0.0, lovasz_jax.lovasz_grad(fg_global),
              want_grad)
  record_loss("lovasz_grad/split_rows_jit", 0.0, 0.0,
              jax.jit(lovasz_jax.lovasz_grad)(fg_global), want_grad)

  # Bad input, on the pixels of process 1 only: every process must raise the
  # same ValueError (an error on one and a collective on the other hangs).
  sh = NamedSharding(explicit, P("data"))
  bad_labels = labels.copy()
  bad_labels[7, 0, 0] = 9               # image 7 lies on process 1's devices
  bad_preds = preds.copy()
  bad_preds[6, 1, 1] = -4
  probs = np.array(jax.nn.softmax(local(logits), axis=-1))
  probs[6, 2, 2, 0] = 1.5
  xs, ys_bad = global_array(logits, sh), global_array(bad_labels, sh)
  record_raises("bad/labels/lovasz_softmax", lambda: softmax(xs, ys_bad), ["9", "[0, 5)"])
  record_raises("bad/labels/lovasz_sigmoid", lambda: lovasz_jax.lovasz_sigmoid(
      xs[..., 0], global_array(np.where(bad_labels == 9, 2, bad_labels == 1), sh)),
      ["2", "[0, 2)"])
  record_raises("bad/predictions/confusion_matrix", lambda: cm(
      global_array(bad_preds, sh), global_array(labels, sh)), ["-4", "predictions"])
  record_raises("bad/labels/confusion_matrix", lambda: cm(
      global_array(preds, sh), ys_bad), ["9", "labels"])
  record_raises("bad/probabilities", lambda: softmax(
      global_array(probs, sh), global_array(labels, sh), from_logits=False), ["1.5"])
  bad_counts = c8.copy()
  bad_counts[6, 2] = -7
  record_raises("bad/counts/mean_iou", lambda: lovasz_jax.mean_iou(
      global_array(bad_counts, NamedSharding(explicit, P("data")))), ["-7"])
  # Under jit the same labels give a NaN loss on every process.
  v = jax.jit(softmax)(xs, ys_bad)
  results["bad/labels/jit_nan"] = {"kind": "nan", "is_nan": bool(np.isnan(float(v))),
                                   "value": float(v)}

  print(json.dumps({"devices": jax.device_count(),
                    "local_devices": jax.local_device_count(), "results": results}))
  jax.distributed.shutdown()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--worker", type=int, default=None)
  parser.add_argument("--port", type=int, default=None)
  parser.add_argument("--paths", default=None,
                      help="comma-separated: native,portable (default: both where "
                      "the native kernel is built)")
  args = parser.parse_args()
  if args.paths:
    paths = args.paths.split(",")
  else:
    from lovasz_jax import _cpu  # pylint: disable=import-outside-toplevel
    paths = ["native", "portable"] if _cpu.available() else ["portable"]
  if args.worker is not None:
    worker(args.worker, args.port, paths)
  else:
    sys.exit(launch(paths))


if __name__ == "__main__":
  main()
