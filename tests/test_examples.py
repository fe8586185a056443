"""Smoke tests of the demo (examples/): data, model, training and main()."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lovasz_jax

pytest.importorskip("flax")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from flax import nnx  # pylint: disable=wrong-import-position

from examples import data  # pylint: disable=wrong-import-position
from examples import train  # pylint: disable=wrong-import-position
from examples.model import create_unet  # pylint: disable=wrong-import-position


def test_data_is_deterministic_and_well_formed():
  x1, y1 = data.make_dataset(6, 32, seed=3)
  x2, y2 = data.make_dataset(6, 32, seed=3)
  x3, y3 = data.make_dataset(6, 32, seed=4)
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)
  assert not np.array_equal(y1, y3)
  assert x1.shape == (6, 32, 32, 3) and x1.dtype == np.float32
  assert y1.shape == (6, 32, 32) and y1.dtype == np.int32
  assert np.isfinite(x1).all()
  assert y1.min() >= 0 and y1.max() < data.NUM_CLASSES


def test_data_is_class_imbalanced_with_rare_small_classes():
  _, labels = data.make_dataset(128, 48, seed=0)
  freqs = data.class_frequencies(labels)
  assert freqs.shape == (data.NUM_CLASSES,)
  np.testing.assert_allclose(freqs.sum(), 1.0)
  assert freqs[0] > 0.8                        # background dominates
  assert (freqs[1:4] > 0.01).all()             # large shapes
  assert (freqs[4:] > 0.002).all() and (freqs[4:] < 0.02).all()  # rare ones
  # The rare classes are small objects: no image has many of their pixels.
  assert (labels == 4).sum(axis=(1, 2)).max() < 0.05 * 48 * 48


def test_model_init_is_seeded():
  leaves = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))
  a, b, c = (create_unet(3, 6, width=4, seed=s) for s in (0, 0, 1))
  for x, y in zip(leaves(a), leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, z) for x, z in zip(leaves(a), leaves(c)))


def test_model_output_shape():
  model = create_unet(3, 6, width=4, seed=0)
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(
      state, jnp.zeros((2, 16, 24, 3)))
  assert logits.shape == (2, 16, 24, 6)
  assert bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("loss_name", ["ce", "lovasz"])
def test_train_steps_reduce_the_loss(loss_name):
  x, y = data.make_dataset(4, 16, seed=1)
  model = create_unet(3, data.NUM_CLASSES, width=4, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  step = train.make_train_step(graphdef, tx, train.make_loss(loss_name))
  losses = []
  for _ in range(25):
    params, opt_state, loss = step(params, opt_state, x, y)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.8 * losses[0], losses


def test_make_loss_matches_the_library():
  logits = jax.random.normal(jax.random.key(0), (2, 8, 8, 6))
  labels = jax.random.randint(jax.random.key(1), (2, 8, 8), 0, 6)

  @jax.jit  # one compilation for all of them
  def losses(logits, labels):
    return (train.make_loss("ce")(logits, labels),
            train.make_loss("lovasz", per_image=True)(logits, labels),
            train.make_loss("ce+lovasz", per_image=True)(logits, labels),
            optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
            lovasz_jax.lovasz_softmax(logits, labels, per_image=True),
            lovasz_jax.lovasz_softmax(logits, labels, per_image=False))

  ce, lov, both, ce_ref, lov_ref, lov_batch = losses(logits, labels)
  np.testing.assert_allclose(ce, ce_ref, rtol=1e-6)
  np.testing.assert_allclose(lov, lov_ref, rtol=1e-6)
  np.testing.assert_allclose(both, ce_ref + lov_ref, rtol=1e-6)
  assert abs(float(lov) - float(lov_batch)) > 1e-6  # per_image is passed on
  with pytest.raises(ValueError, match="unknown loss 'dice'"):
    train.make_loss("dice")


def test_format_table():
  iou = np.array([0.9, 0.5, np.nan, 0.25, 0.0, 0.125])
  table = train.format_table(
      np.full(6, 1 / 6), {"A": dict(iou=iou, miou=0.355, per_image_miou=0.4, pixel_acc=0.9),
                          "B": dict(iou=iou, miou=0.5, per_image_miou=0.375,
                                    pixel_acc=0.95)})
  lines = table.splitlines()
  assert lines[0].split() == ["class", "test", "px", "A", "B", "change"]
  assert lines[2].split() == ["background", "16.67%", "0.9000", "0.9000", "+0.0000"]
  assert lines[4].split()[0] == "square" and lines[4].split()[2] == "nan"
  assert re.search(r"^mIoU\s+0\.3550\s+0\.5000\s+\+0\.1450$", table, re.M)
  assert re.search(r"^per-image mIoU\s+0\.4000\s+0\.3750\s+-0\.0250$", table, re.M)
  assert re.search(r"^pixel acc\s+0\.9000\s+0\.9500\s+\+0\.0500$", table, re.M)
  single = train.format_table(np.full(6, 1 / 6),
                              {"A": dict(iou=iou, miou=0.355, pixel_acc=0.9)})
  assert "change" not in single and re.search(r"^mIoU\s+0\.3550$", single, re.M)
  assert "per-image" not in single  # shown only when the results have it


def test_evaluate_scores_the_test_set_with_the_nnx_metric():
  # 10 images in batches of 4: the last batch is padded with 2 images that
  # where= masks out. The metric must equal NumPy references of the
  # predictions it returns.
  x, y = data.make_dataset(10, 16, seed=2)
  model = create_unet(3, data.NUM_CLASSES, width=4, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  metric, preds = train.make_evaluate(graphdef, x, y, batch_size=4)(params)
  assert preds.shape == y.shape
  cm = np.bincount(y.ravel() * data.NUM_CLASSES + preds.ravel(),
                   minlength=data.NUM_CLASSES**2).reshape(data.NUM_CLASSES, -1)
  np.testing.assert_array_equal(metric.state.confusion_matrix(), cm)
  assert int(metric.state.num_images()) == 10
  per_image = []
  for p, t in zip(preds, y):
    tp = np.bincount(t[p == t], minlength=data.NUM_CLASSES)
    union = (np.bincount(t.ravel(), minlength=data.NUM_CLASSES)
             + np.bincount(p.ravel(), minlength=data.NUM_CLASSES) - tp)
    per_image.append(np.mean(tp[union > 0] / union[union > 0]))
  s = train.scores(metric)
  assert abs(s["per_image_miou"] - np.mean(per_image)) <= 1e-6
  assert abs(s["miou"] - float(lovasz_jax.mean_iou(cm))) <= 1e-6
  assert abs(s["pixel_acc"] - np.trace(cm) / cm.sum()) <= 1e-6


def test_help_lists_the_options(capsys):
  with pytest.raises(SystemExit) as exc:
    train.parse_args(["--help"])
  assert exc.value.code == 0
  out = capsys.readouterr().out
  for option in ("--steps", "--finetune-steps", "--finetune-loss", "--image-size",
                 "--batch-size", "--output", "--seed", "--per-image", "--no-progress"):
    assert option in out


@pytest.mark.parametrize("argv", [
    ["--steps", "10", "--finetune-steps", "11"],
    ["--steps", "0"],
    ["--image-size", "30"],
    ["--batch-size", "0"],
    ["--finetune-loss", "dice"],
])
def test_bad_arguments_exit(argv, capsys):
  with pytest.raises(SystemExit) as exc:
    train.parse_args(argv)
  assert exc.value.code == 2
  assert "error" in capsys.readouterr().err


def test_main_end_to_end(tmp_path, capsys):
  out = tmp_path / "figs" / "demo.png"
  result = train.main([
      "--steps", "6", "--finetune-steps", "3", "--batch-size", "4",
      "--image-size", "16", "--width", "4", "--num-train", "16",
      "--num-test", "8", "--eval-every", "3", "--output", str(out),
      "--no-progress"])
  printed = capsys.readouterr().out
  assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert result["output"] == out and str(out) in printed
  assert set(result["results"]) == {"CE", "CE→Lovász"}
  for scores in result["results"].values():
    assert scores["iou"].shape == (data.NUM_CLASSES,)
    assert 0.0 <= scores["miou"] <= 1.0 and 0.0 <= scores["pixel_acc"] <= 1.0
    assert f"{scores['miou']:.4f}" in printed
    assert 0.0 <= scores["per_image_miou"] <= 1.0
    assert f"{scores['per_image_miou']:.4f}" in printed
  for history in result["histories"].values():
    assert history["step"] == list(range(6))
    assert len(history["loss"]) == 6 and np.isfinite(history["loss"]).all()
    assert history["eval_step"] == [3, 6]
  # Both runs share the cross-entropy steps before the switch, then differ.
  h1, h2 = result["histories"].values()
  assert h1["loss"][:3] == h2["loss"][:3]
  assert h1["loss"][3:] != h2["loss"][3:]
  assert "mIoU" in printed and "pixel acc" in printed
  assert re.search(r"^per-image mIoU\s+\d\.\d{4}\s+\d\.\d{4}\s+[+-]\d\.\d{4}$",
                   printed, re.M)
