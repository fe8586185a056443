"""Explicit-sharding helpers (``jax.make_mesh``'s default axis types).

Under explicit sharding, shardings are part of array types, so reshapes that
merge a sharded axis and sorts along a sharded axis must say what they want.
Under automatic sharding (or none) specs are empty and these are no-ops.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec


def spec_of(x: jax.Array) -> tuple:
  """The explicit partition spec of ``x``, one entry per axis."""
  spec = tuple(jax.typeof(x).sharding.spec)
  return spec + (None,) * (x.ndim - len(spec))


def explicit_mesh(x: jax.Array):
  """The mesh in ``x``'s type if it has explicit axes, else None.

  Arrays on an explicit mesh carry it in their type even where their own
  spec is empty: a replicated array, or the per-example view of an array
  inside ``jax.vmap`` over a sharded axis. Their reshapes, sorts and
  scatters must then be typed, or run inside ``shard_map`` over that mesh.
  """
  mesh = jax.typeof(x).sharding.mesh
  if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
    return None
  return mesh


def named(x: jax.Array, spec) -> NamedSharding:
  return NamedSharding(jax.typeof(x).sharding.mesh, PartitionSpec(*spec))


def reshard(x: jax.Array, spec, like: jax.Array | None = None) -> jax.Array:
  """``x`` with partition ``spec`` on the mesh of ``like`` (default ``x``)."""
  return jax.sharding.reshard(x, named(x if like is None else like, spec))


def match(x: jax.Array | None, spec, like: jax.Array) -> jax.Array | None:
  """``x`` laid out with ``spec`` on ``like``'s explicit mesh (if any).

  A no-op unless ``like`` is on an explicit mesh and ``x``'s spec differs:
  the labels and masks of a loss then follow the logits' layout.
  """
  if x is None or explicit_mesh(like) is None or spec_of(x) == tuple(spec):
    return x
  return reshard(x, spec, like=like)


def whole_axis(x: jax.Array, axis: int) -> jax.Array:
  """``x`` with ``axis`` not split over devices (explicit meshes only).

  Used for the class axis of the softmax logits: each pixel needs all its
  classes (the softmax), so a class axis split over a mesh axis (a
  tensor-parallel last layer) is gathered, and its gradient is split again
  on the way back.
  """
  spec = spec_of(x)
  if explicit_mesh(x) is None or spec[axis] is None:
    return x
  return reshard(x, tuple(None if i == axis % x.ndim else p
                          for i, p in enumerate(spec)))


def reshape(x: jax.Array, shape: tuple[int, ...], spec) -> jax.Array:
  return jax.lax.reshape(x, shape, out_sharding=named(x, spec))


def varying_axes(x: jax.Array) -> tuple[str, ...]:
  """The manual mesh axes (inside ``shard_map``) along which ``x`` varies."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  axes = mat.varying if mat is not None else getattr(aval, "vma", ())
  return tuple(sorted(axes))


def pcast_varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """``x`` typed as varying over the manual mesh ``axes`` (inside shard_map)."""
  return jax.lax.pcast(x, axes, to="varying") if axes else x


def merge_axes(x: jax.Array, runs: tuple[int, ...]) -> jax.Array:
  """Reshape ``x`` so that each output axis is a run of consecutive axes.

  ``runs`` gives each output axis's number of input axes (0 makes a new
  axis of size 1) and sums to ``x.ndim``. Sizes are explicit, so empty
  arrays reshape too. Under explicit sharding an output axis keeps the
  sharding of its run's leading axis (other axes of a run are gathered
  first), so a batch sharded over devices stays sharded.
  """
  assert sum(runs) == x.ndim, (runs, x.shape)
  starts = [sum(runs[:i]) for i in range(len(runs))]
  shape = tuple(math.prod(x.shape[s:s + r]) for s, r in zip(starts, runs))
  spec = spec_of(x)
  if explicit_mesh(x) is None:  # sharding left to the compiler, or none
    return x.reshape(shape)
  inner = [i for s, r in zip(starts, runs) for i in range(s + 1, s + r)]
  if any(spec[i] for i in inner):
    spec = tuple(None if i in inner else p for i, p in enumerate(spec))
    x = reshard(x, spec)
  out = tuple(spec[s] if r else None for s, r in zip(starts, runs))
  return reshape(x, shape, out)
