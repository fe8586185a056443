"""lovasz_jax benchmark: loss+grad time and compiled memory beside the peers.

Run with ``make bench`` (``make bench ARGS="--help"`` for options). Every row
is measured in this one run, on this machine: median wall time of a
loss+grad call over ``--repeats`` calls, after a warm-up call (which
compiles). JAX rows run on JAX's default backend (GPU/TPU if present); the
PyTorch rows run on the CPU.

Rows:
  lovasz_jax            jit(value_and_grad(lovasz_softmax))
  lean                  the same with class_chunk_size=4 (memory-lean mode)
  histogram             the same with method="histogram", num_bins=4096
  portable ...          the same modes on the portable XLA path that GPU and
                        TPU run (the native kernel off): its default
                        ("sort2": a pair sort, a second sort to unsort) and
                        the variants the accelerator benchmark can time
                        ("scatter", "packed")
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
  optax cross-entropy   softmax_cross_entropy_with_integer_labels (the cost
                        users compare against)
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
  subprocess.run([cxx, "-O3", "-g0", "-std=c++17", "-shared", "-fPIC", "-pthread",
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


def bench_shape(name, shape, repeats, with_torch):
  key_x, key_y = jax.random.split(jax.random.key(0))
  logits = jax.random.normal(key_x, shape, jnp.float32)
  labels = jax.random.randint(key_y, shape[:-1], 0, shape[-1])
  rows = {}

  def time_jax(label, loss_fn, memory=True):
    fn = jax.jit(jax.value_and_grad(loss_fn))
    rows[label] = (_median_ms(lambda: jax.block_until_ready(fn(logits, labels)), repeats),
                   _temp_ratio(fn, logits, labels) if memory else None)

  modes = {"": {}, " lean (class_chunk_size=4)": dict(class_chunk_size=4),
           " histogram (4096 bins)": dict(method="histogram")}
  for label, kwargs in modes.items():
    time_jax("lovasz_jax" + label, functools.partial(lovasz_jax.lovasz_softmax, **kwargs))
  if jax.default_backend() == "cpu" and _cpu.available():
    for path in ("sort2", "scatter", "packed"):
      with _order.use_path(path):
        for label, kwargs in modes.items():
          if path != "sort2" and kwargs:
            continue  # the variants differ in exact mode only
          time_jax(f"portable{label}, {path}" + (" (default)" if path == "sort2" else ""),
                   functools.partial(lovasz_jax.lovasz_softmax, **kwargs))
    rows.update(previous_portable(shape, repeats))
    if spawn_variant() is not None:
      with_kernel_target(SPAWN_TARGET, lambda: time_jax(
          "lovasz_jax, kernel threads per call (before the pool)",
          lovasz_jax.lovasz_softmax))
  time_jax("naive JAX port", naive_jax_loss)
  try:
    import optax  # pylint: disable=import-outside-toplevel
    time_jax("optax cross-entropy", lambda x, y: jnp.mean(
        optax.losses.softmax_cross_entropy_with_integer_labels(x, y)))
  except ImportError:
    pass
  if with_torch:
    rows.update({k: (v, None) for k, v in torch_rows(
        shape, np.asarray(logits), np.asarray(labels), repeats).items()})
  # Floors: one sort of the C x P keys.
  errors = jnp.abs(jax.nn.softmax(logits, -1) - jax.nn.one_hot(labels, shape[-1]))
  keys = _extension.encode_keys(
      jnp.moveaxis(errors, -1, 0).reshape(shape[-1], -1),
      jnp.moveaxis(jax.nn.one_hot(labels, shape[-1], dtype=bool), -1, 0).reshape(shape[-1], -1),
      jnp.ones((shape[-1], errors[..., 0].size), bool))
  sort = jax.jit(lambda k: jnp.sort(k, axis=-1))
  rows["floor: jnp.sort of C x P keys"] = (
      _median_ms(lambda: jax.block_until_ready(sort(keys)), repeats), None)
  keys_np = np.asarray(keys)
  rows["floor: np.sort of C x P keys (CPU)"] = (
      _median_ms(lambda: np.sort(keys_np, axis=-1), repeats), None)
  if jax.default_backend() == "cpu" and _cpu.available():
    # The kernel alone: on the C x P keys, and on the first 4 x 2^14 of them
    # (the smallest call that is shared out), where starting threads weighs
    # most.
    small = keys[:4, :2**14]
    for label, k in (("C x P keys", keys), ("4 x 16384 keys", small)):
      def time_kernel(k=k):
        kernel = jax.jit(_cpu.exact_weights)
        return _median_ms(lambda: jax.block_until_ready(kernel(k)), repeats)
      rows[f"native kernel alone, {label}, thread pool"] = (time_kernel(), None)
      if spawn_variant() is not None:
        rows[f"native kernel alone, {label}, threads per call (before)"] = (
            with_kernel_target(SPAWN_TARGET, time_kernel), None)
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
  args = parser.parse_args(argv)
  print(f"lovasz_jax {lovasz_jax.__version__}, jax {jax.__version__}, backend "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPU cores, {platform.machine()}; medians of "
        f"{args.repeats} loss+grad calls")
  for name in args.shapes:
    shape = SHAPES[name]
    rows = bench_shape(name, shape, args.repeats, not args.no_torch)
    ours = rows["lovasz_jax"][0]
    print(f"\n### {name} (logits {np.prod(shape) * 4 / 2**20:.1f} MiB)\n")
    print("| row | median ms | time / lovasz_jax | compiled temp / logits bytes |")
    print("|---|---:|---:|---:|")
    for label, (ms, ratio) in rows.items():
      if isinstance(ms, str):
        print(f"| {label} | {ms} | | |")
        continue
      ratio_s = "" if ratio is None else f"{ratio:.2f}x"
      ms_s = f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"
      print(f"| {label} | {ms_s} | {ms / ours:.2f}x | {ratio_s} |")
  if not args.no_multidevice:
    # Its own process: the host device count is set before JAX starts.
    sys.stdout.flush()
    subprocess.run([sys.executable, "-m", "benchmarks.multidevice"], check=True,
                   cwd=pathlib.Path(__file__).parent.parent)


if __name__ == "__main__":
  main()
