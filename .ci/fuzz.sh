#!/bin/bash
# Run every libFuzzer target for SECONDS each, starting from fresh seed corpora.
#
#   .ci/fuzz.sh SECONDS
#
# Builds build-fuzz/ with clang (-Dfuzz=true; an existing build-fuzz/ is
# reused), makes seeds with tests/fuzz/make_seeds.py (needs /usr/bin/python3
# with numpy and the zstd tool), runs each target on its own copy of them and
# exits non-zero if any target crashes, leaks, times out or breaks an invariant.
# Crashing inputs are kept in build-fuzz/fuzz-artifacts/ (copy one to
# tests/fuzz/crashes/ to keep it; reproduce with build-fuzz/tests/fuzz/TARGET FILE).
# Environment: FUZZ_TARGETS="fuzz_header ..." to run only some targets.
set -euo pipefail

if [ $# -ne 1 ] || ! [[ $1 =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ]; then
	echo "usage: $0 SECONDS (per target)" >&2
	exit 2
fi
secs=$1
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
build="build-fuzz"
read -r -a targets <<<"${FUZZ_TARGETS:-fuzz_header fuzz_delta fuzz_zstd fuzz_skyrl fuzz_miles}"

# ---- build ----
if [ -f "$build/build.ninja" ]; then
	meson configure "$build" -Dfuzz=true >/dev/null
else
	CC=clang CXX=clang++ meson setup "$build" -Dfuzz=true --buildtype=debugoptimized
fi
# Only the fuzz targets: the rest of the tree need not build with clang.
ninja -C "$build" "${targets[@]/#/tests/fuzz/}"

# ---- seeds ----
work=$(mktemp -d "${TMPDIR:-/tmp}/dwsfs-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
/usr/bin/python3 tests/fuzz/make_seeds.py "$work/seeds"

artifacts=$root/$build/fuzz-artifacts
mkdir -p "$artifacts" "$work/tmp"

# ---- run ----
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}
failed=0
summary=()
for t in "${targets[@]}"; do
	corpus=$work/corpus/$t
	mkdir -p "$corpus"
	cp -a "$work/seeds/$t/." "$corpus/"
	nseeds=$(find "$corpus" -type f | wc -l)
	log=$work/$t.log
	echo "== $t: $secs s from $nseeds seeds"
	dict=()
	case $t in
	fuzz_header | fuzz_delta) dict=(-dict=tests/fuzz/safetensors.dict) ;;
	esac
	rc=0
	# fuzz_zstd spills decompressed objects into unlinked files under $TMPDIR
	TMPDIR=$work/tmp "$build/tests/fuzz/$t" \
		-max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -max_len=65536 \
		-print_final_stats=1 -artifact_prefix="$artifacts/$t-" "${dict[@]}" \
		"$corpus" >"$log" 2>&1 || rc=$?
	execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
	rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
	ncorpus=$(find "$corpus" -type f | wc -l)
	if [ "$rc" -eq 0 ] && [ -n "$execs" ]; then
		line="$t: PASSED: ${execs} executions in ${secs} s (${rate:-?} exec/s), corpus $nseeds -> $ncorpus"
	else
		failed=1
		crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n1)
		line="$t: FAILED (exit $rc) after ${execs:-?} executions${crash:+; input: $crash}"
		echo "---- last lines of the $t log ----"
		tail -n 80 "$log"
		echo "----"
	fi
	echo "$line"
	summary+=("$line")
done

echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
