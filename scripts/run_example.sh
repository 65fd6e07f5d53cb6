#!/usr/bin/env bash
# Creates/reuses ./.venv, installs the project, runs the main example (digits MLP).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec python examples/digits_monitor.py "$@"
