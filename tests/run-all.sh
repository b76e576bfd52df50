#!/usr/bin/env bash
# The one command that runs every dongbo test: formatting and lints, unit tests, and the end-to-end and
# fault scenarios against real PostgreSQL clusters and real dongbo processes.
set -euo pipefail
cd "$(dirname "$0")/.."

./deploy/install-deps.sh --kafka-broker
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The scenarios start the real binaries, so build them first, and the legacy agent (glibc 2.17).
cargo build --workspace --bins
./deploy/build-legacy.sh
./deploy/package-legacy.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
