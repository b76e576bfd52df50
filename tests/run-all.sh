#!/usr/bin/env bash
# The one command that runs every dongbo test: formatting and lints, unit tests, and the end-to-end and
# fault scenarios against real PostgreSQL clusters and real dongbo processes.
set -euo pipefail
cd "$(dirname "$0")/.."

./deploy/install-deps.sh --kafka-broker
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p dongbo-agent --features odbc --all-targets -- -D warnings
# The scenarios start the real binaries, so build them first, and the legacy agent (glibc 2.17).
cargo build --workspace --bins
# The agent with ODBC polling (the odbc feature links unixODBC), kept beside the default one.
cargo build -p dongbo-agent --features odbc
cp target/debug/dongbo-agent target/debug/dongbo-agent-odbc
cargo build -p dongbo-agent
./deploy/build-legacy.sh
./deploy/package-legacy.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
  cargo nextest run -p dongbo-connectors --features odbc --no-fail-fast odbc
else
  cargo test --workspace --no-fail-fast
  cargo test -p dongbo-connectors --features odbc --no-fail-fast odbc
fi
