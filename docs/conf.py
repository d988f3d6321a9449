"""Sphinx configuration: the guides are Markdown (MyST), the reference comes from the
docstrings (autodoc). Build: sphinx-build -W --keep-going -b html docs docs/_build/html"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

# pydist.joblib needs joblib (an optional extra): without it, autodoc documents it against
# a stand-in, so that the site builds everywhere.
try:
    import joblib  # noqa: F401
except ImportError:
    autodoc_mock_imports = ["joblib"]

project = "pydist"
author = "the pydist developers"
copyright = "2026, the pydist developers"
release = version = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# Docstrings use `name` for code: render it as code, not as a cross-reference.
default_role = "code"
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True, "show-inheritance": True}

html_theme = "furo" if "PYDIST_DOCS_PLAIN" not in os.environ else "alabaster"
html_title = "pydist"
