"""lovasz_jax benchmark: loss+grad time and compiled memory beside the peers.

Run with ``make bench`` (``make bench ARGS="--help"`` for options). Every row
is measured in this one run, on this machine: median wall time of a
loss+grad call over ``--repeats`` calls, after a warm-up call (which
compiles). JAX rows run on JAX's default backend (GPU/TPU if present); the
PyTorch rows run on the CPU.

The JAX rows of a shape are timed interleaved, one call of each row per
round, beside optax's cross-entropy at the same shape; "time / CE" is the
median over rounds of each row's time over that round's cross-entropy
time, so a machine that slows down between rounds moves both. The first
section repeats that for the rows users weigh (exact, histogram, and each
added to the cross-entropy, as a train step runs them) in ``--ce-runs``
separate loops, and prints each loop's ratios. ``--stages`` times the
stages of the loss one by one (the native CPU path).

Rows:
  lovasz_jax            jit(value_and_grad(lovasz_softmax))
  lean                  the same with class_chunk_size=4 (memory-lean mode)
  histogram             the same with method="histogram", num_bins=4096
  portable ...          the same modes on the portable XLA path that GPU and
                        TPU run (the native kernel off): its default
                        ("sort2": a pair sort, a second sort to unsort), the
                        variants the accelerator benchmark can time
                        ("scatter", "packed"), and the CPU's choice when the
                        kernel is missing ("packed-rows": packed, one row at
                        a time)
  portable, v0.1.0      the portable path of lovasz_jax 0.1.0 (git commit
                        09619b7), measured in this run in a subprocess: the
                        "before" of the memory work (CPU, needs git)
  threads per call      the same with the kernel built with
                        -DLOVASZ_JAX_SPAWN_THREADS: its former threading,
                        std::threads spawned on every call instead of XLA's
                        intra-op pool (CPU, when a C++ compiler is found)
  native kernel alone   jit of the kernel call on the C x P keys, with the
                        pool and with threads per call
  naive JAX port        argsort + gather + cumsum + dot for each class, jitted
  PyTorch loop          the reference's structure: a loop over classes with
                        sort, gather, cumsum and dot (written here), CPU
  kornia                kornia.losses.lovasz_softmax_loss, CPU
  optax cross-entropy   softmax_cross_entropy_with_integer_labels(...).mean()
                        (the cost users compare against)
  CE + lovasz_jax       the cross-entropy plus the Lovász loss, one
                        value_and_grad (the usual recipe)
  jnp.sort of keys      one jnp.sort of the C x P uint32 keys (the GPU floor)
  np.sort of keys       numpy's sort of the same keys (the CPU floor)
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import lovasz_jax
from lovasz_jax import _cpu, _extension, _order

SHAPES = {
    "2x256x256x21": (2, 256, 256, 21),
    "1x512x512x19": (1, 512, 512, 19),
    "1x64x64x64x8 (3-D)": (1, 64, 64, 64, 8),
}


def _median_ms(fn, repeats):
  fn()  # warm-up (compiles)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def _temp_ratio(jitted, *args):
  try:
    mem = jitted.lower(*args).compile().memory_analysis()
    return mem.temp_size_in_bytes / args[0].nbytes
  except Exception:  # pylint: disable=broad-except
    return float("nan")


SPAWN_TARGET = "lovasz_jax_weights_spawn"
_KERNEL_SOURCE = pathlib.Path(__file__).parent.parent / "lovasz_jax" / "_cpu_kernel.cc"


@functools.cache
def spawn_variant():
  """The kernel with its former per-call threads, registered as SPAWN_TARGET.

  Built here with the flags of setup.py plus -DLOVASZ_JAX_SPAWN_THREADS, so
  that both threadings are timed in one run. None (with the reason printed)
  when there is no C++ compiler or no kernel source.
  """
  cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if cxx is None or not _KERNEL_SOURCE.exists():
    print(f"(no threads-per-call rows: compiler {cxx}, source {_KERNEL_SOURCE})")
    return None
  out = pathlib.Path(tempfile.mkdtemp(prefix="lovasz_jax_bench_")) / "spawn.so"
  subprocess.run([cxx, "-O3", "-g0", "-std=c++17", "-fno-trapping-math", "-shared",
                  "-fPIC", "-pthread",
                  "-DLOVASZ_JAX_SPAWN_THREADS", "-isystem", jax.ffi.include_dir(),
                  str(_KERNEL_SOURCE), "-o", str(out)], check=True)
  lib = ctypes.CDLL(str(out))
  jax.ffi.register_ffi_target(SPAWN_TARGET, jax.ffi.pycapsule(lib.LovaszJaxWeights),
                              platform="cpu")
  return lib


def with_kernel_target(target, fn):
  """Runs fn() with the loss calling the FFI target ``target``."""
  saved = _cpu._TARGET  # pylint: disable=protected-access
  _cpu._TARGET = target  # pylint: disable=protected-access
  jax.clear_caches()
  try:
    return fn()
  finally:
    _cpu._TARGET = saved  # pylint: disable=protected-access
    jax.clear_caches()


PREVIOUS = "09619b7"  # lovasz_jax 0.1.0, before the portable path's memory work

_PREVIOUS_SCRIPT = """
import functools, json, statistics, sys, time
import jax, jax.numpy as jnp
import lovasz_jax
shape, repeats = tuple(json.loads(sys.argv[1])), int(sys.argv[2])
kx, ky = jax.random.split(jax.random.key(0))
logits = jax.random.normal(kx, shape, jnp.float32)
labels = jax.random.randint(ky, shape[:-1], 0, shape[-1])
out = {}
for label, kwargs in json.loads(sys.argv[3]).items():
  fn = jax.jit(jax.value_and_grad(functools.partial(lovasz_jax.lovasz_softmax, **kwargs)))
  temp = fn.lower(logits, labels).compile().memory_analysis().temp_size_in_bytes
  jax.block_until_ready(fn(logits, labels))
  times = []
  for _ in range(repeats):
    t = time.perf_counter(); jax.block_until_ready(fn(logits, labels))
    times.append(time.perf_counter() - t)
  out[label] = (statistics.median(times) * 1e3, temp / logits.nbytes)
print(json.dumps(out))
"""


def previous_portable(shape, repeats):
  """The portable path of lovasz_jax 0.1.0, timed in a subprocess (needs git)."""
  root = pathlib.Path(__file__).parent.parent
  modes = {"": {}, " lean (class_chunk_size=4)": dict(class_chunk_size=4),
           " histogram (4096 bins)": dict(method="histogram")}
  with tempfile.TemporaryDirectory(prefix="lovasz_jax_previous_") as tmp:
    archive = subprocess.run(["git", "archive", PREVIOUS, "lovasz_jax"], cwd=root,
                             capture_output=True, check=False)
    if archive.returncode != 0:
      return {f"portable, v0.1.0{label}": ("n/a (no git history)", None) for label in modes}
    subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
    env = dict(os.environ, PYTHONPATH=tmp, LOVASZ_JAX_CPU_KERNEL="0",
               LOVASZ_JAX_CACHE=os.path.join(tmp, "cache"))
    proc = subprocess.run(
        [sys.executable, "-c", _PREVIOUS_SCRIPT, json.dumps(shape), str(repeats),
         json.dumps(modes)], cwd=tmp, env=env, capture_output=True, text=True, check=True)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  return {f"portable{label}, v0.1.0 (before)": tuple(v) for label, v in result.items()}


def naive_jax_loss(logits, labels):
  """A direct port: argsort and gather for each class (loop unrolled by jit)."""
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1).reshape(-1, num_classes)
  labels = labels.reshape(-1)
  losses, counted = [], []
  for c in range(num_classes):
    fg = (labels == c).astype(probs.dtype)
    errors = jnp.abs(fg - probs[:, c])
    perm = jnp.argsort(-errors)
    errors_sorted, fg_sorted = errors[perm], fg[perm]
    gts = fg_sorted.sum()
    intersection = gts - jnp.cumsum(fg_sorted)
    union = gts + jnp.cumsum(1 - fg_sorted)
    jaccard = 1 - intersection / union
    grad = jnp.concatenate([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    losses.append(errors_sorted @ grad)
    counted.append(gts > 0)
  losses, counted = jnp.stack(losses), jnp.stack(counted)
  return jnp.sum(jnp.where(counted, losses, 0)) / jnp.maximum(counted.sum(), 1)


def torch_reference_loop(logits, labels):
  """The reference's structure in PyTorch (written here): a loop over classes
  with sort, gather, cumsum and dot. ``logits`` are NCHW."""
  import torch  # pylint: disable=import-outside-toplevel
  probs = logits.softmax(1)
  num_classes = probs.shape[1]
  probs = probs.movedim(1, -1).reshape(-1, num_classes)
  labels = labels.reshape(-1)
  losses = []
  for c in range(num_classes):
    fg = (labels == c).float()
    if fg.sum() == 0:
      continue
    errors = (fg - probs[:, c]).abs()
    errors_sorted, perm = torch.sort(errors, 0, descending=True)
    fg_sorted = fg[perm]
    gts = fg_sorted.sum()
    intersection = gts - fg_sorted.cumsum(0)
    union = gts + (1 - fg_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    losses.append(torch.dot(errors_sorted, jaccard))
  return torch.stack(losses).mean()


def torch_rows(shape, logits_np, labels_np, repeats):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return {}
  x = torch.tensor(np.moveaxis(logits_np, -1, 1).copy(), requires_grad=True)
  y = torch.tensor(labels_np, dtype=torch.long)

  reference_loop = torch_reference_loop

  def run(loss_fn):
    x.grad = None
    loss_fn(x, y).backward()

  rows = {"PyTorch loop (CPU)": _median_ms(lambda: run(reference_loop), repeats)}
  try:
    import kornia  # pylint: disable=import-outside-toplevel
    rows["kornia (CPU)"] = _median_ms(
        lambda: run(kornia.losses.lovasz_softmax_loss), repeats)
  except Exception as e:  # pylint: disable=broad-except
    rows["kornia (CPU)"] = f"n/a ({type(e).__name__})"
  return rows


def _data(shape):
  key_x, key_y = jax.random.split(jax.random.key(0))
  logits = jax.random.normal(key_x, shape, jnp.float32)
  labels = jax.random.randint(key_y, shape[:-1], 0, shape[-1])
  return logits, labels


def cross_entropy(logits, labels):
  import optax  # pylint: disable=import-outside-toplevel
  return jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels))


CE = "optax cross-entropy"


def interleaved(fns, repeats):
  """Median ms and median ratio to ``fns[CE]`` of each of ``fns``, interleaved.

  Each round calls every function once, in order; a row's ratio in a round
  is its time over the cross-entropy's time in that round.
  """
  for fn in fns.values():
    fn()  # warm-up (compiles)
  times = {label: [] for label in fns}
  for _ in range(repeats):
    for label, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[label].append(time.perf_counter() - start)
  ce = times.get(CE)
  return {label: (statistics.median(t) * 1e3,
                  None if ce is None else statistics.median(a / b for a, b in zip(t, ce)))
          for label, t in times.items()}


def _loss_grad(loss_fn, logits, labels):
  fn = jax.jit(jax.value_and_grad(loss_fn))
  return fn, lambda: jax.block_until_ready(fn(logits, labels))


def ce_rows(logits, labels):
  """The rows users weigh against the cross-entropy, as loss+grad calls."""
  hist = functools.partial(lovasz_jax.lovasz_softmax, method="histogram")
  rows = {CE: cross_entropy, "lovasz_jax (exact)": lovasz_jax.lovasz_softmax,
          "lovasz_jax histogram": hist,
          "CE + lovasz_jax (exact)": lambda x, y: cross_entropy(x, y) + lovasz_jax.lovasz_softmax(x, y),
          "CE + lovasz_jax histogram": lambda x, y: cross_entropy(x, y) + hist(x, y)}
  return {label: _loss_grad(fn, logits, labels)[1] for label, fn in rows.items()}


def bench_ce(shapes, repeats, runs):
  """Each loss's time over the cross-entropy's, in ``runs`` separate loops."""
  print(f"\n### Time over optax's cross-entropy (loss+grad, interleaved, medians of "
        f"{repeats} rounds; {runs} runs)\n")
  labels = list(ce_rows(*_data((1, 8, 8, 3))))[1:]
  print("| shape | run | cross-entropy ms | " + " | ".join(labels) + " |")
  print("|---|---:|---:|" + "---:|" * len(labels))
  for name in shapes:
    fns = ce_rows(*_data(SHAPES[name]))
    for run in range(runs):
      res = interleaved(fns, repeats)
      print(f"| {name} | {run + 1} | {res[CE][0]:.1f} | "
            + " | ".join(f"{res[label][1]:.2f}x" for label in labels) + " |", flush=True)


def stage_fns(shape):
  """The native CPU path's stages, each jitted alone, on this shape's data."""
  # pylint: disable=import-outside-toplevel
  from lovasz_jax import _inputs
  logits, labels = _data(shape)
  num_classes = shape[-1]

  def prologue(y):  # the label checks before the rows
    valid = jnp.ones(y.shape, bool)
    bad = _inputs.has_bad_labels(y, valid, 0, num_classes)
    return _inputs.narrow_labels(y, valid, 0, num_classes), bad

  lab, _ = jax.jit(prologue)(labels)
  x, lab = logits.reshape(1, -1, num_classes), lab.reshape(1, -1)
  encode = jax.jit(lambda v, y: _cpu.encode_rows(v, y, 0, True))
  keys, lse, _ = encode(x, lab)
  stages = {
      "label checks (XLA)": (jax.jit(prologue), (labels,)),
      "softmax, checks and keys of every class row (native)": (encode, (x, lab)),
  }
  w, _ = jax.jit(_cpu.exact_weights)(keys)
  encode_counts = jax.jit(lambda v, y: _cpu.encode_counts(v, y, 4096, True))
  counts, _, _ = encode_counts(x, lab)
  omega, _ = jax.jit(lambda c: _cpu.slot_weights(c, 4096, jnp.float32))(counts)
  stages.update({
      "sort and walk of the rows (native)": (jax.jit(_cpu.exact_weights), (keys,)),
      "present classes (native)": (
          jax.jit(lambda y: _cpu.class_counts(y, num_classes) > 0), (lab,)),
      "gradient from the weights (native)": (
          jax.jit(lambda v, l, y, u, c: _cpu.rows_grad(v, l, y, u, c, True)),
          (x, lse, lab, w, jnp.ones((1, num_classes)))),
      "histogram: softmax, checks and counts of the keys (native)": (
          encode_counts, (x, lab)),
      "histogram: slot weights (native)": (
          jax.jit(lambda c: _cpu.slot_weights(c, 4096, jnp.float32)), (counts,)),
      "histogram: gradient, keys recomputed and slots looked up (native)": (
          jax.jit(lambda v, y, o, c: _cpu.rows_grad_table(v, y, o, c, True)),
          (x, lab, omega, jnp.ones((1, num_classes)))),
  })
  fns = {CE: _loss_grad(cross_entropy, logits, labels)[1]}
  for label, (fn, args) in stages.items():
    fns[label] = functools.partial(lambda f, a: jax.block_until_ready(f(*a)), fn, args)
  fns["whole loss+grad, exact"] = _loss_grad(lovasz_jax.lovasz_softmax, logits, labels)[1]
  fns["whole loss+grad, histogram"] = _loss_grad(
      functools.partial(lovasz_jax.lovasz_softmax, method="histogram"), logits, labels)[1]
  return fns


def bench_stages(shapes, repeats):
  print(f"\n### Stages of the loss on the native CPU path (each jitted alone, "
        f"interleaved, medians of {repeats} rounds)\n")
  print("| stage | " + " | ".join(shapes) + " |")
  print("|---|" + "---:|" * len(shapes))
  results = [interleaved(stage_fns(SHAPES[name]), repeats) for name in shapes]
  for label in results[0]:
    print(f"| {label} | " + " | ".join(
        f"{r[label][0]:.2f} ms ({r[label][1]:.2f}x CE)" for r in results) + " |")


def bench_shape(name, shape, repeats, with_torch):
  del name
  logits, labels = _data(shape)
  fns, temps = {}, {}

  def add(label, loss_fn, memory=True):
    fn, call = _loss_grad(loss_fn, logits, labels)
    fns[label] = call
    temps[label] = _temp_ratio(fn, logits, labels) if memory else None

  modes = {"": {}, " lean (class_chunk_size=4)": dict(class_chunk_size=4),
           " histogram (4096 bins)": dict(method="histogram")}
  for label, kwargs in modes.items():
    add("lovasz_jax" + label, functools.partial(lovasz_jax.lovasz_softmax, **kwargs))
  try:
    add(CE, cross_entropy)
    add("CE + lovasz_jax", lambda x, y: cross_entropy(x, y) + lovasz_jax.lovasz_softmax(x, y))
    add("CE + lovasz_jax histogram", lambda x, y: cross_entropy(x, y) + lovasz_jax.lovasz_softmax(
        x, y, method="histogram"))
  except ImportError:
    pass
  add("naive JAX port", naive_jax_loss)
  rows = {label: (ms, ce, temps[label]) for label, (ms, ce) in interleaved(fns, repeats).items()}
  if jax.default_backend() == "cpu" and _cpu.available():
    for path in ("sort2", "scatter", "packed", "packed-rows"):
      with _order.use_path(path):  # (it clears JAX's caches on the way out)
        portable, temps_p = {CE: _loss_grad(cross_entropy, logits, labels)[1]}, {}
        for label, kwargs in modes.items():
          if path != "sort2" and kwargs:
            continue  # the variants differ in exact mode only
          fn, call = _loss_grad(functools.partial(lovasz_jax.lovasz_softmax, **kwargs),
                                logits, labels)
          name = f"portable{label}, {path}" + (
              " (GPU/TPU default)" if path == "sort2" else
              " (CPU default without the kernel)" if path == "packed-rows" else "")
          portable[name], temps_p[name] = call, _temp_ratio(fn, logits, labels)
        timed = interleaved(portable, repeats)
      rows.update({k: (timed[k][0], timed[k][1], temps_p[k]) for k in temps_p})
    rows.update({k: (ms, None, temp) for k, (ms, temp) in previous_portable(shape, repeats).items()})
    if spawn_variant() is not None:
      def spawn_row():
        fn, call = _loss_grad(lovasz_jax.lovasz_softmax, logits, labels)
        return _median_ms(call, repeats), _temp_ratio(fn, logits, labels)
      ms, temp = with_kernel_target(SPAWN_TARGET, spawn_row)
      rows["lovasz_jax, kernel threads per call (before the pool)"] = (ms, None, temp)
  if with_torch:
    rows.update({k: (v, None, None) for k, v in torch_rows(
        shape, np.asarray(logits), np.asarray(labels), repeats).items()})
  # Floors: one sort of the C x P keys.
  errors = jnp.abs(jax.nn.softmax(logits, -1) - jax.nn.one_hot(labels, shape[-1]))
  keys = _extension.encode_keys(
      jnp.moveaxis(errors, -1, 0).reshape(shape[-1], -1),
      jnp.moveaxis(jax.nn.one_hot(labels, shape[-1], dtype=bool), -1, 0).reshape(shape[-1], -1),
      jnp.ones((shape[-1], errors[..., 0].size), bool))
  sort = jax.jit(lambda k: jnp.sort(k, axis=-1))
  rows["floor: jnp.sort of C x P keys"] = (
      _median_ms(lambda: jax.block_until_ready(sort(keys)), repeats), None, None)
  keys_np = np.asarray(keys)
  rows["floor: np.sort of C x P keys (CPU)"] = (
      _median_ms(lambda: np.sort(keys_np, axis=-1), repeats), None, None)
  if jax.default_backend() == "cpu" and _cpu.available():
    # The kernel alone: on the C x P keys, and on the first 4 x 2^14 of them
    # (the smallest call that is shared out), where starting threads weighs
    # most.
    small = keys[:4, :2**14]
    for label, k in (("C x P keys", keys), ("4 x 16384 keys", small)):
      def time_kernel(k=k):
        kernel = jax.jit(_cpu.exact_weights)
        return _median_ms(lambda: jax.block_until_ready(kernel(k)), repeats)
      rows[f"native kernel alone, {label}, thread pool"] = (time_kernel(), None, None)
      if spawn_variant() is not None:
        rows[f"native kernel alone, {label}, threads per call (before)"] = (
            with_kernel_target(SPAWN_TARGET, time_kernel), None, None)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=7, help="timed calls per row (median)")
  parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES),
                      help="which shapes to run")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
  parser.add_argument("--no-multidevice", action="store_true",
                      help="skip the multi-device section (benchmarks/multidevice.py)")
  parser.add_argument("--ce-runs", type=int, default=3,
                      help="separate interleaved loops of the cross-entropy comparison")
  parser.add_argument("--stages", action="store_true",
                      help="also time the stages of the loss (native CPU path)")
  parser.add_argument("--only-ce", action="store_true",
                      help="only the cross-entropy comparison (and --stages)")
  args = parser.parse_args(argv)
  print(f"lovasz_jax {lovasz_jax.__version__}, jax {jax.__version__}, backend "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPU cores, {platform.machine()}; medians of "
        f"{args.repeats} loss+grad calls")
  if args.ce_runs:
    bench_ce(args.shapes, args.repeats, args.ce_runs)
  if args.stages and jax.default_backend() == "cpu" and _cpu.available():
    bench_stages(args.shapes, args.repeats)
  if args.only_ce:
    return
  for name in args.shapes:
    shape = SHAPES[name]
    rows = bench_shape(name, shape, args.repeats, not args.no_torch)
    ours = rows["lovasz_jax"][0]
    print(f"\n### {name} (logits {np.prod(shape) * 4 / 2**20:.1f} MiB)\n")
    print("| row | median ms | time / CE (interleaved) | time / lovasz_jax | "
          "compiled temp / logits bytes |")
    print("|---|---:|---:|---:|---:|")
    for label, (ms, ce, ratio) in rows.items():
      if isinstance(ms, str):
        print(f"| {label} | {ms} | | | |")
        continue
      ratio_s = "" if ratio is None else f"{ratio:.2f}x"
      ce_s = "" if ce is None else f"{ce:.2f}x"
      ms_s = f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"
      print(f"| {label} | {ms_s} | {ce_s} | {ms / ours:.2f}x | {ratio_s} |")
  if not args.no_multidevice:
    # Its own process: the host device count is set before JAX starts.
    sys.stdout.flush()
    subprocess.run([sys.executable, "-m", "benchmarks.multidevice"], check=True,
                   cwd=pathlib.Path(__file__).parent.parent)


if __name__ == "__main__":
  main()
