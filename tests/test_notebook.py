"""notebooks/quickstart.ipynb runs top to bottom, offline, on CPU.

The notebook reads its step count and image size from environment variables
(``LOVASZ_NB_STEPS``, ``LOVASZ_NB_IMAGE_SIZE``); this test sets them small.
"""

import json
import os
import pathlib
import re

import pytest

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"
# The project has no public repository yet: no link may point at one.
NO_REPOSITORY_URL = re.compile(r"github\.com|colab\.research|git\+https?:")


def test_notebook_is_saved_without_outputs():
  nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code
  for cell in code:
    assert cell["outputs"] == [] and cell["execution_count"] is None
  text = "".join("".join(c["source"]) for c in nb["cells"])
  assert not NO_REPOSITORY_URL.search(text), NO_REPOSITORY_URL.search(text)


def test_notebook_install_cell_is_guarded():
  nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
  source = "".join(nb["cells"][1]["source"])
  assert re.search(
      r"try:\n\s+import lovasz_jax\nexcept ImportError:\n"
      r"\s+%pip install -q lovasz_jax flax optax matplotlib\n", source), source


def _imports_or_skip():
  for module in ("nbclient", "nbformat", "ipykernel", "matplotlib", "flax"):
    pytest.importorskip(module, reason=f"{module} is needed to run the notebook "
                        "(pip install -e '.[notebooks,examples]')")


def test_notebook_runs(monkeypatch, tmp_path):
  _imports_or_skip()
  import nbformat  # pylint: disable=import-outside-toplevel
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel

  monkeypatch.setenv("LOVASZ_NB_STEPS", "12")
  monkeypatch.setenv("LOVASZ_NB_IMAGE_SIZE", "32")
  # Older jupyter_core warns (DeprecationWarning) unless this is set.
  monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
  # The kernel ("python3" runs this interpreter) imports this checkout.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (str(NOTEBOOK.parent.parent), os.environ.get("PYTHONPATH"))
      if p))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(
      nb, timeout=300, kernel_name="python3", allow_errors=False,
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()

  outputs = []
  for cell in nb.cells:
    if cell.cell_type == "code":
      for out in cell.outputs:
        assert out.output_type != "error", out
        outputs.append(out)
  text = "".join(out.get("text", "") for out in outputs
                 if out.output_type == "stream")
  assert re.search(r"^backend: \w+, devices: \[", text, re.M), text
  assert re.search(r"^mIoU\s+\d\.\d{4}\s+\d\.\d{4}$", text, re.M), text
  assert re.search(r"^per-image mIoU\s+\d\.\d{4}\s+\d\.\d{4}$", text, re.M), text
  assert re.search(r"^pixel acc\s+\d\.\d{4}\s+\d\.\d{4}$", text, re.M), text
  assert "CE → Lovász: trained 12 steps" in text
  images = [out for out in outputs if out.output_type == "display_data"
            and "image/png" in out.get("data", {})]
  assert len(images) >= 2  # predictions and IoU bars / loss curves
