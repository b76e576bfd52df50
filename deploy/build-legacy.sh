#!/usr/bin/env bash
# Builds the agent for the old servers provincial IT runs it on: glibc 2.17 and later (CentOS/RHEL 7,
# RHEL 8, Ubuntu 20.04), without the Kafka transport (librdkafka would bring an OpenSSL newer than
# theirs; such agents ship over gRPC). Cross-linked with zig against glibc 2.17's symbols by
# cargo-zigbuild, both from PyPI. Prints the highest GLIBC_ symbol version the binary needs and
# refuses one above 2.17.
#
#   ./deploy/build-legacy.sh        → target/legacy/dongbo-agent
set -euo pipefail
cd "$(dirname "$0")/.."

# Versions known to build this workspace.
ZIGLANG=0.17.1
ZIGBUILD=0.24.1
if ! python3 -m ziglang version >/dev/null 2>&1 || ! command -v cargo-zigbuild >/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check "ziglang==$ZIGLANG" "cargo-zigbuild==$ZIGBUILD"
fi

target=x86_64-unknown-linux-gnu
# A target directory of its own: the legacy build's C objects are not the normal build's.
export CARGO_TARGET_DIR="$PWD/target/legacy-build"
cargo zigbuild --release -p dongbo-agent --no-default-features --target "$target.2.17"
mkdir -p target/legacy
cp "$CARGO_TARGET_DIR/$target/release/dongbo-agent" target/legacy/dongbo-agent

highest=$(objdump -T target/legacy/dongbo-agent | grep -o 'GLIBC_[0-9][0-9.]*' | sort -u -V | tail -1)
echo "target/legacy/dongbo-agent needs at most $highest"
if [ "$(printf '%s\n' "$highest" GLIBC_2.17 | sort -V | tail -1)" != GLIBC_2.17 ]; then
  echo "error: $highest is newer than glibc 2.17" >&2
  exit 1
fi
