"""Sphinx configuration of lovasz_jax's documentation (``make docs``).

Pages are MyST Markdown; the API page is generated from the docstrings
(autodoc with napoleon); the quickstart notebook is executed by myst-nb.
Every Python example on every page is executed while the pages are read
(``_ext/lovasz_docs.py``), and the build treats warnings as errors, so a page
cannot drift from the code.
"""

import os
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))

import lovasz_jax

project = "lovasz_jax"
author = "The lovasz_jax authors"
copyright = "The lovasz_jax authors"  # pylint: disable=redefined-builtin
version = release = lovasz_jax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
    "lovasz_docs",
]

root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}

# MyST: $...$ math, ::: fences, and heading anchors for links between pages.
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# autodoc and napoleon (Google-style docstrings).
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# The notebook runs at build time, offline, on CPU, with fewer steps than
# its default so that the build stays short (LOVASZ_NB_STEPS; the page says
# so). Only .ipynb files are notebooks here: the Markdown pages' examples are
# run by lovasz_docs.
os.environ.setdefault("LOVASZ_NB_STEPS", "150")
os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_in_temp = True
nb_merge_streams = True

html_theme = "sphinx_book_theme"
html_title = f"lovasz_jax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
}
html_static_path = []
