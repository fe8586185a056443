"""Sphinx extension of lovasz_jax's docs: example execution and the API list.

Examples. While a page is read, every Python code block on it (```python
fences, including those a page includes from the README) runs in order in
one namespace per page, and every ``>>>`` example of a docstring runs as a
doctest. A failure is a warning, which ``make docs`` (``-W``) turns into an
error. A block that cannot run where the docs are built (several processes,
a GPU or TPU, the full benchmark) is written as

    ```{code-block} python
    :class: no-run
    :caption: Not run when the docs build: needs ...
    ```

and must carry such a caption, so that the reader sees it is not run. The
build fails if no example ran at all (the runner would be broken).

API. ``{lovasz-api} MODULE`` lists every name in ``MODULE.__all__`` with its
full docstring (autodoc), in ``__all__``'s order, so a new public name
appears without editing the page. Constants have no docstring of their own:
the directive's content gives each one a line ``NAME: description`` (in
reStructuredText), and a constant without one is an error. With the ``:optional:`` flag a module that
does not exist gives a one-line note instead.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import inspect
import io
import traceback
import types

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

logger = logging.getLogger(__name__)

PYTHON = ("python", "python3", "py")
SKIP_CLASS = "no-run"
SKIP_CAPTION = "Not run when the docs build"


def _caption(block: nodes.literal_block) -> str:
  parent = block.parent
  if isinstance(parent, nodes.container) and parent.get("literal_block"):
    for child in parent.children:
      if isinstance(child, nodes.caption):
        return child.astext()
  return ""


def _run_examples(app, doctree) -> None:
  docname = app.env.docname
  if str(app.env.doc2path(docname)).endswith(".ipynb"):
    return  # a notebook's cells are executed by myst-nb
  namespace: dict = {"__name__": f"docs_{docname.replace('/', '_')}"}
  doctest_globs: dict = {"__name__": namespace["__name__"]}
  ran = skipped = 0
  for node in doctree.findall(
      lambda n: isinstance(n, (nodes.literal_block, nodes.doctest_block))):
    source = node.astext()
    if isinstance(node, nodes.doctest_block):
      parser = doctest.DocTestParser()
      test = parser.get_doctest(source, doctest_globs, docname, node.source,
                                node.line or 0)
      runner = doctest.DocTestRunner(verbose=False)
      out = io.StringIO()
      runner.run(test, out=out.write, clear_globs=False)
      if runner.failures:
        logger.warning("docstring example failed:\n%s", out.getvalue(),
                       location=node)
      ran += 1
      continue
    if node.get("language") not in PYTHON:
      continue
    if SKIP_CLASS in node.get("classes", []):
      if not _caption(node).startswith(SKIP_CAPTION):
        logger.warning("a %r code block needs a caption starting %r",
                       SKIP_CLASS, SKIP_CAPTION, location=node)
      skipped += 1
      continue
    try:
      code = compile(source, f"<{docname}: line {node.line}>", "exec")
      with contextlib.redirect_stdout(io.StringIO()):
        exec(code, namespace)  # noqa: S102  pylint: disable=exec-used
    except Exception:  # noqa: BLE001  pylint: disable=broad-exception-caught
      logger.warning("code example failed:\n%s\n%s", source,
                     traceback.format_exc(), location=node)
    ran += 1
  counts = app.env.lovasz_examples if hasattr(app.env, "lovasz_examples") else {}
  counts[docname] = (ran, skipped)
  app.env.lovasz_examples = counts


def _purge(app, env, docname) -> None:
  del app
  getattr(env, "lovasz_examples", {}).pop(docname, None)


def _merge(app, env, docnames, other) -> None:
  del app, docnames
  env.lovasz_examples = {**getattr(env, "lovasz_examples", {}),
                         **getattr(other, "lovasz_examples", {})}


def _report(app, exception) -> None:
  if exception is not None:
    return
  counts = getattr(app.env, "lovasz_examples", {})
  ran = sum(r for r, _ in counts.values())
  skipped = {d: s for d, (_, s) in counts.items() if s}
  logger.info("lovasz_docs: ran %d examples; not run (marked): %s", ran,
              skipped or "none")
  if counts and ran == 0:
    logger.warning("lovasz_docs: no example ran: is the runner broken?")


class ApiDirective(SphinxDirective):
  """``{lovasz-api} MODULE``: every name in ``MODULE.__all__``, documented."""

  required_arguments = 1
  has_content = True
  option_spec = {"optional": directives.flag}  # noqa: RUF012

  def run(self) -> list[nodes.Node]:
    name = self.arguments[0]
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as error:
      if "optional" in self.options and error.name == name:
        para = nodes.paragraph(text=f"{name} is not part of this version.")
        return [para]
      raise self.error(f"cannot import {name}: {error}") from error
    notes = {}
    for line in self.content:
      if line.strip():
        key, sep, text = line.partition(":")
        if not sep:
          raise self.error(f"expected 'NAME: description', got {line!r}")
        notes[key.strip()] = text.strip()
    public = getattr(module, "__all__", None)
    if public is None:
      raise self.error(f"{name} has no __all__")
    unknown = set(notes) - set(public)
    if unknown:
      raise self.error(f"descriptions of names not in {name}.__all__: "
                       f"{sorted(unknown)}")
    lines: list[str] = []
    for attr in public:
      obj = getattr(module, attr)
      full = f"{name}.{attr}"
      if isinstance(obj, types.ModuleType):
        continue  # documented by its own directive
      if inspect.isclass(obj):
        lines += [f".. autoclass:: {full}", "   :members:", ""]
      elif callable(obj):
        lines += [f".. autofunction:: {full}", ""]
      else:
        if attr not in notes:
          raise self.error(f"{full} is a constant without a docstring: add "
                           f"a line '{attr}: description' to the directive")
        lines += [f".. py:data:: {full}", f"   :value: {obj!r}", "",
                  f"   {notes[attr]}", ""]
    self.env.note_dependency(inspect.getsourcefile(module) or "")
    if type(self.state).__module__.startswith("myst_parser"):
      # On a MyST page nested content is parsed as Markdown: wrap the
      # autodoc directives (reStructuredText) in an eval-rst block.
      lines = ["```{eval-rst}", *lines, "```"]
    container = nodes.container()
    nested_parse_with_titles(self.state, StringList(lines, source=name),
                             container)
    return container.children


def setup(app):
  app.add_directive("lovasz-api", ApiDirective)
  app.connect("doctree-read", _run_examples)
  app.connect("env-purge-doc", _purge)
  app.connect("env-merge-info", _merge)
  app.connect("build-finished", _report)
  return {"version": "1", "parallel_read_safe": True,
          "parallel_write_safe": True}
