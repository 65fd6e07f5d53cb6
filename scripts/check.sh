#!/usr/bin/env bash
# Creates/reuses ./.venv, installs the project, then runs the static checks:
# ruff (lint), ruff format --check, mypy over lightning_hessian/ (settings in pyproject.toml), and
# scripts/check_sizes.py (no function body over 80 lines, no class over 300, docstrings excluded,
# except the units in scripts/size_allowlist.txt; imports follow the layers of docs/architecture.md).
# Runs all four and fails if any fails. Offline once the venv exists.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
status=0
echo "== ruff check"
python -m ruff check . || status=1
echo "== ruff format --check"
python -m ruff format --check . || status=1
echo "== mypy"
python -m mypy || status=1
echo "== sizes and layers (scripts/check_sizes.py)"
python scripts/check_sizes.py || status=1
if [ "$status" -ne 0 ]; then
    echo "check.sh: FAILED (fix the findings above; 'ruff check --fix' and 'ruff format' fix many)" >&2
else
    echo "check.sh: all checks passed"
fi
exit "$status"
