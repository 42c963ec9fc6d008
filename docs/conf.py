"""Sphinx configuration for flgraph's documentation site (``make docs`` builds it, warnings fail)."""

from __future__ import annotations

import flgraph

project = "flgraph"
author = "the flgraph developers"
copyright = "the flgraph developers"
release = version = getattr(flgraph, "__version__", "0.1.0")

extensions = [
    "myst_nb",  # MyST markdown pages, executed code cells, and the notebooks as tutorials
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings' "Example:" / "Args:" sections
    "sphinx.ext.viewcode",
]

html_theme = "furo"
html_title = "flgraph"
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints"]
nb_execution_excludepatterns = ["tutorials/*"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Pages written as MyST notebooks run at build time, so their examples cannot go stale; the tutorials
# (notebooks/) are rendered with the outputs they were saved with: the test suite runs them.
nb_execution_mode = "auto"
nb_execution_timeout = 300
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "ignore-module-all": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False



def setup(app):  # type: ignore[no-untyped-def]
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    import generated

    generated.write(here)
