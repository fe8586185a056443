"""Data-parallel training and evaluation across processes (jax.distributed).

One Python process per host, each feeding its own slice of every global
batch; the loss is the Lovász-Softmax loss of the *global* batch, and the
mIoU is that of the *global* evaluation set (exact counts summed over every
device). On one machine, two processes of 4 CPU devices each:

    python -m examples.multihost --spawn 2

On a cluster, start the same script once per host without ``--spawn``:
``jax.distributed.initialize()`` then finds the coordinator (TPU pod
slices, SLURM; or pass ``--coordinator HOST:PORT --num-processes N
--process-id I``). The code of the step is the same for one process and for
many: only the arrays are global.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--spawn", type=int, default=0,
                      help="start this many local processes (on one machine)")
  parser.add_argument("--local-devices", type=int, default=4,
                      help="CPU devices per spawned process")
  parser.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--batch-size", type=int, default=16, help="global batch")
  parser.add_argument("--size", type=int, default=32, help="image size")
  parser.add_argument("--timeout", type=int, default=600,
                      help="seconds each spawned process may run")
  return parser.parse_args(argv)


def spawn(args: argparse.Namespace) -> int:
  """Starts ``args.spawn`` processes of this script on localhost."""
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(args.local_devices))
  common = [sys.executable, "-m", "examples.multihost", "--coordinator",
            f"localhost:{port}", "--num-processes", str(args.spawn),
            "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--size", str(args.size)]
  procs = [subprocess.Popen(common + ["--process-id", str(i)], env=env)
           for i in range(args.spawn)]
  codes = []
  for proc in procs:
    try:
      codes.append(proc.wait(timeout=args.timeout))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      print(f"a process ran past {args.timeout} s", file=sys.stderr)
      return 1
  return max(codes)


def run(args: argparse.Namespace) -> dict[str, float]:
  import jax  # pylint: disable=import-outside-toplevel

  if args.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  else:
    jax.distributed.initialize()  # TPU pods, SLURM, ...: found from the environment
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  import lovasz_jax  # pylint: disable=import-outside-toplevel
  from examples import data  # pylint: disable=import-outside-toplevel
  from examples.model import create_unet  # pylint: disable=import-outside-toplevel

  rank, nproc = jax.process_index(), jax.process_count()
  # One mesh axis over every device of every process (explicit by default).
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  if args.batch_size % jax.device_count():
    raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the "
                     f"{jax.device_count()} devices")
  per_process = args.batch_size // nproc

  def global_batch(x: np.ndarray) -> jax.Array:
    """This process's rows of a global batch -> the global array."""
    return jax.make_array_from_process_local_data(batch_sharding, x)

  # Every process builds the same model (same seed) and places it replicated.
  model = create_unet(3, data.NUM_CLASSES, width=8, seed=0)
  graphdef, params = nnx.split(model)
  params = jax.device_put(params, replicated)
  tx = optax.adam(3e-3)
  opt_state = jax.device_put(tx.init(params), replicated)

  def loss_fn(logits, labels):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce + lovasz_jax.lovasz_softmax(logits, labels)   # the global batch's

  @jax.jit
  def train_step(params, opt_state, images, labels):
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(nnx.merge(graphdef, p)(images), labels))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def eval_step(params, images, labels):
    preds = jnp.argmax(nnx.merge(graphdef, params)(images), axis=-1)
    # Each device counts its own pixels; only the C x C counts cross devices.
    return lovasz_jax.confusion_matrix(preds, labels, data.NUM_CLASSES)

  # Each process generates (in a real job: reads) only its own rows.
  train_x, train_y = data.make_dataset(per_process * 8, args.size, seed=1 + rank)
  test_x, test_y = data.make_dataset(per_process * 2, args.size, seed=100 + rank)
  losses = []
  for step in range(args.steps):
    idx = np.random.default_rng([rank, step]).choice(len(train_x), per_process,
                                                    replace=False)
    params, opt_state, loss = train_step(params, opt_state,
                                         global_batch(train_x[idx]),
                                         global_batch(train_y[idx]))
    losses.append(float(loss))            # replicated: every process reads it
  total = np.zeros((data.NUM_CLASSES,) * 2, np.int64)
  for i in range(0, len(test_x), per_process):
    counts = eval_step(params, global_batch(test_x[i:i + per_process]),
                       global_batch(test_y[i:i + per_process]))
    total += np.asarray(counts)           # replicated [C, C]: no gather
  miou = float(lovasz_jax.mean_iou(total))
  if rank == 0:
    print(f"{nproc} processes, {jax.device_count()} devices; loss "
          f"{losses[0]:.3f} -> {losses[-1]:.3f}; test mIoU {miou:.3f} over "
          f"{int(total.sum())} pixels", flush=True)
  jax.distributed.shutdown()
  return {"first_loss": losses[0], "last_loss": losses[-1], "miou": miou}


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.spawn:
    return spawn(args)
  run(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
