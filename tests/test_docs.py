"""The documentation: the API page, the example runner, the README, metadata.

``make docs`` builds the whole site (every example executed); these tests
check the parts that must not drift, quickly: the API page (built alone)
names every public name, the docs' example runner fails on a failing example,
the README stays short, and no link points at a repository that does not
exist.
"""

import importlib
import pathlib
import re
import subprocess
import sys
import types

import pytest

import lovasz_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _public(module) -> list[str]:
  return [name for name in module.__all__
          if not isinstance(getattr(module, name), types.ModuleType)]


def _build(srcdir, outdir, **overrides) -> tuple[str, str]:
  """Builds HTML in a fresh process; returns (the warnings, the root page)."""
  pytest.importorskip("sphinx", reason="Sphinx is in the docs extra")
  pytest.importorskip("myst_parser", reason="MyST is in the docs extra")
  defines = []
  for key, value in overrides.items():
    defines += ["-D", f"{key}={','.join(value) if isinstance(value, list) else value}"]
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-E", "-q", "-b", "html", *defines,
       "-w", str(outdir / "warnings.txt"), str(srcdir), str(outdir / "html")],
      capture_output=True, text=True, timeout=600, check=False)
  warnings = (outdir / "warnings.txt").read_text(encoding="utf-8")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  root = overrides.get("root_doc", "index")
  return warnings, (outdir / "html" / f"{root}.html").read_text(encoding="utf-8")


def test_api_page_names_every_public_name(tmp_path):
  others = [p.relative_to(DOCS).as_posix() for p in DOCS.iterdir()
            if p.suffix in (".md", ".ipynb") and p.name != "api.md"]
  warnings, html = _build(DOCS, tmp_path, root_doc="api",
                          exclude_patterns=["_build", "_ext", *others],
                          nb_execution_mode="off")
  ids = set(re.findall(r'id="([\w.]+)"', html))
  expected = {f"lovasz_jax.{name}" for name in _public(lovasz_jax)}
  try:
    nnx = importlib.import_module("lovasz_jax.nnx")
  except ModuleNotFoundError:
    assert "lovasz_jax.nnx is not part of this version" in html
  else:
    expected |= {f"lovasz_jax.nnx.{name}" for name in _public(nnx)}
  assert len(expected) >= 11
  assert expected <= ids, (sorted(expected - ids), warnings)
  # Each entry carries its docstring, not only its name.
  for name in ("lovasz_softmax", "confusion_matrix", "SOFTMAX_STATIC_ARGNAMES"):
    entry = html[html.index(f'id="lovasz_jax.{name}"'):]
    assert "<dd>" in entry[:entry.index("</dl>")], name
  # The docstrings' own examples ran (a failure would be a warning).
  assert "example failed" not in warnings, warnings


def _site(tmp_path):
  """A Sphinx source folder whose conf.py loads only the example runner."""
  src = tmp_path / "src"
  src.mkdir()
  (src / "conf.py").write_text(
      "import sys\n"
      f"sys.path.insert(0, {str(DOCS / '_ext')!r})\n"
      "extensions = ['myst_parser', 'lovasz_docs']\n", encoding="utf-8")
  return src


@pytest.mark.parametrize("page, message", [
    ("```python\nx = 1\nassert x == 2\n```\n", "code example failed"),
    ("```{code-block} python\n:class: no-run\n\nraise SystemExit\n```\n",
     "needs a caption starting 'Not run when the docs build'"),
    ("no examples at all\n", "no example ran"),
])
def test_example_runner_fails_loudly(tmp_path, page, message):
  src = _site(tmp_path)
  (src / "index.md").write_text("# Page\n\n" + page, encoding="utf-8")
  warnings, _ = _build(src, tmp_path / "out")
  assert message in warnings, warnings


def test_example_runner_runs_and_skips_marked_blocks(tmp_path):
  src = _site(tmp_path)
  marker = tmp_path / "ran.txt"
  (src / "index.md").write_text(
      "# Page\n\n```python\nimport pathlib\nx = 41\n```\n\n"
      f"```python\npathlib.Path({str(marker)!r}).write_text(str(x + 1))\n```\n\n"
      "```{code-block} python\n:class: no-run\n"
      ":caption: Not run when the docs build: needs 8 processes\n\n"
      "raise SystemExit\n```\n", encoding="utf-8")
  warnings, html = _build(src, tmp_path / "out")
  assert not warnings, warnings
  assert marker.read_text() == "42"  # one namespace per page, in order
  assert "Not run when the docs build: needs 8 processes" in html


def test_readme_is_short_and_keeps_the_two_commands():
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  assert len(readme.splitlines()) <= 200
  assert "make demo" in readme and "make test" in readme and "make docs" in readme
  # The long sections live on the docs pages, not here too.
  for heading in ("## Semantics", "## Performance", "## Multi-device training",
                  "## Metrics", "## The GPU/TPU path", "## API"):
    assert f"\n{heading}\n" not in readme, heading


def test_no_link_to_a_repository_that_does_not_exist():
  files = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "CHANGELOG.md",
           ROOT / "notebooks" / "quickstart.ipynb", *DOCS.glob("*.md")]
  for path in files:
    text = path.read_text(encoding="utf-8")
    assert "lovasz-jax/lovasz_jax" not in text, path
    assert "colab.research.google.com/github" not in text, path
  assert "[project.urls]" not in (ROOT / "pyproject.toml").read_text()


def test_version_is_the_changelogs_newest():
  changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
  newest = re.search(r"^## \[(\d+\.\d+\.\d+)\]", changelog, re.MULTILINE).group(1)
  assert newest == lovasz_jax.__version__
