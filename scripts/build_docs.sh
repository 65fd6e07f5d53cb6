#!/usr/bin/env bash
# Creates/reuses ./.venv, installs the project and the `docs` extra, then builds the HTML
# reference into docs/site/ (open docs/site/index.html). Warnings are errors (-W), so a broken
# cross-reference or docstring markup fails the build. Offline: MathJax is bundled.
# Extra arguments go to sphinx-build (e.g. -E to rebuild everything).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
DOCS_STAMP="$VENV/.lightning_hessian-docs-installed"
if [ ! -f "$DOCS_STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$DOCS_STAMP" ]; then
    python -m pip install --quiet -e "$ROOT[docs]"
    touch "$DOCS_STAMP"
fi
exec python -m sphinx -b html -W --keep-going -q -d docs/_build/doctrees docs docs/site "$@"
