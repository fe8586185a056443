"""Train a tiny U-Net twice on synthetic shapes: cross-entropy vs Lovász.

Run 1 trains with softmax cross-entropy for all steps. Run 2 is the recipe of
Berman et al. (CVPR 2018): cross-entropy first, then Lovász-Softmax
fine-tuning for the remaining steps. Both runs take the same number of steps,
see the same batches and use the same learning-rate schedule; run 2 branches
off run 1 at the switch step (the shared cross-entropy part is trained once).
Both are scored on a held-out synthetic test set with the Flax NNX metric
lovasz_jax.nnx.MeanIoU (exact streaming counts, on device): the demo prints
per-class IoU, the data-set mIoU and the per-image mIoU of both runs side by
side, and writes a PNG figure (inputs, labels, both runs' predictions, loss
and test-mIoU curves).

The data (examples/data.py) are generated in code from the seed: nothing is
downloaded. The model is a tiny Flax NNX U-Net (examples/model.py), trained
through nnx.split/nnx.merge with a jitted optax step on the parameter pytree,
so run 2 branches off run 1 by reusing the parameters and optimizer state.

Usage: make demo [ARGS="--steps 400 --output /tmp/demo.png"], or
python -m examples.train [options].
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import lovasz_jax
import lovasz_jax.nnx
from examples import data
from examples.model import create_unet

FINETUNE_LOSSES = ("lovasz", "ce+lovasz")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
  """Shows the defaults, and the module docstring as written."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m examples.train", description=__doc__,
      formatter_class=_HelpFormatter)
  parser.add_argument("--steps", type=int, default=1000,
                      help="training steps of each run")
  parser.add_argument("--finetune-steps", type=int, default=None,
                      # "%(default).0s" stops argparse adding "(default: None)".
                      help="last steps of run 2 trained with the fine-tuning "
                      "loss (default: half of --steps)%(default).0s")
  parser.add_argument("--finetune-loss", choices=FINETUNE_LOSSES,
                      default="lovasz",
                      help="run 2's loss after the switch")
  parser.add_argument("--per-image", action="store_true",
                      help="Lovász-Softmax per image instead of per batch")
  parser.add_argument("--batch-size", type=int, default=16,
                      help="training images per step")
  parser.add_argument("--image-size", type=int, default=48,
                      help="side of the square images (divisible by 4)")
  parser.add_argument("--width", type=int, default=8,
                      help="channels of the U-Net's first level")
  parser.add_argument("--lr", type=float, default=1e-2,
                      help="peak learning rate (Adam, cosine decay)")
  parser.add_argument("--num-train", type=int, default=1024,
                      help="training images")
  parser.add_argument("--num-test", type=int, default=256,
                      help="held-out test images")
  parser.add_argument("--noise", type=float, default=0.15,
                      help="standard deviation of the input noise")
  parser.add_argument("--colour-spread", type=float, default=0.2,
                      help="spread of an object's colour around its class's "
                      "mean colour (larger: harder)")
  parser.add_argument("--eval-every", type=int, default=100,
                      help="steps between test-set evaluations for the curves")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the data, the model and the batches")
  parser.add_argument("--output", type=pathlib.Path,
                      default=pathlib.Path("out/demo.png"),
                      help="where to write the PNG figure")
  parser.add_argument("--dpi", type=int, default=80, help="figure resolution")
  parser.add_argument("--no-progress", action="store_true",
                      help="hide the progress bars")
  args = parser.parse_args(argv)
  if args.finetune_steps is None:
    args.finetune_steps = args.steps // 2
  if args.steps < 1:
    parser.error(f"--steps must be at least 1, got {args.steps}")
  if not 0 <= args.finetune_steps <= args.steps:
    parser.error(f"--finetune-steps must be in [0, --steps={args.steps}], got "
                 f"{args.finetune_steps}")
  if args.image_size < 4 or args.image_size % 4:
    parser.error(f"--image-size must be a positive multiple of 4, got "
                 f"{args.image_size}")
  for name in ("batch_size", "width", "num_train", "num_test", "eval_every"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be at least 1, got "
                   f"{getattr(args, name)}")
  return args


# Losses ----------------------------------------------------------------------

def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_loss(name: str, per_image: bool = False) -> Callable[..., jax.Array]:
  """``"ce"``, ``"lovasz"`` or ``"ce+lovasz"`` as ``loss(logits, labels)``."""
  lovasz = functools.partial(lovasz_jax.lovasz_softmax, per_image=per_image)
  if name == "ce":
    return cross_entropy
  if name == "lovasz":
    return lovasz
  if name == "ce+lovasz":
    return lambda logits, labels: cross_entropy(logits, labels) + lovasz(
        logits, labels)
  raise ValueError(f"unknown loss {name!r}")


# Training --------------------------------------------------------------------

def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    loss_fn: Callable[..., jax.Array]) -> Callable[..., Any]:
  """A jitted ``step(params, opt_state, images, labels)``."""

  @jax.jit
  def step(params, opt_state, images, labels):
    def objective(p):
      return loss_fn(nnx.merge(graphdef, p)(images), labels)
    loss, grads = jax.value_and_grad(objective)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def make_evaluate(graphdef: nnx.GraphDef, images: np.ndarray, labels: np.ndarray,
                  batch_size: int = 64) -> Callable[..., tuple[Any, np.ndarray]]:
  """``evaluate(params) -> (metric, predictions [N, H, W])``.

  Scores the test set in batches with the Flax NNX metric
  ``lovasz_jax.nnx.MeanIoU``: its exact counts stay on device, updated in a
  jitted step, and give the data-set mIoU and the per-image mIoU of one
  pass. The last batch is padded to the batch size, so the step compiles
  once; the padding images are masked out with ``where=`` (they count
  nowhere, not even as images).
  """
  batch_size = min(batch_size, len(images))

  @nnx.jit
  def eval_step(metric, params, images, labels, where):
    logits = nnx.merge(graphdef, params)(images)
    metric.update(labels=labels, logits=logits, where=where)
    return jnp.argmax(logits, axis=-1)

  def evaluate(params):
    metric = lovasz_jax.nnx.MeanIoU(data.NUM_CLASSES)
    preds = []
    for i in range(0, len(images), batch_size):
      x, y = images[i:i + batch_size], labels[i:i + batch_size]
      n = len(x)
      if n < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
        y = np.concatenate([y, np.zeros((batch_size - n,) + y.shape[1:], y.dtype)])
      where = np.broadcast_to((np.arange(batch_size) < n)[:, None, None], y.shape)
      preds.append(np.asarray(eval_step(metric, params, x, y, where))[:n])
    return metric, np.concatenate(preds)

  return evaluate


def batch_indices(seed: int, step: int, num: int, batch_size: int) -> np.ndarray:
  """The training batch of a step: the same for both runs."""
  return np.random.default_rng([seed, step]).choice(num, batch_size,
                                                    replace=False)


def scores(metric: lovasz_jax.nnx.MeanIoU) -> dict[str, Any]:
  """The scores of a test-set ``MeanIoU``: data-set and per-image mIoU."""
  return {
      "iou": np.asarray(metric.iou_per_class()),
      "miou": float(metric.compute()),            # the data set's counts pooled
      "per_image_miou": float(metric.per_image_miou()),  # every image weighs 1
      "pixel_acc": float(metric.state.pixel_accuracy()),
  }


def train_phase(step_fn, params, opt_state, steps: range, args, train_x,
                train_y, evaluate, desc: str, history: dict[str, list]):
  """Runs ``steps``; appends losses and test mIoU to ``history``."""
  bar = tqdm(steps, desc=desc, disable=args.no_progress, leave=True,
             dynamic_ncols=True)
  for step in bar:
    idx = batch_indices(args.seed, step, len(train_x), args.batch_size)
    params, opt_state, loss = step_fn(params, opt_state, train_x[idx],
                                      train_y[idx])
    history["step"].append(step)
    history["loss"].append(loss)
    if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
      miou = scores(evaluate(params)[0])["miou"]
      history["eval_step"].append(step + 1)
      history["eval_miou"].append(miou)
      bar.set_postfix(loss=f"{float(loss):.3f}", test_miou=f"{miou:.3f}")
  history["loss"] = [float(v) for v in history["loss"]]
  return params, opt_state


# Reporting -------------------------------------------------------------------

def format_table(freqs: np.ndarray, results: dict[str, dict[str, Any]]) -> str:
  """Per-class IoU, mIoU, per-image mIoU and pixel accuracy, side by side.

  The per-image mIoU row is shown when the results have it.

  With two runs, a last column gives the second minus the first.
  """
  names = list(results)
  delta = len(names) == 2
  head = (f"{'class':<12}{'test px':>9}" + "".join(f"{n:>16}" for n in names)
          + (f"{'change':>10}" if delta else ""))
  lines = [head, "-" * len(head)]

  def row(label: str, values: list[float]) -> str:
    line = label + "".join(f"{v:>16.4f}" for v in values)
    return line + (f"{values[1] - values[0]:>+10.4f}" if delta else "")

  for c, cname in enumerate(data.CLASS_NAMES):
    lines.append(row(f"{cname:<12}{100 * freqs[c]:>8.2f}%",
                     [results[n]["iou"][c] for n in names]))
  lines.append("-" * len(head))
  lines.append(row(f"{'mIoU':<21}", [results[n]["miou"] for n in names]))
  if all("per_image_miou" in results[n] for n in names):
    lines.append(row(f"{'per-image mIoU':<21}",
                     [results[n]["per_image_miou"] for n in names]))
  lines.append(row(f"{'pixel acc':<21}",
                   [results[n]["pixel_acc"] for n in names]))
  return "\n".join(lines)


def _smooth(values: Sequence[float], k: int) -> np.ndarray:
  v = np.asarray(values, np.float64)
  if len(v) < k or k < 2:
    return v
  c = np.cumsum(np.insert(v, 0, 0.0))
  out = (c[k:] - c[:-k]) / k
  return np.concatenate([v[:k - 1].cumsum() / np.arange(1, k), out])


def plot(path: pathlib.Path, images, labels, preds: dict[str, np.ndarray],
         histories: dict[str, dict[str, list]], results, switch: int,
         dpi: int) -> None:
  # pylint: disable=import-outside-toplevel
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap
  from matplotlib.patches import Patch

  colours = ["#202020", "#1f77b4", "#2ca02c", "#9467bd", "#ffdd00", "#ff3030"]
  cmap = ListedColormap(colours)
  names = list(preds)
  n = len(images)
  rows = [("input", None), ("labels", labels)] + [
      (f"{k}\nmIoU {results[k]['miou']:.3f}", preds[k]) for k in names]
  fig = plt.figure(figsize=(max(2.2 * n, 8), 2.2 * len(rows) + 3.4),
                   layout="constrained")
  top, bottom = fig.subfigures(2, 1, height_ratios=[2.2 * len(rows), 3.0])
  axes = top.subplots(len(rows), n, squeeze=False)
  for r, (title, maps) in enumerate(rows):
    for i in range(n):
      ax = axes[r, i]
      if maps is None:
        ax.imshow(np.clip(0.5 + 0.5 * images[i], 0, 1))
      else:
        ax.imshow(maps[i], cmap=cmap, vmin=-0.5, vmax=len(colours) - 0.5,
                  interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
    axes[r, 0].set_ylabel(title)
  top.suptitle("held-out test images with the most rare-class pixels")
  top.legend(handles=[Patch(color=c, label=l)
                      for c, l in zip(colours, data.CLASS_NAMES)],
             loc="outside lower center", ncols=len(colours), frameon=False)
  ax_loss, ax_miou = bottom.subplots(1, 2)
  k = max(len(next(iter(histories.values()))["loss"]) // 50, 1)
  for name, h in histories.items():
    ax_loss.plot(h["step"], _smooth(h["loss"], k), label=name, lw=1.2)
  ax_loss.set_yscale("log")
  ax_loss.set_xlabel("step")
  ax_loss.set_title("training loss (moving average)", fontsize="medium")
  ax_loss.legend(fontsize="small", title="after the dashed line, run 2's\n"
                 "loss is the fine-tuning loss", title_fontsize="x-small")
  for name, h in histories.items():
    ax_miou.plot(h["eval_step"], h["eval_miou"], label=name, marker=".",
                 lw=1.2)
  ax_miou.set_xlabel("step")
  ax_miou.set_title("test mIoU", fontsize="medium")
  ax_miou.legend(fontsize="small")
  for ax in (ax_loss, ax_miou):
    if 0 < switch:
      ax.axvline(switch, color="gray", ls="--", lw=1)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


# Main ------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the demo; returns the scores, histories and the figure's path."""
  args = parse_args(argv)
  start = time.perf_counter()
  print(f"JAX {jax.__version__} on {jax.default_backend()}: {jax.devices()}")
  train_x, train_y = data.make_dataset(args.num_train, args.image_size,
                                       seed=args.seed, noise=args.noise,
                                       colour_spread=args.colour_spread)
  test_x, test_y = data.make_dataset(args.num_test, args.image_size,
                                     seed=args.seed + 10_000, noise=args.noise,
                                     colour_spread=args.colour_spread)
  freqs = data.class_frequencies(test_y)
  print(f"data: {args.num_train} train / {args.num_test} test images of "
        f"{args.image_size}x{args.image_size}; test pixels per class: "
        + ", ".join(f"{n} {100 * f:.2f}%"
                    for n, f in zip(data.CLASS_NAMES, freqs)))

  model = create_unet(3, data.NUM_CLASSES, width=args.width, seed=args.seed)
  graphdef, params = nnx.split(model, nnx.Param)
  schedule = optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.05)
  tx = optax.adam(schedule)
  opt_state = tx.init(params)
  ce_step = make_train_step(graphdef, tx, make_loss("ce"))
  ft_step = make_train_step(graphdef, tx,
                            make_loss(args.finetune_loss, args.per_image))
  evaluate = make_evaluate(graphdef, test_x, test_y)

  ft_name = {"lovasz": "Lovász", "ce+lovasz": "CE+Lovász"}[args.finetune_loss]
  run1, run2 = "CE", f"CE→{ft_name}"
  switch = args.steps - args.finetune_steps
  shared = {"step": [], "loss": [], "eval_step": [], "eval_miou": []}
  h1 = {k: [] for k in shared}
  h2 = {k: [] for k in shared}
  print(f"run 1 '{run1}': cross-entropy for {args.steps} steps; run 2 '{run2}':"
        f" the same first {switch} steps, then {ft_name} for "
        f"{args.finetune_steps} steps (Lovász-Softmax per_image="
        f"{args.per_image})")
  params, opt_state = train_phase(
      ce_step, params, opt_state, range(switch), args, train_x, train_y,
      evaluate, "CE, both runs", shared)
  params1, _ = train_phase(
      ce_step, params, opt_state, range(switch, args.steps), args, train_x,
      train_y, evaluate, f"run 1: {run1}", h1)
  params2, _ = train_phase(
      ft_step, params, opt_state, range(switch, args.steps), args, train_x,
      train_y, evaluate, f"run 2: {run2}", h2)
  histories = {}
  for name, h in ((run1, h1), (run2, h2)):
    histories[name] = {k: shared[k] + h[k] for k in shared}

  (metric1, preds1), (metric2, preds2) = evaluate(params1), evaluate(params2)
  results = {run1: scores(metric1), run2: scores(metric2)}
  print()
  print(f"held-out test set ({args.num_test} images), IoU per class:")
  print(format_table(freqs, results))
  print("mIoU: the data set's (all test pixels pooled); per-image mIoU: the mean "
        "of each\nimage's mIoU. Both from one pass of lovasz_jax.nnx.MeanIoU.")

  # Example images: the test images with the most rare-class pixels.
  rare = np.isin(test_y, data.RARE_CLASSES).sum(axis=(1, 2))
  shown = np.sort(np.argsort(-rare, kind="stable")[:4])
  preds = {run1: preds1[shown], run2: preds2[shown]}
  plot(args.output, test_x[shown], test_y[shown], preds, histories, results,
       switch, args.dpi)
  elapsed = time.perf_counter() - start
  print(f"\nfigure written to {args.output}")
  print(f"total time {elapsed:.1f} s")
  return {"results": results, "histories": histories, "output": args.output,
          "freqs": freqs, "seconds": elapsed}


if __name__ == "__main__":
  main()
