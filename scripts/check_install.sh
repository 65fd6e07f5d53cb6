#!/usr/bin/env bash
# The README's "Install" commands, as CI runs them (scripts/run_tests.sh calls this after the
# static checks): build the wheel with `python -m build --wheel`, install it into a fresh venv,
# then install the clone with `pip install .` into another fresh venv, and import the package,
# its callbacks and the console script from each, outside the source tree.
#
# Cheap and offline: the wheel is built with --no-isolation (the setuptools of the current venv,
# no download), and the fresh venvs get the package with --no-deps; its dependencies (torch,
# lightning, ...) come from the current venv through a .pth file that appends that venv's
# site-packages to sys.path *after* the fresh venv's own, so the installed wheel, not the source
# tree or an editable install, is what gets imported (checked below). Fails on any setuptools
# deprecation warning during the build (e.g. the old `license = {text = ...}` table).
# Run it from an environment with the `dev` extra (it brings `build`): ~15 s.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
cd "$ROOT"
HAD_BUILD_DIR=0 HAD_EGG_INFO=0
[ -e "$ROOT/build" ] && HAD_BUILD_DIR=1
[ -e "$ROOT/lightning_hessian.egg-info" ] && HAD_EGG_INFO=1
clean_build_dir() {  # setuptools' staging folders, left in the clone by --no-isolation
    [ "$HAD_BUILD_DIR" = 1 ] || rm -rf "$ROOT/build"
    [ "$HAD_EGG_INFO" = 1 ] || rm -rf "$ROOT/lightning_hessian.egg-info"
}

echo "== python -m build --wheel"
"$PY" -m build --wheel --no-isolation --outdir "$TMP/dist" . >"$TMP/build.log" 2>&1 || {
    cat "$TMP/build.log"
    exit 1
}
if grep -n -i "deprecat" "$TMP/build.log"; then
    echo "check_install.sh: the build printed a deprecation warning (above)" >&2
    exit 1
fi
WHEEL="$(ls "$TMP"/dist/lightning_hessian-*.whl)"
echo "built $(basename "$WHEEL")"
clean_build_dir

DEPS="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

fresh_venv() {  # fresh_venv DIR: an empty venv whose dependencies come from the current venv
    "$PY" -m venv --without-pip "$1"
    "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' >"$TMP/site"
    echo "$DEPS" >"$(cat "$TMP/site")/_lightning_hessian_deps.pth"
}

pip_into() {  # pip_into VENV ARGS...: the current venv's pip installs into VENV, offline
    "$PY" -m pip --python "$1/bin/python" install --quiet --no-deps --no-index "${@:2}"
}

import_check() {  # import_check VENV: the installed copy is imported, with its data and script
    (
        cd "$TMP"
        unset PYTHONPATH
        "$1/bin/python" - "$1" <<'EOF'
import importlib.metadata as md
import pathlib
import sys

import lightning_hessian
import lightning_hessian.analysis
import lightning_hessian.callbacks

venv = pathlib.Path(sys.argv[1]).resolve()
where = pathlib.Path(lightning_hessian.__file__).resolve()
assert venv in where.parents, f"imported {where}, not the copy installed in {venv}"
assert (where.parent / "py.typed").is_file(), "py.typed missing from the installed package"
meta = md.metadata("lightning_hessian")
assert meta["License-Expression"] == "Apache-2.0", meta["License-Expression"]
extras = set(meta.get_all("Provides-Extra") or [])
assert {"plot", "dev"} <= extras, extras
print(f"imported {where.parent} (License-Expression {meta['License-Expression']}, extras {sorted(extras)})")
EOF
        "$1/bin/lightning-hessian" --help >/dev/null
    )
}

echo "== wheel into a fresh venv"
fresh_venv "$TMP/venv-wheel"
pip_into "$TMP/venv-wheel" "$WHEEL"
import_check "$TMP/venv-wheel"

echo "== pip install . into a fresh venv"
fresh_venv "$TMP/venv-clone"
pip_into "$TMP/venv-clone" --no-build-isolation "$ROOT"
clean_build_dir
import_check "$TMP/venv-clone"
echo "check_install.sh: wheel and clone install and import"
