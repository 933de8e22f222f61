#!/bin/bash
# Extract and apply benchmark of dwsfs, every figure a ratio to a reference
# measured side by side in the same run (the machine is shared and noisy).
#
#   tests/bench/run_extract_bench.sh            Qwen3-0.6B-sized model (596M BF16
#                                               params, 1.2 GB), 20 deltas at 1%,
#                                               3 rounds -> bench-results/extract-apply.md
#   SMOKE=1 tests/bench/run_extract_bench.sh    20M params, 3 deltas, 1 round (CI)
#                                               -> bench-results/tmp/extract-apply-smoke.md
#
# Environment: KEEP=1 keeps the generated bucket and outputs; BUILD (default
# build/), PARAMS, DELTAS, CHANGED, ROUNDS, REPS, MD override the configuration.
#
# Each round, page cache warm for both (each command ran once untimed first),
# outputs removed and `sync`ed before each timed command, order alternating:
#   cp -r --reflink=never  (a folder holding the anchor file: the same bytes
#                           as the extract output)    vs  dwsctl extract --step LAST
#   apply_bench (decode+merge, scatter)               vs  numpy_apply.py
# Exit status is non-zero only when something fails, never for a missed target.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PY=/usr/bin/python3
SMOKE=${SMOKE:-0}
KEEP=${KEEP:-0}
BUILD=${BUILD:-$ROOT/build}
if [ "$SMOKE" = 1 ]; then
	PARAMS=${PARAMS:-20e6} DELTAS=${DELTAS:-3} ROUNDS=${ROUNDS:-1} NEED_GB=1
	MD=${MD:-$ROOT/bench-results/tmp/extract-apply-smoke.md} # gitignored
else
	PARAMS=${PARAMS:-600e6} DELTAS=${DELTAS:-20} ROUNDS=${ROUNDS:-3} NEED_GB=8
	MD=${MD:-$ROOT/bench-results/extract-apply.md}
fi
CHANGED=${CHANGED:-0.01}
REPS=${REPS:-3}

log() { echo "run_extract_bench: $*" >&2; }

# ---- build (only what this bench runs: other targets may be mid-edit)
if [ ! -f "$BUILD/build.ninja" ]; then
	meson setup "$BUILD" >&2
fi
ninja -C "$BUILD" dwsctl tests/bench/apply_bench >&2
DWSCTL=$BUILD/dwsctl
APPLY=$BUILD/tests/bench/apply_bench

# ---- work dir
mkdir -p "$ROOT/bench-results/tmp"
WORK=$(mktemp -d "$ROOT/bench-results/tmp/extract-apply.XXXXXX")
cleanup() {
	if [ "$KEEP" = 1 ]; then
		log "kept $WORK"
	else
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT
avail=$(df --output=avail -B1 "$WORK" | tail -1)
if [ "$avail" -lt $((NEED_GB * 1024 * 1024 * 1024)) ]; then
	log "need ${NEED_GB} GiB free under $WORK, have $((avail / 1024 / 1024)) MiB"
	exit 1
fi

# ---- model
log "generating: --params $PARAMS --deltas $DELTAS --changed $CHANGED"
BUCKET=$WORK/bucket
"$PY" tests/bench/make_model.py "$BUCKET" --params "$PARAMS" --deltas "$DELTAS" --changed "$CHANGED" --seed 0 >"$WORK/model.txt"
cat "$WORK/model.txt" >&2
STEP=$(sed -n 's/^last_step=//p' "$WORK/model.txt")
ANCHOR=$BUCKET/anchors/step_000001.safetensors
BYTES=$(stat -c %s "$ANCHOR")
mkdir "$WORK/src"
ln "$ANCHOR" "$WORK/src/model.safetensors" # same bytes, same page cache pages

ns() { date +%s%N; }
# /usr/bin/time -o FILE (same wrapper for both) records user/sys CPU and page faults
run_cp() { /usr/bin/time -o "$1" -f "%U %S %R" cp -r --reflink=never "$WORK/src" "$WORK/cp"; }
run_extract() { /usr/bin/time -o "$1" -f "%U %S %R" "$DWSCTL" extract "$BUCKET" "$WORK/ex" --step "$STEP"; }
clean_outputs() { rm -rf "$WORK/cp" "$WORK/ex"; sync; }

# ---- warm-up (untimed): page cache holds the anchor and the deltas
cat "$ANCHOR" "$BUCKET"/deltas/* >/dev/null
clean_outputs
run_cp /dev/null
run_extract /dev/null
ex_bytes=$(du -b -s "$WORK/ex" | cut -f1)
cp_bytes=$(du -b -s "$WORK/cp" | cut -f1)
log "extract output $ex_bytes bytes (folder), cp output $cp_bytes bytes (folder), anchor file $BYTES bytes"
ex_file=$(stat -c %s "$WORK/ex/model.safetensors")
if [ "$ex_file" != "$BYTES" ]; then
	log "extract output model.safetensors is $ex_file bytes, the anchor $BYTES: cp is not the same byte count"
	exit 1
fi
# untimed sanity check: numpy's chain applied to the anchor == the extract output
"$PY" tests/bench/numpy_apply.py "$BUCKET" --reps 1 --check "$WORK/ex/model.safetensors" | grep '^numpy_check=' >&2

# ---- rounds
: >"$WORK/rounds.txt"
for r in $(seq 1 "$ROUNDS"); do
	for which in $( ((r % 2)) && echo "cp extract" || echo "extract cp"); do
		clean_outputs
		t0=$(ns)
		if [ "$which" = cp ]; then run_cp "$WORK/time"; else run_extract "$WORK/time"; fi
		t1=$(ns)
		read -r user sys minflt <"$WORK/time"
		echo "round=$r ${which}_ns=$((t1 - t0)) ${which}_user=$user ${which}_sys=$sys ${which}_minflt=$minflt" >>"$WORK/rounds.txt"
		log "round $r: $which $(((t1 - t0) / 1000000)) ms"
	done
	if ((r % 2)); then
		"$APPLY" "$BUCKET" --reps "$REPS" >"$WORK/apply.$r.txt"
		"$PY" tests/bench/numpy_apply.py "$BUCKET" --reps "$REPS" >"$WORK/numpy.$r.txt"
	else
		"$PY" tests/bench/numpy_apply.py "$BUCKET" --reps "$REPS" >"$WORK/numpy.$r.txt"
		"$APPLY" "$BUCKET" --reps "$REPS" >"$WORK/apply.$r.txt"
	fi
	log "round $r: $(grep -h 'elems_per_s' "$WORK/apply.$r.txt" "$WORK/numpy.$r.txt" | tr '\n' ' ')"
done
clean_outputs

# ---- report
BUILDTYPE=$("$PY" -c 'import json,sys; print(next(o["value"] for o in json.load(open(sys.argv[1])) if o["name"] == "buildtype"))' \
	"$BUILD/meson-info/intro-buildoptions.json" 2>/dev/null || echo unknown)
CPU=$(grep -m1 '^model name' /proc/cpuinfo | sed 's/^model name[[:space:]]*:[[:space:]]*//')
mkdir -p "$(dirname "$MD")"
"$PY" - "$WORK" "$ROUNDS" "$BYTES" "$MD" "$SMOKE" "$(nproc)" "$CPU" "$(uname -r)" "$BUILDTYPE" \
	"$("${CC:-cc}" --version 2>/dev/null | head -1)" "$(cp --version | head -1)" "$REPS" "$STEP" <<'EOF'
import os
import statistics
import sys

work, rounds, nbytes, md, smoke, ncpu, cpu, kernel, buildtype, ccv, cpv, reps, step = sys.argv[1:]
rounds, nbytes = int(rounds), int(nbytes)


def kv(path):
    out = {}
    for line in open(path):
        if "=" in line:
            k, v = line.strip().split("=", 1)
            out[k] = v
    return out


model = kv(os.path.join(work, "model.txt"))
times = {}
for line in open(os.path.join(work, "rounds.txt")):
    f = dict(x.split("=") for x in line.split())
    times.setdefault(int(f["round"]), {}).update({k: float(v) for k, v in f.items() if k != "round"})
apply = {r: kv(os.path.join(work, f"apply.{r}.txt")) for r in range(1, rounds + 1)}
numpy = {r: kv(os.path.join(work, f"numpy.{r}.txt")) for r in range(1, rounds + 1)}
R = range(1, rounds + 1)


def fmt_rate(x, unit):
    for div, p in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.1f} {p}{unit}"
    return f"{x:.0f} {unit}"


rows = []


def row(figure, ours, ref, unit, target):
    ratios = [o / f for o, f in zip(ours, ref)]
    med = statistics.median(ratios)
    met = "—" if target is None else ("yes" if med >= target else f"**no** ({med / target:.2f} of target)")
    rows.append((figure, fmt_rate(statistics.median(ours), unit), fmt_rate(statistics.median(ref), unit),
                 f"{med:.2f}x ({min(ratios):.2f}–{max(ratios):.2f})", "—" if target is None else f">= {target}x", met))
    return med


ex_rate = [nbytes / (times[r]["extract_ns"] / 1e9) for r in R]
cp_rate = [nbytes / (times[r]["cp_ns"] / 1e9) for r in R]
row(f"`dwsctl extract --step {step}` throughput vs `cp -r --reflink=never` (bytes/s)", ex_rate, cp_rate, "B/s", 0.7)
np_rate = [float(numpy[r]["numpy_apply_elems_per_s"]) for r in R]
row("apply: decode + merge (dws_st_parse + dws_delta_decode + dws_patchset_add), chain changed elems/s vs numpy `flat[idx] = values`",
    [float(apply[r]["apply_decode_merge_elems_per_s"]) for r in R], np_rate, "elem/s", 3)
row("apply (diagnostic): decode only (dws_st_parse + dws_delta_decode, no append), chain elems/s vs numpy",
    [float(apply[r]["apply_decode_only_elems_per_s"]) for r in R], np_rate, "elem/s", None)
row("apply: scatter of the merged patches into dense BF16 (`dst[idx[k]] = val[k]`), merged entries/s vs numpy",
    [float(apply[r]["apply_scatter_elems_per_s"]) for r in R], np_rate, "elem/s", None)
row("apply: decode + merge + scatter, chain changed elems/s vs numpy",
    [float(apply[r]["apply_total_chain_elems_per_s"]) for r in R], np_rate, "elem/s", None)

a1 = apply[1]
lines = []
lines.append("# dwsfs extract and apply benchmark" + (" (SMOKE configuration)" if smoke == "1" else ""))
lines.append("")
lines.append("Produced by `tests/bench/run_extract_bench.sh`" + (" with `SMOKE=1`" if smoke == "1" else "") +
             ". Every figure is a ratio to a reference measured side by side in the same run; "
             f"ratio = median over {rounds} round(s) (min–max across rounds); absolute rates are medians, for orientation only "
             "(the machine is shared and noisy).")
lines.append("")
lines.append("| figure | dwsfs | reference | ratio (median, min–max) | target | met? |")
lines.append("|---|---|---|---|---|---|")
for r_ in rows:
    lines.append("| " + " | ".join(r_) + " |")
lines.append("")
med = lambda k, src=apply: statistics.median(float(src[r][k]) for r in R)
lines.append("## Where the time goes")
lines.append("")
lines.append(f"- decode+merge: {med('apply_decode_merge_seconds'):.3f} s per chain (median), of which decode alone "
             f"{med('apply_decode_only_seconds'):.3f} s; the rest is appending each decoded run to its tensor's patch "
             f"(`dws_patchset_add`; runs are compacted past 32): {int(a1['apply_merge_entries_written']):,} entries written for "
             f"{int(a1['apply_chain_elems']):,} changed elements ({float(a1['apply_merge_write_amplification']):.1f}x), "
             f"into fresh allocations ({med('apply_decode_merge_minflt_per_rep'):,.0f} page faults, "
             f"{med('apply_decode_merge_user_seconds_per_rep'):.2f} s user + {med('apply_decode_merge_sys_seconds_per_rep'):.2f} s sys per chain)")
ex_s = statistics.median(times[r]["extract_ns"] / 1e9 for r in R)
lines.append(f"- extract: {ex_s:.2f} s wall (median) = catalog + a streaming pass on every core: anchor windows read, the deltas applied straight from their encoded indices (no patch index), written by one thread at a time; "
             f"{nbytes:,} bytes; cp: {statistics.median(times[r]['cp_ns'] / 1e9 for r in R):.2f} s. "
             f"CPU per run (median): extract {statistics.median(times[r]['extract_user'] for r in R):.2f} s user + "
             f"{statistics.median(times[r]['extract_sys'] for r in R):.2f} s sys, "
             f"{statistics.median(times[r]['extract_minflt'] for r in R):,.0f} page faults; cp "
             f"{statistics.median(times[r]['cp_user'] for r in R):.2f} s user + {statistics.median(times[r]['cp_sys'] for r in R):.2f} s sys")
lines.append("")
lines.append("## Configuration")
lines.append("")
lines.append(f"- model: Qwen3-0.6B-shaped, {int(model['params']):,} BF16 params in {model['tensors']} tensors "
             f"({model['layers']} layers, vocab {model['vocab']}, tied embeddings), anchor file {nbytes:,} bytes")
lines.append(f"- chain: complete anchor at step 1, {model['deltas']} gap_delta deltas, "
             f"{float(model['changed_fraction_per_delta']) * 100:.2f}% of elements changed per delta "
             f"({int(model['changed_elements']):,} chain elements, {int(model['delta_bytes']):,} delta bytes); "
             f"{int(a1['apply_merged_elems']):,} merged patch entries at step {step}")
lines.append(f"- extract: page cache warm (each command ran once untimed), output removed and `sync` before each timed run, "
             f"order alternating per round; `cp` copies a folder holding the anchor file (hard link), "
             f"the same byte count as the extract output")
lines.append(f"- apply: `apply_bench` and `numpy_apply.py` each load everything first (untimed), run one untimed pass, "
             f"then take the median of {reps} timed passes per round; both single-threaded")
lines.append("")
lines.append("## Machine")
lines.append("")
lines.append(f"- nproc: {ncpu}")
lines.append(f"- CPU: {cpu}")
lines.append(f"- kernel: {kernel}")
lines.append(f"- build: meson buildtype={buildtype}, {ccv}")
lines.append(f"- {cpv}; numpy {numpy[1].get('numpy_version', '?')}")
lines.append("")
lines.append("## Raw per round")
lines.append("")
lines.append("| round | cp s | extract s | decode+merge s | decode only s | scatter s | numpy s |")
lines.append("|---|---|---|---|---|---|---|")
for r in R:
    lines.append(f"| {r} | {times[r]['cp_ns'] / 1e9:.3f} | {times[r]['extract_ns'] / 1e9:.3f} | "
                 f"{float(apply[r]['apply_decode_merge_seconds']):.3f} | {float(apply[r]['apply_decode_only_seconds']):.3f} | "
                 f"{float(apply[r]['apply_scatter_seconds']):.3f} | {float(numpy[r]['numpy_apply_seconds']):.3f} |")
lines.append("")
text = "\n".join(lines)
with open(md, "w") as f:
    f.write(text)
print(text)
EOF
log "wrote $MD"
