#!/usr/bin/env bash
# Bounded fuzzing of every decoder of untrusted input (README "Fuzzing"); `.ci/run` calls it.
#
# Builds the fuzz targets (nightly, libFuzzer, LeakSanitizer) and runs each for FUZZ_SECONDS
# (default 30) from a scratch copy of its committed seeds in fuzz/corpus/<target>/, which is
# never written to; FUZZ_JOBS targets (default: one per core) run at a time. Any crash, panic,
# failed assertion, leak, timeout or out-of-memory fails the script; the input that caused it
# is left in fuzz/artifacts/<target>/ and the report is printed.
#
#   FUZZ_SECONDS=300 fuzz/run.sh                    # longer
#   FUZZ_TARGETS="frame_decode" fuzz/run.sh         # some targets only
#   FUZZ_SANITIZER=address fuzz/run.sh              # AddressSanitizer (with its leak checker)
#
# Build cost. The build instruments the proxy and every dependency it is built with, and on
# CI's two cores it is most of the time: measured from an empty fuzz/target, 551 s with
# AddressSanitizer at opt-level 3, 263 s as configured (fuzz/Cargo.toml: opt-level 1, no
# embedded broker; here: LeakSanitizer alone, 16 codegen units). The targets are safe Rust
# over safe Rust, where AddressSanitizer adds little but halves the executions per second;
# LeakSanitizer still fails a run on a leak, and panics, timeouts and OOM need no sanitizer.
set -euo pipefail
cd "$(dirname "$0")"

die() { printf 'FUZZ FAILED: %s\n' "$*" >&2; exit 1; }

seconds="${FUZZ_SECONDS:-30}"
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || die "FUZZ_SECONDS must be a positive number of seconds, got '$seconds'"
sanitizer="${FUZZ_SANITIZER:-leak}"
jobs="${FUZZ_JOBS:-$(nproc)}"
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "FUZZ_JOBS must be a positive number, got '$jobs'"
read -r -a targets <<<"${FUZZ_TARGETS:-frame_decode restore_record topic_filter config_load presence_message broker_control}"
for target in "${targets[@]}"; do
  [ -f "fuzz_targets/$target.rs" ] || die "no fuzz target '$target' (fuzz/fuzz_targets/$target.rs)"
  [ -d "corpus/$target" ] || die "no seed corpus for '$target' (fuzz/corpus/$target)"
done

command -v rustup >/dev/null || die "rustup is not installed (the fuzz targets need the nightly toolchain)"
rustup toolchain list | grep -q '^nightly' \
  || die "the nightly toolchain is not installed (rustup toolchain install nightly)"
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install --locked cargo-fuzz || die "cannot install cargo-fuzz (cargo install --locked cargo-fuzz)"
fi
cargo +nightly fuzz --version

start=$SECONDS
# Fuzz the dependency versions the proxy ships with: the fuzz workspace starts from the root
# lock file (cargo then adds libfuzzer-sys and drops what the targets do not use).
cp ../Cargo.lock Cargo.lock
# The same flags for build and run, or `run` would rebuild. See "Build cost" in the header.
build_flags=(--sanitizer "$sanitizer" --codegen-units 16)
cargo +nightly fuzz build "${build_flags[@]}" || die "the fuzz targets do not build"
echo "built in $((SECONDS - start)) s"

# One target: its exit status goes to $work/status, its libFuzzer output to $work/log.
run_target() {
  local target=$1 work="target/fuzz-work/$1" artifacts="artifacts/$1" status=0
  # -timeout: one input running this long is a hang (a timeout artifact), not slowness.
  # -detect_leaks=1: LeakSanitizer checks after inputs that allocate more than they free, and
  # at exit; a leak fails the run as a crash does.
  cargo +nightly fuzz run "${build_flags[@]}" "$target" "$work/corpus" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -detect_leaks=1 \
    -artifact_prefix="$artifacts/" -print_final_stats=1 \
    </dev/null >"$work/log" 2>&1 || status=$?
  echo "$status" >"$work/status"
}

runs_start=$SECONDS
for target in "${targets[@]}"; do
  # What a run discovers goes to a scratch corpus, so the committed seeds stay as they are.
  rm -rf "target/fuzz-work/$target" "artifacts/$target"
  mkdir -p "target/fuzz-work/$target/corpus" "artifacts/$target"
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
  echo "running $target for $seconds s"
  run_target "$target" &
done
wait

failed=()
for target in "${targets[@]}"; do
  work="target/fuzz-work/$target"
  status=$(cat "$work/status" 2>/dev/null || echo "none")
  stat() { sed -n "s/^stat::$1: *//p" "$work/log" | tail -1; }
  found=$(find "artifacts/$target" -type f | sort)
  printf '\n--- %s\n' "$target"
  if [ "$status" != 0 ] || [ -n "$found" ]; then
    # From the first report (a panic message comes before libFuzzer's own), at most 120 lines.
    first=$(grep -n -m1 -E "panicked at|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)" "$work/log" | cut -d: -f1 || true)
    tail -n +"${first:-1}" "$work/log" | head -n 120
    printf '%s: FAILED (exit %s); inputs:\n%s\n' "$target" "$status" "${found:-none written}"
    failed+=("$target")
  else
    printf '%s: ok, %s runs in %s s (%s/s), peak RSS %s MB, %s seeds + %s new inputs\n' \
      "$target" "$(stat number_of_executed_units)" "$seconds" "$(stat average_exec_per_sec)" \
      "$(stat peak_rss_mb)" "$(find "corpus/$target" -type f | wc -l)" \
      "$(find "$work/corpus" -type f | wc -l)"
  fi
done

echo
echo "fuzzing took $((SECONDS - start)) s: build $((runs_start - start)) s, runs $((SECONDS - runs_start)) s ($jobs at a time)"
[ "${#failed[@]}" -eq 0 ] || die "${failed[*]} (reproduce: cd fuzz && cargo +nightly fuzz run ${build_flags[*]} <target> <input>)"
