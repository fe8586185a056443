"""Every layout on 8 host devices equals one device (tests/layout_check.py).

The class axis split over a 2-D explicit mesh; sizes the devices do not
divide under jax.set_mesh; per-image losses with images split inside
shard_map (image_axis_name); jax.vmap over a sharded axis; and the metrics
on explicit and automatic meshes, eagerly, under jit, under set_mesh and in
shard_map, with no all-gather of pixels.
"""

import pytest

PATHS = ["native", "portable"]
SOFTMAX = ["batch", "batch_hist", "batch_lean", "per_image", "per_image_hist",
           "per_image_lean"]


def _get(results, path, key):
  if path not in results:
    pytest.skip("native CPU kernel not built")
  assert results[path]["devices"] == 8
  return results[path][key]


def _close(r):
  assert abs(r["value_sharded"] - r["value_single"]) <= 1e-5 * max(1, abs(r["value_single"]))
  if "grad_max_abs" in r:
    assert r["grad_max_abs"] > 0
    assert r["grad_max_abs_diff"] <= 1e-5 * r["grad_max_abs"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["batch", "batch_hist", "batch_lean", "per_image",
                                  "per_image_hist", "sigmoid_multilabel",
                                  "sigmoid_multilabel_per_image"])
def test_class_axis_split_over_a_model_axis(layout_results, path, name):
  _close(_get(layout_results, path, f"class_axis/args/{name}"))
  _close(_get(layout_results, path, f"class_axis/eager/{name}"))
  # The gradient keeps the logits' layout: batch over data, classes over model.
  assert _get(layout_results, path, f"class_axis/grad_spec/{name}") == [
      "data", None, None, "model"]


@pytest.mark.parametrize("path", PATHS)
def test_class_axis_split_under_set_mesh(layout_results, path):
  _close(_get(layout_results, path, "class_axis/set_mesh/batch"))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mesh", ["auto", "explicit"])
@pytest.mark.parametrize("case", [
    "3x5x5/batch", "3x5x5/batch_hist", "3x5x5/per_image", "3x5x5/sigmoid_binary",
    "3x5x5/hinge_batch", "1x375x500/batch", "1x375x500/batch_hist"])
def test_sizes_the_devices_do_not_divide_under_set_mesh(layout_results, path, mesh, case):
  _close(_get(layout_results, path, f"indivisible/{mesh}/{case}"))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["per_image", "per_image_hist", "per_image_lean",
                                  "sigmoid_multilabel_per_image", "hinge_per_image"])
def test_per_image_with_split_images_in_shard_map(layout_results, path, name):
  _close(_get(layout_results, path, f"split_image/with/{name}"))
  # Without image_axis_name each slab counts as an image: another loss,
  # which is why the docstring asks for it (this checks the case is real).
  r = _get(layout_results, path, f"split_image/without/{name}")
  assert abs(r["value_sharded"] - r["value_single"]) > 1e-4


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mesh", ["explicit", "auto"])
@pytest.mark.parametrize("name", ["batch", "batch_hist", "per_image", "hinge_multilabel"])
def test_vmap_over_a_sharded_axis(layout_results, path, mesh, name):
  r = _get(layout_results, path, f"vmap/{mesh}/{name}")
  assert r["value_max_abs_diff"] <= 1e-5 * max(1, r["value_max_abs"])
  assert r["grad_max_abs_diff"] <= 1e-5 * r["grad_max_abs"]


METRIC_MESHES = ["explicit_1d", "auto_1d", "explicit_2d", "explicit_width"]


@pytest.mark.parametrize("mesh", METRIC_MESHES)
@pytest.mark.parametrize("way", ["eager", "jit", "set_mesh", "set_mesh_eager",
                                 "replicated_where", "shard_map"])
def test_confusion_matrix_on_every_layout(layout_results, mesh, way):
  r = _get(layout_results, "portable", f"metrics/{mesh}/{way}")
  assert r["equal"], r
  assert r["ref_total"] > 0


@pytest.mark.parametrize("mesh", METRIC_MESHES)
def test_confusion_matrix_moves_only_the_counts(layout_results, mesh):
  ops = _get(layout_results, "portable", f"metrics/{mesh}/collectives")
  if mesh.startswith("explicit"):
    # Each device counts its block; one all-reduce of the C * C counts.
    assert ops and {op for op, _ in ops} == {"all-reduce"}
    assert sum(n for _, n in ops) <= 25
  else:
    assert not {op for op, _ in ops} & {"all-gather", "all-to-all"}
  miou, ref = _get(layout_results, "portable", f"metrics/{mesh}/mean_iou")
  assert miou == pytest.approx(ref, abs=1e-7)


def test_confusion_matrix_under_vmap_over_a_sharded_axis(layout_results):
  r = _get(layout_results, "portable", "metrics/vmap")
  assert r["equal"] and r["ref_total"] > 0


@pytest.mark.parametrize("mesh", ["explicit", "auto"])
def test_lovasz_grad_of_rows_split_over_devices(layout_results, mesh):
  assert _get(layout_results, "portable", f"lovasz_grad/{mesh}") <= 1e-6
