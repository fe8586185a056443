"""A tiny two-level U-Net in Flax NNX (channels-last, ``[B, H, W, C]``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from flax import nnx


class ConvBlock(nnx.Module):
  """Two 3x3 convolutions, each followed by group normalisation and ReLU."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(in_features, out_features, (3, 3), rngs=rngs)
    self.norm1 = nnx.GroupNorm(out_features, num_groups=4, rngs=rngs)
    self.conv2 = nnx.Conv(out_features, out_features, (3, 3), rngs=rngs)
    self.norm2 = nnx.GroupNorm(out_features, num_groups=4, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.norm1(self.conv1(x)))
    return jax.nn.relu(self.norm2(self.conv2(x)))


def _down(x: jax.Array) -> jax.Array:
  """2x2 max pooling.

  On an explicit mesh (multi-device runs) the reshape says that the batch
  axis keeps its sharding.
  """
  b, h, w, c = x.shape
  sharding = jax.typeof(x).sharding
  out = None
  if not sharding.mesh.empty:
    out = NamedSharding(sharding.mesh, P(tuple(sharding.spec)[0] if sharding.spec else None))
  return jax.lax.reshape(x, (b, h // 2, 2, w // 2, 2, c),
                         out_sharding=out).max(axis=(2, 4))


def _up(x: jax.Array) -> jax.Array:
  """2x nearest-neighbour upsampling."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class UNet(nnx.Module):
  """Encoder (width, 2 width, 4 width) and a decoder with skip connections.

  The image side must be divisible by 4. Returns logits ``[B, H, W, classes]``.
  """

  def __init__(self, in_features: int, num_classes: int, *, width: int = 8,
               rngs: nnx.Rngs):
    w = width
    self.enc1 = ConvBlock(in_features, w, rngs=rngs)
    self.enc2 = ConvBlock(w, 2 * w, rngs=rngs)
    self.mid = ConvBlock(2 * w, 4 * w, rngs=rngs)
    self.dec2 = ConvBlock(4 * w + 2 * w, 2 * w, rngs=rngs)
    self.dec1 = ConvBlock(2 * w + w, w, rngs=rngs)
    self.head = nnx.Conv(w, num_classes, (1, 1), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    e1 = self.enc1(x)
    e2 = self.enc2(_down(e1))
    m = self.mid(_down(e2))
    d2 = self.dec2(jnp.concatenate([_up(m), e2], axis=-1))
    d1 = self.dec1(jnp.concatenate([_up(d2), e1], axis=-1))
    return self.head(d1)


@functools.partial(nnx.jit, static_argnums=(0, 1, 2))
def _create_unet(in_features: int, num_classes: int, width: int,
                 seed: jax.Array) -> UNet:
  key = jax.random.key(seed, impl="rbg")
  return UNet(in_features, num_classes, width=width, rngs=nnx.Rngs(key))


def create_unet(in_features: int, num_classes: int, *, width: int = 8,
                seed: int = 0) -> UNet:
  """A freshly initialised :class:`UNet`, quick to build on CPU.

  Built op by op, each parameter's random initialiser is compiled on its own
  (seconds each on CPU, for a model that trains in a minute). Here the whole
  initialisation is one ``nnx.jit`` compilation (reused for every seed), and
  the keys use the "rbg" PRNG, whose random bits compile much faster than the
  default threefry. The result depends only on ``seed`` (on a given backend).
  """
  return _create_unet(in_features, num_classes, width, seed)
