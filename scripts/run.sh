#!/usr/bin/env bash
# Builds acc (the `dist` profile: release with whole-program optimisation) and starts the gateway: proxy on 127.0.0.1:8080, admin on 127.0.0.1:8081,
# with the policies in policies/ (the default needs no provider keys). Extra arguments go to
# `acc serve`, e.g. `./scripts/run.sh --policies policies/examples/openai.toml`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-onnx.sh >/dev/null
cargo build --profile dist --locked --bin acc
exec "${CARGO_TARGET_DIR:-target}/dist/acc" serve "$@"
