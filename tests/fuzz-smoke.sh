#!/usr/bin/env bash
# Smoke-runs every fuzz target for a short while (FUZZ_SECONDS, default 20 s each) with nightly
# Rust and cargo-fuzz (installed if missing). Not part of ./tests/run-all.sh: building the targets
# with sanitizers takes several minutes on two cores. A crash leaves its input in
# fuzz/artifacts/<target>/ and makes this script fail.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-20}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
targets=(replication_framing pgoutput text_values wire_to_plan wire_decoders filter type_names config webhook_signature)
# One target/ for the whole repository.
export CARGO_TARGET_DIR="$PWD/target/fuzz"
# No AddressSanitizer: the bundled C libraries (librdkafka, zstd) do not link with it, and the
# targets look for panics, overflows and runaway allocation in safe Rust, which libFuzzer finds alone.
cargo +nightly fuzz build --sanitizer none
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  # The two batch targets read the same input: each starts from what the other has found.
  if [[ $t == wire_decoders && -d fuzz/corpus/wire_to_plan ]]; then cp -n fuzz/corpus/wire_to_plan/* "fuzz/corpus/$t/" 2>/dev/null || true; fi
  log="target/fuzz/$t.log"
  if cargo +nightly fuzz run --sanitizer none "$t" "fuzz/corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
      -max_len=65536 >"$log" 2>&1; then
    echo "== $t: $(grep -E '^#[0-9]+' "$log" | tail -n 1)"
  else
    echo "== $t FAILED; its input is in fuzz/artifacts/$t/:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
done
echo "all ${#targets[@]} fuzz targets ran ${seconds} s each without a crash"
