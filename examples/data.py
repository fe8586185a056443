"""A synthetic, class-imbalanced segmentation data set of shapes, made in code.

Each image has a smooth random background texture, one to three large objects
(disks, squares and triangles, rotated) and, in some images, small objects of
two rare classes (dots of radius about 2-3 pixels and bars about 2 pixels
wide, at 48x48). Each class has a mean colour; every object's colour is drawn
around it with a large spread, so colour, shape and size all carry evidence.
The image is then blurred (which fades the small objects most) and noise is
added.

About 90% of the pixels are background and each rare class under 1%, so a
model that misses most of the small objects still has a high pixel accuracy,
while its mean IoU, which weighs every class equally, is low. Everything is
NumPy with a seeded generator: the same seed gives the same images.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES = ("background", "disk", "square", "triangle", "dot", "bar")
NUM_CLASSES = len(CLASS_NAMES)
RARE_CLASSES = (4, 5)  # the small objects: dots and bars

# The mean colour of each class (RGB, zero-centred). Each object's colour is
# drawn around its class's mean (``colour_spread``), so the colours of
# different classes overlap.
CLASS_COLOURS = np.array([
    [0.0, 0.0, 0.0],
    [0.5, -0.3, -0.3],
    [-0.3, 0.5, -0.3],
    [-0.3, -0.3, 0.5],
    [0.4, 0.4, -0.4],
    [-0.4, 0.4, 0.4],
], np.float32)


def _blur(x: np.ndarray) -> np.ndarray:
  """A 3x3 binomial blur over the two spatial axes of ``[H, W, ...]``."""
  k = (0.25, 0.5, 0.25)
  p = np.pad(x, ((1, 1), (1, 1)) + ((0, 0),) * (x.ndim - 2), mode="edge")
  x = k[0] * p[:-2] + k[1] * p[1:-1] + k[2] * p[2:]
  return k[0] * x[:, :-2] + k[1] * x[:, 1:-1] + k[2] * x[:, 2:]


def _background(rng: np.random.Generator, size: int,
                texture: float) -> np.ndarray:
  """Smooth random texture: a coarse random grid, upsampled and blurred."""
  coarse = rng.normal(0.0, texture, (size // 8 + 1, size // 8 + 1, 3))
  tex = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:size, :size]
  for _ in range(3):
    tex = _blur(tex)
  return (tex + rng.uniform(-0.2, 0.2, 3)).astype(np.float32)


def _shape_mask(rng: np.random.Generator, cls: int, yy: np.ndarray,
                xx: np.ndarray, size: int) -> np.ndarray:
  """The boolean mask of one random object of class ``cls``."""
  s = size / 64  # sizes are given for 64x64 images and scale with the image
  if cls == 1:  # disk
    r = rng.uniform(6, 11) * s
    cy, cx = rng.uniform(r, size - r, 2)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
  if cls == 2:  # square, rotated
    h = rng.uniform(5, 9) * s
    cy, cx = rng.uniform(1.4 * h, size - 1.4 * h, 2)
    a = rng.uniform(0, np.pi / 2)
    u = (yy - cy) * np.cos(a) + (xx - cx) * np.sin(a)
    v = -(yy - cy) * np.sin(a) + (xx - cx) * np.cos(a)
    return (np.abs(u) <= h) & (np.abs(v) <= h)
  if cls == 3:  # triangle, rotated
    r = rng.uniform(7, 12) * s
    cy, cx = rng.uniform(r, size - r, 2)
    a0 = rng.uniform(0, 2 * np.pi)
    mask = np.ones_like(yy, bool)
    for k in range(3):  # inside all three edges' half-planes
      a = a0 + 2 * np.pi * k / 3
      mask &= (yy - cy) * np.sin(a) + (xx - cx) * np.cos(a) <= r / 2
    return mask
  if cls == 4:  # dot: a tiny disk
    r = rng.uniform(2.4, 3.6) * s
    cy, cx = rng.uniform(r + 1, size - r - 1, 2)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
  if cls == 5:  # bar: a thin segment
    half_len = rng.uniform(6, 12) * s
    half_w = rng.uniform(1.2, 1.8) * s
    cy, cx = rng.uniform(half_len, size - half_len, 2)
    a = rng.uniform(0, np.pi)
    u = (yy - cy) * np.cos(a) + (xx - cx) * np.sin(a)
    v = -(yy - cy) * np.sin(a) + (xx - cx) * np.cos(a)
    return (np.abs(u) <= half_len) & (np.abs(v) <= half_w)
  raise ValueError(f"unknown class {cls}")


def make_image(rng: np.random.Generator, size: int = 48, *,
               noise: float = 0.15, colour_spread: float = 0.2,
               texture: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """One image ``[H, W, 3]`` float32 and its labels ``[H, W]`` int32.

  Args:
    rng: the random generator (advanced by the call).
    size: the side of the square image, in pixels. Object sizes scale with it.
    noise: standard deviation of the pixel noise added after the blur.
    colour_spread: standard deviation of an object's colour around its
      class's mean colour.
    texture: standard deviation of the background texture.
  """
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  image = _background(rng, size, texture)
  labels = np.zeros((size, size), np.int32)
  big = rng.choice([1, 2, 3], size=rng.integers(1, 4))
  small = []
  if rng.random() < 0.6:
    small += [4] * int(rng.integers(1, 4))
  if rng.random() < 0.5:
    small += [5] * int(rng.integers(1, 3))
  # Large objects first: small ones are drawn on top and stay visible.
  for cls in list(big) + small:
    mask = _shape_mask(rng, int(cls), yy, xx, size)
    image[mask] = CLASS_COLOURS[cls] + rng.normal(0.0, colour_spread, 3)
    labels[mask] = cls
  image = _blur(image)
  image = image + rng.normal(0.0, noise, image.shape).astype(np.float32)
  return image.astype(np.float32), labels


def make_dataset(num: int, size: int = 48, *, seed: int = 0,
                 noise: float = 0.15, colour_spread: float = 0.2,
                 texture: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """``num`` images ``[N, H, W, 3]`` float32 and labels ``[N, H, W]`` int32.

  The same arguments give the same arrays. See :func:`make_image`.
  """
  rng = np.random.default_rng(seed)
  images = np.empty((num, size, size, 3), np.float32)
  labels = np.empty((num, size, size), np.int32)
  for i in range(num):
    images[i], labels[i] = make_image(rng, size, noise=noise,
                                      colour_spread=colour_spread,
                                      texture=texture)
  return images, labels


def class_frequencies(labels: np.ndarray, num_classes: int = NUM_CLASSES
                      ) -> np.ndarray:
  """The fraction of pixels of each class."""
  return np.bincount(labels.reshape(-1), minlength=num_classes) / labels.size
