#!/usr/bin/env bash
# Creates/reuses ./.venv, installs the project, runs the whole test suite.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec python -m pytest -q "$@"
