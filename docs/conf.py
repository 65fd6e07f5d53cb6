"""Sphinx configuration: the lightning_hessian HTML reference (``bash scripts/build_docs.sh``).

The API pages are generated here, at configuration time, from the package's ``__all__`` lists
(see :mod:`docs._apigen`), so a new public name or module appears without editing any page.
Everything is offline: the theme and MathJax come from installed packages.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# Document the checkout being built, not whatever copy of the package is installed.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS))

import _apigen  # noqa: E402  (needs the paths above)

import lightning_hessian  # noqa: E402

project = "lightning_hessian"
author = "the lightning_hessian developers"
copyright = "2026, the lightning_hessian developers"
release = lightning_hessian.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # bundles MathJax 3 into _static/: formulas render without a network
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["site", "_build", "**/.ipynb_checkpoints", "README.md"]
templates_path: list[str] = []

# Docstrings: Google sections (napoleon) with reST roles and :math: as written in the code.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # dataclass "Attributes:" as field lists (autodoc does not document them twice)
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True, "undoc-members": False, "special-members": ""}
autosummary_generate = False  # _apigen writes the per-object pages itself
add_module_names = False
python_use_unqualified_type_names = True

# Broken internal references are errors; third-party types (no network: no intersphinx) are not.
nitpicky = True
_EXTERNAL_MODULES = [
    "torch", "lightning", "pytorch_lightning", "numpy", "np", "nn", "pl", "matplotlib", "scipy",
    "collections", "typing", "typing_extensions", "pathlib", "os", "dataclasses", "enum", "abc",
    "contextlib", "argparse",
]  # fmt: skip
_EXTERNAL_NAMES = [
    "Tensor", "Module", "Parameter", "DataLoader", "Dataset", "Generator", "Callback", "Trainer",
    "LightningModule", "Optimizer", "device", "dtype", "Path", "Iterable", "Iterator", "Sequence",
    "Mapping", "Callable", "Any", "Literal", "Protocol", "TypeAlias", "ndarray", "ArrayLike", "NDArray",
    "Figure", "SummaryWriter", "ExitStack", "AbstractContextManager", "TracebackType", "Self",
]  # fmt: skip
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(_EXTERNAL_MODULES)})(\..*)?"),
    (r"py:.*", rf"({'|'.join(_EXTERNAL_NAMES)})"),
    (r"py:.*", r".*\.(T|V|B)"),  # type variables
    # Pieces of a generic annotation (``dict[str, int]`` in a napoleon ``Attributes:`` type) that
    # the field parser did not split: not references anyone wrote.
    (r"py:.*", r".*[\[\]].*"),
]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"lightning_hessian {release}"
html_static_path = ["_static"]
html_show_sourcelink = False
html_last_updated_fmt = None

_apigen.generate(DOCS / "api")


def setup(app: object) -> None:
    """Resolve references to public objects through their re-exported paths."""
    app.connect("missing-reference", _apigen.resolve_reexported)
    app.connect("autodoc-process-docstring", _apigen.remember_property_docstring, priority=100)
    app.connect("autodoc-process-docstring", _apigen.restore_property_docstring, priority=900)
