"""One-command accelerator benchmark: ``make bench-gpu`` (or
``python -m benchmarks.accelerator``), a few minutes on one GPU or TPU.

It runs on the Python it is started with, as that Python is: it creates no
venv and installs nothing (an offline GPU box usually has jax with CUDA and
PyTorch already; a pure-Python peer such as kornia can be installed from a
local wheel beforehand). lovasz_jax is imported from this source tree.

Every JAX row runs in its own process, so that the device's peak memory
(``memory_stats()["peak_bytes_in_use"]``, with XLA's preallocation off) is
that row's alone. Each row reports the median of ``--repeats`` loss+grad
calls after a warm-up call, the compiled temp memory as a multiple of the
logits' bytes (``memory_analysis()``), and the peak device memory. Rows:

  lovasz_jax (sort2)     the default: what lax.platform_dependent picks on a
                         GPU or TPU (a stable pair sort; a second sort puts
                         the weights back in pixel order)
  ... scatter, packed    the other ways to order a row (``_order.use_path``):
                         a scatter to put the weights back, or one uint64
                         sort of packed keys
  histogram, lean,       method="histogram"; class_chunk_size=4; per_image
  per_image
  floor: jnp.sort        one jnp.sort of the C x P uint32 keys
  optax cross-entropy    the cost users compare against (each row's time
                         over it is a column; rows run in separate
                         processes, one after another)
  PyTorch loop, kornia   the reference's structure (a loop over classes)
                         and kornia's loss, on the same GPU (torch.cuda)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {"2x256x256x21": (2, 256, 256, 21), "8x512x512x21": (8, 512, 512, 21)}

JAX_ROWS = {
    "lovasz_jax (sort2, the default)": ("sort2", {}),
    "lovasz_jax, scatter to unsort": ("scatter", {}),
    "lovasz_jax, packed uint64 sort": ("packed", {}),
    "lovasz_jax histogram (4096 bins)": (None, {"method": "histogram"}),
    "lovasz_jax lean (class_chunk_size=4)": (None, {"class_chunk_size": 4}),
    "lovasz_jax per_image": (None, {"per_image": True}),
    "floor: jnp.sort of C x P keys": ("floor", {}),
    "optax cross-entropy": ("optax", {}),
}

_ROW_SCRIPT = r"""
import functools, json, statistics, sys, time
import jax, jax.numpy as jnp
import lovasz_jax
from lovasz_jax import _extension, _order
shape, path, kwargs, repeats = (tuple(json.loads(sys.argv[1])), json.loads(sys.argv[2]),
                                json.loads(sys.argv[3]), int(sys.argv[4]))
kx, ky = jax.random.split(jax.random.key(0))
logits = jax.random.normal(kx, shape, jnp.float32)
labels = jax.random.randint(ky, shape[:-1], 0, shape[-1])
if path == "floor":
  c = shape[-1]
  errors = jnp.abs(jax.nn.softmax(logits, -1) - jax.nn.one_hot(labels, c))
  keys = _extension.encode_keys(jnp.moveaxis(errors, -1, 0).reshape(c, -1),
                                jnp.moveaxis(jax.nn.one_hot(labels, c, dtype=bool), -1,
                                             0).reshape(c, -1),
                                jnp.ones((c, errors[..., 0].size), bool))
  fn, args = jax.jit(lambda k: jnp.sort(k, axis=-1)), (keys,)
elif path == "optax":
  import optax
  fn = jax.jit(jax.value_and_grad(lambda x, y: jnp.mean(
      optax.losses.softmax_cross_entropy_with_integer_labels(x, y))))
  args = (logits, labels)
else:
  fn = jax.jit(jax.value_and_grad(functools.partial(lovasz_jax.lovasz_softmax, **kwargs)))
  args = (logits, labels)
with _order.use_path(path if path in _order.PATHS else None):
  compiled = fn.lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes / logits.nbytes
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter(); jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
stats = jax.devices()[0].memory_stats() or {}
print(json.dumps({"ms": statistics.median(times) * 1e3, "temp": temp,
                  "peak": stats.get("peak_bytes_in_use"),
                  "device": jax.devices()[0].device_kind,
                  "backend": jax.default_backend(), "jax": jax.__version__}))
"""


def jax_row(shape, path, kwargs, repeats):
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
             PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(),
                                                      os.environ.get("PYTHONPATH")])))
  proc = subprocess.run([sys.executable, "-c", _ROW_SCRIPT, json.dumps(shape), json.dumps(path),
                         json.dumps(kwargs), str(repeats)],
                        env=env, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    return {"error": proc.stderr.strip().splitlines()[-1][:120] if proc.stderr else "failed"}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def torch_rows(shape, repeats):
  try:
    import numpy as np  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return {"PyTorch loop": {"error": "torch is not installed"}}
  device = "cuda" if torch.cuda.is_available() else "cpu"
  gen = np.random.default_rng(0)
  x = torch.tensor(gen.normal(size=(shape[0], shape[-1]) + shape[1:-1]).astype(np.float32),
                   device=device, requires_grad=True)
  y = torch.tensor(gen.integers(0, shape[-1], (shape[0],) + shape[1:-1]), device=device)

  from benchmarks.bench import torch_reference_loop  # pylint: disable=import-outside-toplevel
  reference_loop = torch_reference_loop

  def measure(loss_fn):
    def step():
      x.grad = None
      loss_fn(x, y).backward()
      if device == "cuda":
        torch.cuda.synchronize()
    step()
    if device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      step()
      times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"ms": statistics.median(times) * 1e3, "peak": peak, "device": device}

  rows = {f"PyTorch loop ({device})": measure(reference_loop)}
  try:
    import kornia  # pylint: disable=import-outside-toplevel
    rows[f"kornia ({device})"] = measure(kornia.losses.lovasz_softmax_loss)
  except Exception as e:  # pylint: disable=broad-except
    rows["kornia"] = {"error": f"{type(e).__name__}: {e}"[:120]}
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=11)
  parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args(argv)
  for name in args.shapes:
    shape = SHAPES[name]
    rows = {label: jax_row(shape, path, kwargs, args.repeats)
            for label, (path, kwargs) in JAX_ROWS.items()}
    if not args.no_torch:
      rows.update(torch_rows(shape, args.repeats))
    first = next(iter(rows.values()))
    print(f"\n### {name} (logits {4 * int(__import__('math').prod(shape)) / 2**20:.1f} "
          f"MiB); jax {first.get('jax')}, {first.get('backend')} ({first.get('device')}); "
          f"medians of {args.repeats}\n")
    print("| row | median ms | time / lovasz_jax | time / cross-entropy | compiled temp "
          "/ logits | peak device memory |")
    print("|---|---:|---:|---:|---:|---:|")
    ours = first.get("ms")
    ce = rows.get("optax cross-entropy", {}).get("ms")
    for label, r in rows.items():
      if "error" in r:
        print(f"| {label} | n/a ({r['error']}) | | | | |")
        continue
      ratio = f"{r['ms'] / ours:.2f}x" if ours else ""
      ce_ratio = f"{r['ms'] / ce:.2f}x" if ce else ""
      temp = f"{r['temp']:.2f}x" if r.get("temp") is not None else ""
      peak = f"{r['peak'] / 2**20:.0f} MiB" if r.get("peak") else ""
      print(f"| {label} | {r['ms']:.2f} | {ratio} | {ce_ratio} | {temp} | {peak} |")
    print("\nTo choose the accelerator's default way to order a row: the fastest of "
          "sort2, scatter and packed whose compiled temp stays within 4x the logits "
          "(the memory target); sort2 is the default until this has run.")


if __name__ == "__main__":
  main()
