#!/usr/bin/env bash
# The one test command: set-up, then the whole cargo test suite. Exits non-zero on failure.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Python venv with the official openai SDK (tests/sdk.rs).
scripts/python-env.sh >/dev/null
# ONNX Runtime and evaluator models (PyPI wheels, SHA-256 checked) and the test photos.
scripts/setup-onnx.sh >/dev/null
scripts/fetch-testimages.sh >/dev/null
scripts/ocr-testimages.sh >/dev/null
# Tiny CLIP encoders and classifier with numpy reference outputs (no CLIP weights ship in any
# package registry; tests/clip.rs and tests/models_configured.rs use these).
scripts/tiny-models.sh >/dev/null

cargo test --all-targets "$@"

# deploy/: Prometheus rules (promtool check + unit tests), dashboard queries, Kubernetes policy,
# and every metric they use checked against a running acc (installs promtool if missing).
ACC_BIN=target/debug/acc scripts/check-deploy.sh
