"""An independent float64 NumPy reference for the binary and multi-label losses.

Written from the paper (Berman, Rannen Triki & Blaschko, CVPR 2018): each
binary problem (a group of pixels, and a channel in multi-label mode) takes
its valid pixels by boolean indexing, computes its errors, and evaluates the
Lovász extension with ``tests.reference.extension`` (Alg. 1 literally, with an
argsort). The loss is the mean over the counted problems of each group, then
the mean over the groups that count one. Loops on purpose: no code is shared
with lovasz_jax. Each function returns the loss and its gradient with respect
to the logits.
"""

from __future__ import annotations

import numpy as np

from tests.reference import extension


def sigmoid(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  e = np.exp(-np.abs(x))
  return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _one_problem(x, y, loss, from_logits):
  """One binary problem over valid pixels ``x`` (1-D) with labels ``y``.

  Returns the Lovász extension of its errors and the gradient w.r.t. ``x``.
  """
  fg = y == 1
  signs = np.where(fg, 1.0, -1.0)
  if loss == "hinge":
    margins = 1.0 - x * signs
    value, d_err = extension(np.maximum(margins, 0.0), fg)
    return value, d_err * (margins > 0) * -signs
  p = sigmoid(x) if from_logits else x
  errors = np.abs(fg - p)          # 1 - p on foreground, p on background
  value, d_err = extension(errors, fg)
  d_p = d_err * -signs              # p in (0, 1): d|y - p|/dp = -sign
  return value, d_p * (p * (1 - p) if from_logits else 1.0)


def _loss(loss, logits, labels, *, axis, classes, per_image, ignore_index,
          where, from_logits):
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  valid = np.ones(labels.shape, bool) if where is None else np.asarray(where, bool)
  if ignore_index is not None:
    valid = valid & (labels != ignore_index)
  if axis is None:
    channels = [None]
  else:
    axis = axis % logits.ndim
    channels = (range(logits.shape[axis]) if isinstance(classes, str)
                else list(classes))
  images = range(logits.shape[0]) if per_image else [None]
  group_losses, group_grads = [], []
  for b in images:
    losses, grads = [], []
    for k in channels:
      index = [slice(None)] * logits.ndim
      if b is not None:
        index[0] = b
      if k is not None:
        index[axis] = k
      mask = np.zeros(logits.shape, bool)
      mask[tuple(index)] = True
      mask &= valid
      if not mask.any():
        continue
      if classes == "present" and not (labels[mask] == 1).any():
        continue
      value, d_x = _one_problem(logits[mask], labels[mask], loss, from_logits)
      grad = np.zeros_like(logits)
      grad[mask] = d_x
      losses.append(value)
      grads.append(grad)
    if losses:
      group_losses.append(sum(losses) / len(losses))
      group_grads.append(sum(grads) / len(grads))
  if not group_losses:
    return 0.0, np.zeros_like(logits)
  return (sum(group_losses) / len(group_losses),
          sum(group_grads) / len(group_grads))


def lovasz_sigmoid(logits, labels, *, axis=None, classes="all", per_image=False,
                   ignore_index=None, where=None, from_logits=True):
  """Returns (loss, d loss / d logits) in float64."""
  return _loss("sigmoid", logits, labels, axis=axis, classes=classes,
               per_image=per_image, ignore_index=ignore_index, where=where,
               from_logits=from_logits)


def lovasz_hinge(logits, labels, *, axis=None, classes="all", per_image=True,
                 ignore_index=None, where=None):
  """Returns (loss, d loss / d logits) in float64."""
  return _loss("hinge", logits, labels, axis=axis, classes=classes,
               per_image=per_image, ignore_index=ignore_index, where=where,
               from_logits=True)


def iou_loss(pred, labels, valid):
  """1 - IoU of hard 0/1 predictions over valid pixels (0 if both empty)."""
  gt = (labels == 1) & valid
  pr = (pred == 1) & valid
  union = (gt | pr).sum()
  return 0.0 if union == 0 else 1.0 - (gt & pr).sum() / union
