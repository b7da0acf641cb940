#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time and fails if any finds a crash.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 60)
#
# cargo-fuzz comes from crates.io by name and is cached in
# ${KUBETRAIN_CACHE:-$HOME/.cache/kubetrain}/bin. Its builds need nightly-only rustc
# flags; RUSTC_BOOTSTRAP=1 lets the one stable toolchain take them, so no nightly is used.
#
# Without a sanitizer (`-s none`): the trainer forbids unsafe code, so AddressSanitizer
# would only watch the dependencies' unsafe code, at a tenth of the executions (`push`:
# ~1,000/s against ~10,000/s on 2 cores) and a second full instrumented build (7 min);
# the overflow and bounds checks, which cargo-fuzz keeps on, are what these targets trip. libFuzzer's corpus grows in fuzz/corpus/<target>
# (not committed), crashes land in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET=${1:-60}
CARGO_FUZZ_VERSION=0.13.2
CACHE=${KUBETRAIN_CACHE:-$HOME/.cache/kubetrain}
BIN=$CACHE/bin
export PATH="$BIN:$PATH"

log() { printf '[fuzz] %s\n' "$*" >&2; }

if [ "$(cargo-fuzz --version 2>/dev/null | head -n1)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
	log "installing cargo-fuzz $CARGO_FUZZ_VERSION into $BIN"
	cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$CACHE"
fi
log "$(rustc --version); $(cargo-fuzz --version | head -n1)"
# Only for the fuzz builds: cargo-fuzz's own build above stays plain stable.
export RUSTC_BOOTSTRAP=1

started=$(date +%s)
cargo fuzz build -s none
log "fuzz targets built in $(($(date +%s) - started))s"
# The built targets are run as they are, so that each one's time is all fuzzing.
bin_dir=${CARGO_TARGET_DIR:-fuzz/target}/$(rustc -vV | sed -n 's/^host: //p')/release

failed=()
summary=()
for target in $(cargo fuzz list); do
	corpus=fuzz/corpus/$target
	mkdir -p "$corpus" "fuzz/artifacts/$target"
	seeds=()
	[ -d "fuzz/seeds/$target" ] && seeds=("fuzz/seeds/$target")
	output=${CARGO_TARGET_DIR:-fuzz/target}/fuzz-$target.log
	log "$target: fuzzing for ${SECONDS_PER_TARGET}s (output in $output)"
	began=$(date +%s)
	rc=0
	# -timeout: an input that runs for 10 s is a hang, reported like a crash.
	"$bin_dir/$target" -artifact_prefix="fuzz/artifacts/$target/" \
		-max_total_time="$SECONDS_PER_TARGET" -timeout=10 -print_final_stats=1 \
		"$corpus" "${seeds[@]}" >"$output" 2>&1 || rc=$?
	ran=$(($(date +%s) - began))
	execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$output" | tail -n1)
	if [ -z "$execs" ]; then
		execs=$(sed -n 's/^#\([0-9]*\)[[:space:]]*DONE.*/\1/p' "$output" | tail -n1)
	fi
	line="$target: ran ${ran}s, ${execs:-?} executions, corpus $(find "$corpus" -type f | wc -l) inputs"
	if [ "$rc" -ne 0 ]; then
		artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$output" | tail -n1)
		tail -n 60 "$output" >&2
		line="$line: FAILED (exit $rc); artifact ${artifact:-none}; reproduce with:
    RUSTC_BOOTSTRAP=1 PATH=$BIN:\$PATH cargo fuzz run -s none $target ${artifact:-<artifact>}"
		failed+=("$target")
	fi
	summary+=("$line")
done

log "summary:"
printf '  %s\n' "${summary[@]}" >&2
if [ "${#failed[@]}" -gt 0 ]; then
	log "crashes in: ${failed[*]}"
	exit 1
fi
log "no crashes in $(($(date +%s) - started))s"
