"""Minimal lovasz_jax example: fit a per-pixel linear classifier with optax.

Run with ``make demo``. (A full Flax NNX training demo replaces this.)
"""

import argparse

import jax
import jax.numpy as jnp
import optax

import lovasz_jax


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args(argv)
  key_x, key_w = jax.random.split(jax.random.key(0))
  # Synthetic data: 3 classes decided by a hidden linear rule over 4 features.
  feats = jax.random.normal(key_x, (4, 32, 32, 4))
  hidden = jax.random.normal(key_w, (4, 3))
  labels = jnp.argmax(feats @ hidden, axis=-1)
  params = jnp.zeros((4, 3))
  opt = optax.adam(0.05)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(
        lambda w: lovasz_jax.lovasz_softmax(feats @ w, labels))(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  for i in range(args.steps):
    params, state, loss = step(params, state)
    if i % 50 == 0 or i == args.steps - 1:
      acc = jnp.mean(jnp.argmax(feats @ params, -1) == labels)
      print(f"step {i:4d}  lovasz {float(loss):.4f}  pixel accuracy {float(acc):.3f}")


if __name__ == "__main__":
  main()
