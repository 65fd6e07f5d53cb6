#!/usr/bin/env bash
# Creates/reuses ./.venv, installs the project, runs the static checks (scripts/check.sh: ruff,
# ruff format --check, mypy; same venv, no reinstall while the stamp is fresh), then the whole test suite.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
bash scripts/check.sh
exec python -m pytest -q "$@"
