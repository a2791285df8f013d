#!/usr/bin/env bash
# The independent C2PA reader of the provenance tests (tests/provenance.rs): the official
# `c2pa-python` package from PyPI (a binary wheel of the C2PA reference SDK) in the venv
# .cache/c2pa-venv, running scripts/c2pa_read.py.
#
#   scripts/c2pa-reader.sh setup              creates the venv (idempotently); prints the venv's
#                                             python on the last line
#   scripts/c2pa-reader.sh read IMAGE [PEM]   prints the reader's JSON for IMAGE (PEM: trust
#                                             anchors)
set -euo pipefail

C2PA_PYTHON_VERSION="0.38.1"

me="c2pa-reader.sh"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.cache/c2pa-venv"
py="$venv/bin/python"

ready() {
    [ -x "$py" ] && "$py" - "$C2PA_PYTHON_VERSION" >/dev/null 2>&1 <<'PYEOF'
import sys
from importlib.metadata import version
import c2pa  # noqa: F401
sys.exit(0 if version("c2pa-python") == sys.argv[1] else 1)
PYEOF
}

setup() {
    command -v python3 >/dev/null 2>&1 || { echo "$me: python3 is not installed (apt-get install python3 python3-venv)" >&2; exit 1; }
    mkdir -p "$root/.cache"
    exec 9>"$root/.cache/c2pa-venv.lock"
    if command -v flock >/dev/null 2>&1; then
        flock 9
    fi
    if ! ready; then
        echo "$me: setting up $venv (c2pa-python==$C2PA_PYTHON_VERSION)" >&2
        if [ ! -x "$py" ]; then
            rm -rf "$venv"
            python3 -m venv "$venv" >&2 || { echo "$me: 'python3 -m venv' failed (apt-get install python3-venv)" >&2; exit 1; }
        fi
        "$py" -m pip install --disable-pip-version-check --quiet "c2pa-python==$C2PA_PYTHON_VERSION" >&2
        ready || { echo "$me: c2pa-python==$C2PA_PYTHON_VERSION is still not importable from $py" >&2; exit 1; }
    fi
    echo "$py"
}

case "${1:-}" in
    setup) setup ;;
    read)
        shift
        py="$(setup | tail -n 1)"
        exec "$py" "$root/scripts/c2pa_read.py" "$@"
        ;;
    *) echo "usage: $me setup | read IMAGE [TRUST_ANCHORS_PEM]" >&2; exit 2 ;;
esac
