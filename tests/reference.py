"""An independent float64 NumPy reference, written from the paper.

Berman, Rannen Triki & Blaschko, CVPR 2018: for one class, sort the errors in
descending order, take Alg. 1's weights (the increments of the Jaccard loss
J_i = 1 - |fg \\ first i| / |fg ∪ first i|), and take the dot product. This
module uses loops, boolean indexing and argsort on purpose: it shares no code
with lovasz_jax. Each function returns the value and its gradient.
"""

from __future__ import annotations

import numpy as np


def alg1_weights(fg_sorted: np.ndarray) -> np.ndarray:
  """Alg. 1 of the paper, literally: differences of Jaccard losses."""
  fg_sorted = np.asarray(fg_sorted, np.float64)
  g = fg_sorted.sum()
  intersection = g - np.cumsum(fg_sorted)
  union = g + np.cumsum(1.0 - fg_sorted)
  jaccard = 1.0 - intersection / union
  w = jaccard.copy()
  w[1:] = jaccard[1:] - jaccard[:-1]
  return w


def extension(errors: np.ndarray, fg: np.ndarray) -> tuple[float, np.ndarray]:
  """Lovász extension of the Jaccard loss at ``errors``; value and gradient."""
  if errors.size == 0:
    return 0.0, np.zeros_like(errors)
  order = np.argsort(-errors, kind="stable")
  w = alg1_weights(fg[order])
  grad = np.empty_like(errors)
  grad[order] = w
  return float(errors[order] @ w), grad


def softmax(x: np.ndarray) -> np.ndarray:
  z = x - x.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _valid(labels, ignore_index, where):
  valid = np.ones(labels.shape, bool) if where is None else np.asarray(where, bool)
  if ignore_index is not None:
    valid = valid & (labels != ignore_index)
  return valid


def lovasz_softmax(logits, labels, *, axis=-1, classes="present",
                   per_image=False, ignore_index=None, where=None,
                   class_weights=None, from_logits=True):
  """Returns (loss, d loss / d logits) in float64."""
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  x = np.moveaxis(logits, axis, -1)
  num_classes = x.shape[-1]
  valid = _valid(labels, ignore_index, where)
  probs = softmax(x) if from_logits else x.copy()
  grad_p = np.zeros_like(probs)
  cw = np.ones(num_classes) if class_weights is None else np.asarray(
      class_weights, np.float64)
  if isinstance(classes, str):
    selected = list(range(num_classes))
  else:
    selected = list(classes)
  groups = ([np.s_[b] for b in range(labels.shape[0])] if per_image
            else [np.s_[...]])
  group_losses, group_grads = [], []
  for sl in groups:
    p_g = probs[sl].reshape(-1, num_classes)
    lab_g = labels[sl].reshape(-1)
    val_g = valid[sl].reshape(-1)
    if not val_g.any():
      continue
    p_v, lab_v = p_g[val_g], lab_g[val_g]
    counted, losses, grads = [], [], []
    for c in selected:
      fg = (lab_v == c).astype(np.float64)
      if classes == "present" and fg.sum() == 0:
        continue
      errors = np.abs(fg - p_v[:, c])
      value, d_err = extension(errors, fg)
      d_p = d_err * np.where(fg == 1, -1.0, 1.0)
      counted.append(c)
      losses.append(value)
      grads.append(d_p)
    if not counted:
      continue
    wsum = sum(cw[c] for c in counted)
    if wsum == 0:  # no counted class has weight: the group does not count
      continue
    g_grad = np.zeros_like(p_g)
    group_losses.append(sum(cw[c] * l for c, l in zip(counted, losses)) / wsum)
    idx = np.flatnonzero(val_g)
    for c, d_p in zip(counted, grads):
      g_grad[idx, c] += cw[c] / wsum * d_p
    full = np.zeros_like(probs)
    full[sl] = g_grad.reshape(probs[sl].shape)
    group_grads.append(full)
  if not group_losses:
    return 0.0, np.zeros_like(logits)
  n = len(group_losses)
  loss = sum(group_losses) / n
  grad_p = sum(group_grads) / n
  if from_logits:
    grad_x = probs * (grad_p - (grad_p * probs).sum(axis=-1, keepdims=True))
  else:
    grad_x = grad_p
  return loss, np.moveaxis(grad_x, -1, axis)


def lovasz_hinge(logits, labels, *, per_image=True, ignore_index=None,
                 where=None):
  """Returns (loss, d loss / d logits) in float64."""
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  valid = _valid(labels, ignore_index, where)
  groups = ([np.s_[b] for b in range(labels.shape[0])] if per_image
            else [np.s_[...]])
  losses, grads = [], []
  for sl in groups:
    x, y, v = logits[sl].reshape(-1), labels[sl].reshape(-1), valid[sl].reshape(-1)
    if not v.any():
      continue
    signs = 2.0 * (y[v] == 1) - 1.0
    errors = 1.0 - x[v] * signs
    order = np.argsort(-errors, kind="stable")
    w = alg1_weights((y[v] == 1)[order])
    losses.append(float(np.maximum(errors[order], 0) @ w))
    d_err = np.empty_like(errors)
    d_err[order] = w * (errors[order] > 0)
    g = np.zeros_like(x)
    g[np.flatnonzero(v)] = -signs * d_err
    full = np.zeros_like(logits)
    full[sl] = g.reshape(logits[sl].shape)
    grads.append(full)
  if not losses:
    return 0.0, np.zeros_like(logits)
  return sum(losses) / len(losses), sum(grads) / len(losses)


def mean_iou_loss(pred, labels, valid, num_classes):
  """Mean over present classes of 1 - IoU, for hard predictions."""
  terms = []
  for c in range(num_classes):
    gt = (labels == c) & valid
    if not gt.any():
      continue
    pr = (pred == c) & valid
    terms.append(1.0 - (gt & pr).sum() / (gt | pr).sum())
  return float(np.mean(terms)) if terms else 0.0
