"""Per-device memory and traffic of the loss over N = 1, 2, 4 and 8 devices.

Run by ``make bench`` in its own process (the host device count must be set
before JAX starts): ``python -m benchmarks.multidevice``. The batch is
sharded over a ``data`` axis of N host devices (an explicit mesh); each row
is compiled, not run, and reads from the compiled program:

- the compiled temp memory of one device (``memory_analysis()``), and its
  fraction of the one-device program's;
- the bytes each kind of collective moves, summed over the collectives of
  that kind in the compiled HLO (the size of each one's result on a device).

Both paths: the native CPU kernel, and the portable path that GPU and TPU
run (compiled here on CPU with the native kernel off).
"""

from __future__ import annotations

import argparse
import functools
import os
import re

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402  (after the flag)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import lovasz_jax  # noqa: E402
from lovasz_jax import _cpu, _order  # noqa: E402

_KINDS = ("all-reduce", "all-to-all", "all-gather", "reduce-scatter", "collective-permute")
_LINE = re.compile(r"= (.*) (" + "|".join(_KINDS) + r")(?:-start)?\(")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "pred": 1}

MODES = {
    "batch, exact": {},
    "batch, histogram": dict(method="histogram"),
    "per_image": dict(per_image=True),
}


def traffic(text):
  """{collective kind: bytes} summed over the compiled HLO's collectives."""
  out = {}
  for line in text.splitlines():
    m = _LINE.search(line)
    if not m:
      continue
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
      total += _BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
    out[m.group(2)] = out.get(m.group(2), 0) + total
  return out


def _fmt_bytes(n):
  return f"{n / 2**20:.2f} MiB" if n >= 2**20 else (f"{n / 2**10:.1f} KiB" if n >= 2**10
                                                     else f"{n} B")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", default="16x256x256x21", help="logits, B x H x W x C")
  args = parser.parse_args(argv)
  shape = tuple(int(s) for s in args.shape.split("x"))
  paths = (["native"] if _cpu.available() else []) + ["sort2"]
  print(f"\n### Multi-device: logits {'x'.join(map(str, shape))} sharded over N host "
        "devices (compiled, not run)\n")
  print("| path | mode | N | temp per device | of N = 1 | collectives, bytes per device |")
  print("|---|---|---:|---:|---:|---|")
  for path in paths:
    label = "native" if path == "native" else "portable (GPU/TPU)"
    with _order.use_path(path):
      for mode, kwargs in MODES.items():
        fn = jax.jit(jax.value_and_grad(functools.partial(lovasz_jax.lovasz_softmax,
                                                          **kwargs)))
        base = None
        for n in (1, 2, 4, 8):
          mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n],
                               axis_types=(AxisType.Explicit,))
          sh = NamedSharding(mesh, P("data"))
          compiled = fn.lower(jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh),
                              jax.ShapeDtypeStruct(shape[:-1], jnp.int32,
                                                   sharding=sh)).compile()
          temp = compiled.memory_analysis().temp_size_in_bytes
          base = temp if base is None else base
          moved = traffic(compiled.as_text())
          moved_s = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in sorted(moved.items()))
          print(f"| {label} | {mode} | {n} | {temp / 2**20:.1f} MiB | {temp / base:.3f} | "
                f"{moved_s or 'none'} |")


if __name__ == "__main__":
  main()
