#!/usr/bin/env bash
# Creates (idempotently) the Python virtual environment used by the SDK compatibility test:
# .cache/venv at the repository root, with the official `openai` SDK installed from PyPI.
# Prints nothing on stdout except, on the last line, the path of the venv's python.
set -euo pipefail

OPENAI_VERSION="3.57.0"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/install.sh
source "$root/scripts/lib/install.sh"
venv="$root/.cache/venv"

# One creator at a time (scripts/test.sh and the sdk test may both call this).
venv_pin python-env.sh "$venv" openai "openai==$OPENAI_VERSION" || exit 1

echo "$venv/bin/python"
