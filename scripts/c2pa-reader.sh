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
# shellcheck source=lib/install.sh
source "$root/scripts/lib/install.sh"

setup() {
    venv_pin "$me" "$venv" c2pa "c2pa-python==$C2PA_PYTHON_VERSION" || exit 1
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
