#!/usr/bin/env bash
# Creates/reuses ./.venv, installs the project, runs the static checks (scripts/check.sh: ruff,
# ruff format --check, mypy; same venv, no reinstall while the stamp is fresh), builds the HTML
# docs with warnings as errors (scripts/build_docs.sh: a broken cross-reference fails here), checks
# the README's install commands (scripts/check_install.sh: the wheel and the clone, each installed
# into a fresh venv and imported), then runs the whole test suite.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
bash scripts/check.sh
bash scripts/build_docs.sh
echo "docs: built into docs/site/ with no warnings"
bash scripts/check_install.sh
exec python -m pytest -q "$@"
