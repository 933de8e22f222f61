#!/bin/bash
# Cold read of a model through the dwsfs mount from the loopback Hub, every
# figure a ratio to a reference measured side by side in the same round (the
# machine is shared and noisy).
#
#   tests/bench/run_http_bench.sh           Qwen3-0.6B-sized anchor (596M BF16 params,
#                                           1.19 GB), 3 rounds -> bench-results/http-read.md
#   SMOKE=1 tests/bench/run_http_bench.sh   ~50 MB model, 1 round, no perf diagnostics
#                                           -> bench-results/tmp/http-read-smoke.md
#
# One server delivers the bytes to every client: nginx on 127.0.0.2 serving the
# Hub's folder (autoindex on: httpdirfs and rclone need an index page), and
# tests/hubserver.py --cdn-url makes the Hub's resolver redirect there, so dwsfs
# lists through the Hub API and reads from that same nginx. Each round, every
# figure's two reads run back to back (a pair; the pairs' order rotates by round,
# the order within a pair alternates), each reading the whole file once, cold:
#   curl     --parallel --parallel-max PAR over BLOCK-sized ranges, to /dev/null
#            (dwsfs fetches BLOCK blocks with 4 prefetch threads + the reader)
#   curlfile the same, each range into a file beside the dwsfs cache: a download
#            that keeps the bytes on disk, as dwsfs's block cache does
#   dwsfs    fresh empty cache_dir, mount, `cat` (and, separately mounted, `dd
#            bs=1M`, and 4 parallel `dd` readers on quarters as a diagnostic);
#            dwsfs_mem the same with cache_size=0 (no disk cache), beside curl
#            and rclone: neither writes the bytes to disk
#   fetch_disk / fetch_mem  build/tests/bench/fetch_pipeline: the anchor through
#            dwsfs's block cache without FUSE, with and without the disk cache
#            (diagnostics: what the cache's writes cost on this one disk; and,
#            beside dwsfs_mem and beside curl, what FUSE costs and what the
#            HTTP side alone does)
#   direct_write  build/tests/bench/direct_write: the read's bytes written as
#            the block cache writes them (O_DIRECT, BLOCK-sized files, 2 writers),
#            from memory: what keeping them on disk costs by itself (a diagnostic)
#   curl_dw  curl to /dev/null and, started with it, direct_write of the same
#            bytes, timed until both are done (direct_write's last write; its
#            removal of the files after it is not timed, as fresh_dirs' removal
#            of the dwsfs cache is not): a download that keeps the bytes on
#            the cache's disk with no copy into a page cache and no FUSE (but
#            direct_write goes as fast as the disk takes the bytes, the block
#            cache's writes at the network's pace); beside curl alone, what
#            writing the bytes to this disk during a download costs it
#   httpdirfs --cache (fresh cache dir), `cat`   (--no-range-check: its range probe
#            rejects nginx, fangfufu/httpdirfs#188); its no-cache mode reads
#            ~1 MB/s here, so it only reads the first PREFIX_MB, beside dwsfs's
#   rclone   mount :http: --read-only --vfs-cache-mode off, `cat`
# and, as diagnostics of dwsfs beside the same curl: the read again with the
# block cache already filled (remount, no network: the FUSE path alone), and a
# one-tensor model of the same size (tests/bench/http_onetensor.py: dwsfs reads
# ahead within a tensor only).
# Only the read is timed (mount time reported apart). Before each timed read the
# served file leaves the page cache (`sync`, then `dd iflag=nocache count=0`:
# posix_fadvise DONTNEED on it), so nginx reads it from disk for every client
# alike (DROP=0: leave it warm). Before the rounds, one untimed pass checks the
# bytes each client reads against the source (cmp).
#
# Environment: KEEP=1 keeps the work dir; BUILD (build/), PARAMS, ROUNDS, PAR (4),
# BLOCK (8388608), PREFIX_MB, DROP (1), VERIFY (1), DIAG (perf diagnostics: 1, 0
# with SMOKE), MD override the configuration. For tests/bench/run:
# MODEL_BUCKET=DIR serves that bucket's anchors/ and base/ (hard links; a
# `make_model.py --base` bucket, MODEL_TXT its output, default DIR/../model.txt)
# instead of generating one: with a base/ the mount shows its shards, which dwsfs
# reads (`cat` of them all; the other clients read the anchor, the same tensor
# bytes); PAIRS_ONLY="cat_curl ..." runs only those pairs (default with a base:
# cat_curl cat_httpdirfs cat_rclone); RAW_OUT=DIR gets rounds.txt and info.txt. A client whose package is missing
# (nginx, httpdirfs, rclone, curl) is skipped with a note; without nginx the Hub's
# own Python CDN serves curl and dwsfs. Exit status is non-zero only when
# something fails, never for a missed target. Every mount, daemon and server
# started here is stopped on exit (trap).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PY=/usr/bin/python3
SMOKE=${SMOKE:-0}
KEEP=${KEEP:-0}
BUILD=${BUILD:-$ROOT/build}
if [ "$SMOKE" = 1 ]; then
	PARAMS=${PARAMS:-25e6} ROUNDS=${ROUNDS:-1} PREFIX_MB=${PREFIX_MB:-1} DIAG=${DIAG:-0} NEED_GB=1
	MD=${MD:-$ROOT/bench-results/tmp/http-read-smoke.md} # gitignored
else
	PARAMS=${PARAMS:-600e6} ROUNDS=${ROUNDS:-3} PREFIX_MB=${PREFIX_MB:-8} DIAG=${DIAG:-1} NEED_GB=6
	MD=${MD:-$ROOT/bench-results/http-read.md}
fi
PAR=${PAR:-4}
BLOCK=${BLOCK:-8388608}
DROP=${DROP:-1}
VERIFY=${VERIFY:-1}
NS=bench NAME=model

log() { echo "run_http_bench: $*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

# ---- what can run
SKIPPED=()
if [ ! -e /dev/fuse ] || ! have fusermount3; then
	log "no /dev/fuse or fusermount3: dwsfs cannot mount here"
	exit 1
fi
HAVE_CURL=1 HAVE_NGINX=1 HAVE_HTTPDIRFS=1 HAVE_RCLONE=1 HAVE_PERF=1
have curl || { HAVE_CURL=0; SKIPPED+=("curl (package curl not installed): no curl figures"); }
have nginx || { HAVE_NGINX=0; SKIPPED+=("nginx (package nginx not installed): the Hub's own Python CDN serves curl and dwsfs, and httpdirfs and rclone (they need an index page) are skipped"); }
have httpdirfs || { HAVE_HTTPDIRFS=0; SKIPPED+=("httpdirfs (package httpdirfs not installed)"); }
have rclone || { HAVE_RCLONE=0; SKIPPED+=("rclone (package rclone not installed)"); }
[ "$HAVE_NGINX" = 1 ] || HAVE_HTTPDIRFS=0 HAVE_RCLONE=0
if [ "$HAVE_HTTPDIRFS" = 1 ] && ! have fusermount; then
	HAVE_HTTPDIRFS=0
	SKIPPED+=("httpdirfs (libfuse2's fusermount missing: package fuse)")
fi
if [ "$DIAG" = 1 ] && ! have perf; then
	HAVE_PERF=0
	SKIPPED+=("perf diagnostics (package linux-perf not installed)")
fi
for s in ${SKIPPED[@]+"${SKIPPED[@]}"}; do log "note: skipping $s"; done

# ---- build (only what this bench runs)
if [ ! -f "$BUILD/build.ninja" ]; then
	meson setup "$BUILD" >&2
fi
ninja -C "$BUILD" dwsfs tests/bench/fetch_pipeline tests/bench/direct_write >&2
DWSFS=$BUILD/dwsfs

# ---- work dir, processes and mounts: always cleaned up
mkdir -p "$ROOT/bench-results/tmp"
WORK=$(mktemp -d "$ROOT/bench-results/tmp/http-read.XXXXXX")
MNT=$WORK/mnt
mkdir -p "$MNT" "$WORK/logs" "$WORK/nginx/tmp"
NGX_PID= HUB_PID= CLIENT_PID= PERF_PID= DW_PID= FUSECTL_MOUNTED=0

unmount_mnt() {
	if grep -q " $MNT " /proc/mounts 2>/dev/null; then
		fusermount3 -u -z "$MNT" 2>/dev/null || fusermount -u -z "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
	fi
}
stop_pid() { # PID [signal]: signal it, wait up to 10 s, then SIGKILL; always reaped
	local pid=$1 sig=${2:-TERM} i
	[ -n "$pid" ] || return 0
	kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
	kill "-$sig" "$pid" 2>/dev/null || true
	for i in $(seq 100); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
	wait "$pid" 2>/dev/null || true
}
cleanup() {
	set +e
	stop_pid "$PERF_PID" INT
	stop_pid "$DW_PID"
	unmount_mnt
	stop_pid "$CLIENT_PID"
	stop_pid "$HUB_PID"
	stop_pid "$NGX_PID" QUIT
	[ "$FUSECTL_MOUNTED" = 1 ] && umount /sys/fs/fuse/connections 2>/dev/null
	if [ "$KEEP" = 1 ]; then
		log "kept $WORK"
	else
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

avail=$(df --output=avail -B1 "$WORK" | tail -1)
if [ "$avail" -lt $((NEED_GB * 1024 * 1024 * 1024)) ]; then
	log "need ${NEED_GB} GiB free under $WORK, have $((avail / 1024 / 1024)) MiB"
	exit 1
fi

# ---- the model: one complete anchor, no base, so the mount shows model.safetensors
HUB=$WORK/hub
BUCKET=$HUB/buckets/$NS/$NAME
KEY=anchors/step_000001.safetensors
if [ -n "${MODEL_BUCKET:-}" ]; then
	log "serving $MODEL_BUCKET (anchors/, base/: hard links)"
	mkdir -p "$BUCKET"
	for d in anchors base; do
		[ -d "$MODEL_BUCKET/$d" ] && cp -al "$MODEL_BUCKET/$d" "$BUCKET/$d"
	done
	cp "${MODEL_TXT:-$(dirname "$MODEL_BUCKET")/model.txt}" "$WORK/model.txt"
else
	log "generating: make_model.py --params $PARAMS --deltas 0"
	"$PY" tests/bench/make_model.py "$BUCKET" --params "$PARAMS" --deltas 0 >"$WORK/model.txt"
fi
SRC=$BUCKET/$KEY
SIZE=$(stat -c %s "$SRC")
log "model: $SIZE bytes ($SRC)"
# what dwsfs shows and reads: the base's shards (with a base/), else model.safetensors
DWS_NAMES=() DWS_SRCS=()
if [ -d "$BUCKET/base" ]; then
	for f in "$BUCKET"/base/*.safetensors; do
		DWS_NAMES+=("$(basename "$f")")
		DWS_SRCS+=("$f")
	done
else
	DWS_NAMES=(model.safetensors) DWS_SRCS=("$SRC")
fi
DWS_SIZE=$(stat -c %s "${DWS_SRCS[@]}" | awk '{s += $1} END {printf "%d", s}')
[ ${#DWS_NAMES[@]} = 1 ] || PAIRS_ONLY=${PAIRS_ONLY:-cat_curl cat_httpdirfs cat_rclone}
[ ${#DWS_NAMES[@]} = 1 ] || log "dwsfs reads ${#DWS_NAMES[@]} shards, $DWS_SIZE bytes: ${DWS_NAMES[*]}"
NAME1=onetensor
"$PY" tests/bench/http_onetensor.py "$HUB/buckets/$NS/$NAME1" --bytes "$SIZE" >/dev/null
SRC1=$HUB/buckets/$NS/$NAME1/$KEY
SIZE1=$(stat -c %s "$SRC1")
PREFIX_BYTES=$((PREFIX_MB * 1048576))
[ "$PREFIX_BYTES" -le "$SIZE" ] || PREFIX_BYTES=$SIZE

free_port() { "$PY" -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1],0)); print(s.getsockname()[1])' "$1"; }

# ---- nginx on 127.0.0.2 serving the Hub's folder
CDN_BASE=
if [ "$HAVE_NGINX" = 1 ]; then
	NGX_PORT=$(free_port 127.0.0.2)
	NGX_LOG=$WORK/nginx/access.log
	cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 2;
daemon off;
user root;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 1024; }
http {
  log_format bench '\$msec \$connection \$request_time \$status \$body_bytes_sent "\$http_range" "\$http_user_agent"';
  access_log $NGX_LOG bench;
  client_body_temp_path $WORK/nginx/tmp;
  proxy_temp_path $WORK/nginx/tmp;
  fastcgi_temp_path $WORK/nginx/tmp;
  uwsgi_temp_path $WORK/nginx/tmp;
  scgi_temp_path $WORK/nginx/tmp;
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  keepalive_timeout 120s;
  server {
    listen 127.0.0.2:$NGX_PORT;
    root $HUB;
    autoindex on;
  }
}
EOF
	nginx -p "$WORK/nginx/" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" &
	NGX_PID=$!
	for i in $(seq 100); do
		curl -sf -o /dev/null "http://127.0.0.2:$NGX_PORT/" 2>/dev/null && break
		kill -0 "$NGX_PID" 2>/dev/null || { cat "$WORK/nginx/error.log" >&2; log "nginx did not start"; exit 1; }
		sleep 0.1
	done
	CDN_BASE=http://127.0.0.2:$NGX_PORT
	DIR_URL=$CDN_BASE/buckets/$NS/$NAME/anchors/
	log "nginx on $CDN_BASE (pid $NGX_PID)"
else
	NGX_LOG=/dev/null
fi

# ---- the loopback Hub; its resolver redirects to nginx
HUB_ARGS=(--root "$HUB" --ready-file "$WORK/hub.ready" --exit-with-parent --max-seconds 3600)
[ -n "$CDN_BASE" ] && HUB_ARGS+=(--cdn-url "$CDN_BASE")
"$PY" tests/hubserver.py "${HUB_ARGS[@]}" >"$WORK/logs/hub.log" 2>&1 &
HUB_PID=$!
for i in $(seq 100); do
	[ -s "$WORK/hub.ready" ] && break
	kill -0 "$HUB_PID" 2>/dev/null || { cat "$WORK/logs/hub.log" >&2; log "hubserver did not start"; exit 1; }
	sleep 0.1
done
EP=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["endpoint"])' "$WORK/hub.ready")
RESOLVE=$EP/buckets/$NS/$NAME/resolve/$KEY
log "hub on $EP (pid $HUB_PID)"
# the redirect target (the Hub hashes the file on first sight: done here, untimed)
CDN_URL=$(curl -s -o /dev/null -w '%{redirect_url}' "$RESOLVE")
[ -n "$CDN_URL" ] || { log "no redirect from $RESOLVE"; exit 1; }
log "resolve -> $CDN_URL"

# ---- curl configs: one group per BLOCK range
make_cfg() { # OUT DEST(null|dir)
	"$PY" - "$1" "$2" "$CDN_URL" "$SIZE" "$BLOCK" <<'EOF'
import sys
out, dest, url, size, bs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
groups = []
for i, off in enumerate(range(0, size, bs)):
    end = min(off + bs, size) - 1
    o = "/dev/null" if dest == "null" else f"{dest}/part.{i:06d}"
    groups.append(f'url = "{url}"\nrange = "{off}-{end}"\noutput = "{o}"\nsilent\nshow-error\nfail\n'
                  'write-out = "%{size_download}\\n"\n')
open(out, "w").write("next\n".join(groups))
EOF
}
PARTS=$WORK/cachefs/curlparts # same filesystem as the dwsfs cache
make_cfg "$WORK/ranges-null.cfg" null
make_cfg "$WORK/ranges-files.cfg" "$PARTS"
CURL=(curl --no-progress-meter --parallel --parallel-max "$PAR")

# ---- helpers
CLK_TCK=$(getconf CLK_TCK)
cpu_of() { # PID -> user+sys seconds of the process so far
	awk -v t="$CLK_TCK" '{ sub(/^.*\) /, ""); printf "%.3f", ($12 + $13) / t }' "/proc/$1/stat" 2>/dev/null || echo ""
}
ms_now() { echo $(($(date +%s%N) / 1000000)); }
cold() { # [FILE]: the served file (and the base shards) out of the page cache (and no dirty pages of earlier runs)
	local f
	sync
	if [ "$DROP" = 1 ]; then
		for f in "${1:-$SRC}" "${DWS_SRCS[@]}"; do
			dd if="$f" iflag=nocache count=0 status=none
		done
	fi
}
dw_start() { # direct_write of the read's bytes in the background (DW_PID), its line to fetch.out
	mkdir -p "$WORK/cachefs/dw"
	"$BUILD/tests/bench/direct_write" "$WORK/cachefs/dw" "$DWS_SIZE" "$BLOCK" >"$WORK/fetch.out" &
	DW_PID=$!
}
dw_wait() {
	wait "$DW_PID" || { log "direct_write failed"; exit 1; }
	DW_PID=
}
cpu_snap() { awk '/^cpu / {print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $5 + $6; exit}' /proc/stat; }
CACHE=$WORK/cachefs/cache
fresh_dirs() {
	rm -rf "$WORK/cachefs"
	mkdir -p "$CACHE" "$WORK/cachefs/hdcache"
}

mount_client() { # KIND TAG [BUCKET NAME [SIZE]]: mount on $MNT, set CLIENT_PID, MOUNT_MS, FILE and FILES (what a whole read reads)
	local kind=$1 tag=$2 name=${3:-$NAME} size=${4:-$SIZE} t0 i n
	t0=$(ms_now)
	case $kind in
	dwsfs)
		HF_ENDPOINT=$EP "$DWSFS" -f "hf://buckets/$NS/$name" "$MNT" -o "cache_dir=$CACHE${DWS_OPTS:+,$DWS_OPTS}" \
			2>>"$WORK/logs/dwsfs.$tag.log" &
		CLIENT_PID=$! FILE=$MNT/model.safetensors ;;
	httpdirfs)
		httpdirfs -f --no-range-check --cache --cache-location "$WORK/cachefs/hdcache" "$DIR_URL" "$MNT" \
			>"$WORK/logs/httpdirfs.$tag.log" 2>&1 &
		CLIENT_PID=$! FILE=$MNT/step_000001.safetensors ;;
	httpdirfs_nc)
		httpdirfs -f --no-range-check "$DIR_URL" "$MNT" >"$WORK/logs/httpdirfs_nc.$tag.log" 2>&1 &
		CLIENT_PID=$! FILE=$MNT/step_000001.safetensors ;;
	rclone)
		rclone mount :http: "$MNT" --http-url "$DIR_URL" --read-only --vfs-cache-mode off \
			--config "$WORK/rclone.conf" >"$WORK/logs/rclone.$tag.log" 2>&1 &
		CLIENT_PID=$! FILE=$MNT/step_000001.safetensors ;;
	esac
	FILES=("$FILE")
	if [ "$kind" = dwsfs ] && [ "$name" = "$NAME" ]; then
		FILES=()
		for n in "${DWS_NAMES[@]}"; do FILES+=("$MNT/$n"); done
		FILE=${FILES[0]} size=$DWS_SIZE
	fi
	for i in $(seq 600); do
		if ! kill -0 "$CLIENT_PID" 2>/dev/null; then
			tail -5 "$WORK/logs/$kind.$tag.log" >&2
			log "$kind exited before its mount came up"
			exit 1
		fi
		grep -q " $MNT " /proc/mounts && [ -e "$FILE" ] && break
		sleep 0.05
	done
	[ -e "$FILE" ] || { log "$kind: $FILE did not appear within 30 s"; exit 1; }
	n=$(stat -c %s "${FILES[@]}" | awk '{s += $1} END {printf "%d", s}')
	[ "$n" = "$size" ] || { log "$kind: ${FILES[*]} is $n bytes, not $size"; exit 1; }
	MOUNT_MS=$(($(ms_now) - t0))
}
umount_client() {
	local i
	fusermount3 -u "$MNT" 2>/dev/null || fusermount -u "$MNT" 2>/dev/null || umount "$MNT"
	for i in $(seq 100); do
		kill -0 "$CLIENT_PID" 2>/dev/null || break
		sleep 0.1
	done
	stop_pid "$CLIENT_PID"
	CLIENT_PID=
}

# ---- untimed check of the bytes (and warm-up of binaries, the Hub's hash cache)
if [ "$VERIFY" = 1 ]; then
	fresh_dirs
	if [ "$HAVE_CURL" = 1 ]; then
		mkdir -p "$PARTS"
		"${CURL[@]}" -K "$WORK/ranges-files.cfg" >/dev/null
		find "$PARTS" -name 'part.*' | sort | xargs cat | cmp - "$SRC"
		log "verify: curl ranges == source"
		rm -rf "$PARTS"
	fi
	for kind in dwsfs dwsfs_mem httpdirfs rclone httpdirfs_nc; do
		case $kind in
		httpdirfs | httpdirfs_nc) [ "$HAVE_HTTPDIRFS" = 1 ] || continue ;;
		rclone) [ "$HAVE_RCLONE" = 1 ] || continue ;;
		esac
		case $kind in # only the clients of the pairs that will run
		httpdirfs_nc) [[ " ${PAIRS_ONLY:-head_httpdirfs_nc} " == *" head_httpdirfs_nc "* ]] || continue ;;
		dwsfs_mem) [[ " ${PAIRS_ONLY:-mem_curl} " == *" mem_"* ]] || continue ;;
		httpdirfs) [[ " ${PAIRS_ONLY:-cat_httpdirfs} " == *" cat_httpdirfs "* ]] || continue ;;
		rclone) [[ " ${PAIRS_ONLY:-cat_rclone} " == *" cat_rclone "* ]] || continue ;;
		esac
		fresh_dirs
		if [ "$kind" = dwsfs_mem ]; then
			DWS_OPTS=cache_size=0 mount_client dwsfs verify
		else
			mount_client "$kind" verify
		fi
		if [ "$kind" = httpdirfs_nc ]; then
			cmp -n "$PREFIX_BYTES" "$FILE" "$SRC"
			log "verify: $kind first $PREFIX_BYTES bytes == source"
		elif [[ $kind == dwsfs* ]]; then
			for i in "${!FILES[@]}"; do cmp "${FILES[$i]}" "${DWS_SRCS[$i]}"; done
			log "verify: $kind == source (${#FILES[@]} file(s), $DWS_SIZE bytes)"
		else
			cmp "$FILE" "$SRC"
			log "verify: $kind == source ($SIZE bytes)"
		fi
		umount_client
	done
	fresh_dirs
fi

# ---- one timed run: appends its key=value line to rounds.txt (and LINE)
# (not in a subshell: the EXIT trap must know CLIENT_PID)
run_one() { # CLIENT ROUND PAIR
	local c=$1 r=$2 id=$3 t0 t1 t1_both="" dw_end bytes cpu="" mount_ms="" extra="" st q src=$SRC c0 c1
	fresh_dirs
	case $c in
	dwsfs_1t)
		mount_client dwsfs "$c.$r.$id" "$NAME1" "$SIZE1"
		mount_ms=$MOUNT_MS src=$SRC1 ;;
	dwsfs_warm) # fill the block cache, then read through a new mount
		mount_client dwsfs "$c.$r.$id"
		cat "${FILES[@]}" >/dev/null
		umount_client
		mount_client dwsfs "$c.$r.$id"
		mount_ms=$MOUNT_MS ;;
	dwsfs_mem) # no disk cache: the blocks stay in memory
		DWS_OPTS=cache_size=0 mount_client dwsfs "$c.$r.$id"
		mount_ms=$MOUNT_MS ;;
	dwsfs_* | httpdirfs | httpdirfs_nc_head | rclone)
		local kind=${c%%_*}
		[ "$c" = httpdirfs_nc_head ] && kind=httpdirfs_nc
		mount_client "$kind" "$c.$r.$id"
		mount_ms=$MOUNT_MS ;;
	esac
	[ "$c" = curlfile ] && mkdir -p "$PARTS"
	cold "$src"
	: >"$NGX_LOG"
	c0=$(cpu_snap)
	t0=$(date +%s%N)
	case $c in
	curl)
		/usr/bin/time -o "$WORK/time" -f "%U %S" "${CURL[@]}" -K "$WORK/ranges-null.cfg" >"$WORK/curl.out" ;;
	curlfile)
		/usr/bin/time -o "$WORK/time" -f "%U %S" "${CURL[@]}" -K "$WORK/ranges-files.cfg" >"$WORK/curl.out" ;;
	curl_dw) # curl while the same bytes go to the cache's disk: done when both are
		# (direct_write's last write, not its removal of the files after it)
		dw_start
		/usr/bin/time -o "$WORK/time" -f "%U %S" "${CURL[@]}" -K "$WORK/ranges-null.cfg" >"$WORK/curl.out"
		t1_both=$(date +%s%N)
		dw_wait
		dw_end=$(sed -n 's/.*end_ns=\([0-9]*\).*/\1/p' "$WORK/fetch.out")
		[ -n "$dw_end" ] || { log "direct_write printed no end_ns"; exit 1; }
		extra=" curl_ns=$((t1_both - t0)) dw_ns=$((dw_end - t0))"
		[ "$dw_end" -le "$t1_both" ] || t1_both=$dw_end ;;
	dwsfs_cat | dwsfs_mem | dwsfs_warm | dwsfs_1t | httpdirfs | rclone)
		cat "${FILES[@]}" >/dev/null ;;
	dwsfs_dd)
		dd if="$FILE" of=/dev/null bs=1M status=none ;;
	dwsfs_par4)
		q=$(((SIZE / 4 + 1048575) / 1048576))
		local pids=() j
		for j in 0 1 2 3; do
			dd if="$FILE" of=/dev/null bs=1M skip=$((j * q)) count="$q" status=none &
			pids+=($!)
		done
		wait "${pids[@]}" ;;
	dwsfs_head | httpdirfs_nc_head)
		head -c "$PREFIX_BYTES" "$FILE" >/dev/null ;;
	fetch_disk | fetch_mem) # the fetch pipeline alone, no FUSE: what the disk cache's writes cost
		HF_ENDPOINT=$EP "$BUILD/tests/bench/fetch_pipeline" "hf://buckets/$NS/$NAME" "$KEY" "$CACHE" \
			"$([ "$c" = fetch_mem ] && echo memory)" >"$WORK/fetch.out" ;;
	direct_write) # the disk cache's writes alone: no network, no FUSE
		dw_start
		dw_wait ;;
	esac
	t1=$(date +%s%N)
	[ -z "$t1_both" ] || t1=$t1_both
	c1=$(cpu_snap)
	extra="$extra machine_busy=$(awk -v a="$c0" -v b="$c1" 'BEGIN {split(a, x, " "); split(b, y, " "); t = y[1] - x[1]; printf "%.3f", (t > 0 ? 1 - (y[2] - x[2]) / t : 0)}')"
	case $c in
	curl | curlfile | curl_dw)
		bytes=$(awk '{s += $1} END {printf "%d", s}' "$WORK/curl.out")
		cpu=$(awk '{printf "%.3f", $1 + $2}' "$WORK/time") ;;
	*_head) bytes=$PREFIX_BYTES ;;
	fetch_*) bytes=$(sed -n 's/^bytes=\([0-9]*\).*/\1/p' "$WORK/fetch.out") ;;
	direct_write)
		bytes=$(sed -n 's/^bytes=\([0-9]*\).*/\1/p' "$WORK/fetch.out")
		cpu=$(sed -n 's/.*cpu_s=\([0-9.]*\).*/\1/p' "$WORK/fetch.out") ;;
	dwsfs_1t) bytes=$SIZE1 ;;
	dwsfs_*) bytes=$DWS_SIZE ;;
	*) bytes=$SIZE ;;
	esac
	[ "$bytes" -gt 0 ] || { log "$c read no bytes"; exit 1; }
	if [ -n "$CLIENT_PID" ]; then
		cpu=$(cpu_of "$CLIENT_PID")
		if [[ $c == dwsfs_* ]]; then
			st=$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(" ".join(f"{k}={d[k]}" for k in ("cdn_requests","bytes_fetched","cache_hits","cache_misses","cache_unkept_bytes","cache_waits")))' "$MNT/.dwsfs/status")
			extra="$extra $st"
		fi
		umount_client
	fi
	cp "$NGX_LOG" "$WORK/logs/nginx.$c.$r.$id.log" 2>/dev/null || true
	[ "$HAVE_NGINX" = 1 ] && extra="$extra $("$PY" tests/bench/http_report.py conc "$WORK/logs/nginx.$c.$r.$id.log")"
	LINE="round=$r client=$c ns=$((t1 - t0)) bytes=$bytes cpu_s=$cpu mount_ms=$mount_ms pair=$id$extra"
	echo "$LINE" >>"$WORK/rounds.txt"
}

# Pairs "OURS:REFERENCE:ID": the two runs of a pair are adjacent (their order
# alternates by round), the pairs of a round in an order rotating by round, so a
# burst of load from elsewhere hits one pair, not a whole figure.
PAIRS=()
if [ "$HAVE_CURL" = 1 ]; then
	PAIRS+=(dwsfs_cat:curl:cat_curl dwsfs_mem:curl:mem_curl dwsfs_cat:curlfile:cat_curlfile dwsfs_dd:curl:dd_curl)
	[ -x "$BUILD/tests/bench/fetch_pipeline" ] &&
		PAIRS+=(fetch_disk:fetch_mem:fetch_pipeline dwsfs_mem:fetch_mem:mem_fetchmem fetch_mem:curl:fetchmem_curl)
	[ -x "$BUILD/tests/bench/direct_write" ] &&
		PAIRS+=(direct_write:curl:directwrite_curl dwsfs_cat:curl_dw:cat_curldw curl_dw:curl:curldw_curl)
fi
[ "$HAVE_HTTPDIRFS" = 1 ] && PAIRS+=(dwsfs_cat:httpdirfs:cat_httpdirfs)
[ "$HAVE_RCLONE" = 1 ] && PAIRS+=(dwsfs_cat:rclone:cat_rclone dwsfs_mem:rclone:mem_rclone)
if [ "$HAVE_CURL" = 1 ]; then
	PAIRS+=(dwsfs_par4:curl:par4_curl dwsfs_warm:curl:warm_curl dwsfs_1t:curl:1t_curl curlfile:curl:curlfile_curl)
fi
[ "$HAVE_HTTPDIRFS" = 1 ] && PAIRS+=(dwsfs_head:httpdirfs_nc_head:head_httpdirfs_nc)
if [ -n "${PAIRS_ONLY:-}" ]; then
	kept=()
	for p in "${PAIRS[@]}"; do
		case " $PAIRS_ONLY " in *" ${p##*:} "*) kept+=("$p") ;; esac
	done
	PAIRS=(${kept[@]+"${kept[@]}"})
	if [ ${#DWS_NAMES[@]} != 1 ]; then
		for p in ${PAIRS[@]+"${PAIRS[@]}"}; do
			case ${p%%:*} in dwsfs_dd | dwsfs_par4 | dwsfs_head)
				log "pair ${p##*:} reads one file: not with a sharded base"; exit 1 ;;
			esac
		done
	fi
fi
if [ ${#PAIRS[@]} = 0 ]; then
	log "no reference client can run here (see the notes above)"
	exit 1
fi

: >"$WORK/rounds.txt"
: >"$WORK/info.txt"
echo "pairs=${PAIRS[*]}" >>"$WORK/info.txt" # OURS:REFERENCE:ID each
t_start=$(date +%s)
n=${#PAIRS[@]}
for r in $(seq 1 "$ROUNDS"); do
	order=()
	for k in $(seq 0 $((n - 1))); do order+=("${PAIRS[$(((k + r - 1) % n))]}"); done
	done_order=
	for p in "${order[@]}"; do
		IFS=: read -r a b id <<<"$p"
		((r % 2)) || { t=$a a=$b b=$t; }
		done_order="$done_order $a,$b,$id"
		for c in "$a" "$b"; do
			run_one "$c" "$r" "$id"
			ns=$(sed -n 's/.* ns=\([0-9]*\).*/\1/p' <<<"$LINE")
			by=$(sed -n 's/.* bytes=\([0-9]*\).*/\1/p' <<<"$LINE")
			log "round $r, $id: $c $((ns / 1000000)) ms, $((by * 1000 / (ns + 1))) MB/s"
		done
	done
	echo "order$r=${done_order# }" >>"$WORK/info.txt"
done
fresh_dirs

# ---- diagnostics: FUSE request sizes and concurrency, where dwsfs spends its CPU
if [ "$DIAG" = 1 ] && [ "$HAVE_PERF" = 1 ]; then
	mkdir -p "$WORK/diag"
	if ! grep -q " /sys/fs/fuse/connections " /proc/mounts; then
		mount -t fusectl none /sys/fs/fuse/connections 2>/dev/null && FUSECTL_MOUNTED=1
	fi
	for kind in dwsfs rclone; do
		[ "$kind" = rclone ] && [ "$HAVE_RCLONE" = 0 ] && continue
		fresh_dirs
		mount_client "$kind" "diag"
		dev=$(mountpoint -d "$MNT" | cut -d: -f2)
		cold
		perf record -q -o "$WORK/diag/fuse.$kind.data" -e fuse:fuse_request_send -e fuse:fuse_request_end -a -- \
			sh -c 'cat "$1" >/dev/null' _ "$FILE" 2>/dev/null
		{
			echo "max_background=$(cat "/sys/fs/fuse/connections/$dev/max_background" 2>/dev/null)"
			echo "congestion_threshold=$(cat "/sys/fs/fuse/connections/$dev/congestion_threshold" 2>/dev/null)"
			perf script -i "$WORK/diag/fuse.$kind.data" -F event,trace 2>/dev/null >"$WORK/diag/fuse.$kind.script"
			"$PY" tests/bench/http_report.py fuse "$WORK/diag/fuse.$kind.script" "$dev"
		} >"$WORK/diag/fuse.${kind/dwsfs/dwsfs_cat}.txt"
		umount_client
		rm -f "$WORK/diag/fuse.$kind.data" "$WORK/diag/fuse.$kind.script"
	done
	fresh_dirs
	mount_client dwsfs diag-cpu
	cold
	perf record -q -g -o "$WORK/diag/cpu.data" -p "$CLIENT_PID" -- sleep 600 2>/dev/null &
	PERF_PID=$!
	sleep 0.3
	cat "$FILE" >/dev/null
	stop_pid "$PERF_PID" INT
	PERF_PID=
	umount_client
	perf report -i "$WORK/diag/cpu.data" --no-children --sort sym --stdio -g none --percent-limit 1.5 2>/dev/null |
		grep -E '^ +[0-9.]+%' | head -14 >"$WORK/diag/perf.dwsfs.txt" || true
	rm -f "$WORK/diag/cpu.data"
	fresh_dirs
fi
log "rounds and diagnostics took $(($(date +%s) - t_start)) s"

# ---- configuration, commands and machine for the report
BLK_MIB=$((BLOCK / 1048576))
TENSORS=$("$PY" - "$SRC" "$BLOCK" <<'PYEOF'
import json, statistics, struct, sys
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    h = json.loads(f.read(n))
bs = int(sys.argv[2])
sz = [v["data_offsets"][1] - v["data_offsets"][0] for k, v in h.items() if k != "__metadata__"]
big = sum(x for x in sz if x >= bs)
print(f"{len(sz)} tensors, median {statistics.median(sz) / 2**20:.1f} MiB, {sum(1 for x in sz if x < bs)} of them smaller than a "
      f"{bs >> 20} MiB block; {100 * big / sum(sz):.0f}% of the bytes in tensors of a block or more")
PYEOF
)
cat >"$WORK/commands.md" <<EOF
- model: \`tests/bench/make_model.py BUCKET --params $PARAMS --deltas 0\`: $(sed -n 's/^params=//p' "$WORK/model.txt") BF16 params ($TENSORS), one complete anchor \`$KEY\` of $SIZE bytes; no base, so the mount shows it as \`model.safetensors\` $([ "$VERIFY" = 1 ] && echo "(byte-identical: every client's read checked with \`cmp\` against the source before the rounds)")
- server: $([ "$HAVE_NGINX" = 1 ] && echo "nginx ($(nginx -v 2>&1 | sed 's/^nginx version: //')) on 127.0.0.2, 2 workers, \`sendfile on\`, \`autoindex on\`, root = the Hub folder; \`tests/hubserver.py --root HUB --cdn-url http://127.0.0.2:PORT\` lists the bucket and answers \`/buckets/$NS/$NAME/resolve/$KEY\` with a 302 to \`http://127.0.0.2:PORT/buckets/$NS/$NAME/$KEY\`" || echo "tests/hubserver.py (its own Python CDN: nginx not installed)")
- cold: before each timed read \`sync; dd if=SRC iflag=nocache count=0\` $([ "$DROP" = 1 ] && echo "(the served file leaves the page cache: nginx reads it from disk)" || echo "was NOT run (DROP=0): the served file stays in the page cache")
- curl (reference): \`curl --no-progress-meter --parallel --parallel-max $PAR -K ranges.cfg\`, ranges.cfg = $(( (SIZE + BLOCK - 1) / BLOCK )) groups joined by \`next\`, each \`url = "http://127.0.0.2:PORT/buckets/$NS/$NAME/$KEY"\`, \`range = "OFF-END"\` ($BLK_MIB MiB), \`output = "/dev/null"\`, \`silent\`, \`show-error\`, \`fail\`, \`write-out = "%{size_download}\n"\` (bytes summed and checked); curlfile: \`output = "CACHEFS/curlparts/part.N"\`
- dwsfs: \`HF_ENDPOINT=http://127.0.0.1:HUBPORT build/dwsfs -f hf://buckets/$NS/$NAME MNT -o cache_dir=CACHEFS/cache\` (a fresh empty cache_dir each run; other options default: block_size 8 MiB, 4 prefetch threads), then \`cat MNT/model.safetensors >/dev/null\` / \`dd if=MNT/model.safetensors of=/dev/null bs=1M\` / 4× \`dd ... bs=1M skip=k*Q count=Q\` in parallel / \`head -c $PREFIX_BYTES\`; \`fusermount3 -u MNT\`
- httpdirfs: \`httpdirfs -f --no-range-check --cache --cache-location CACHEFS/hdcache http://127.0.0.2:PORT/buckets/$NS/$NAME/anchors/ MNT\` (fresh cache dir each run), \`cat MNT/step_000001.safetensors >/dev/null\`; without \`--cache\` for the \`head -c $PREFIX_BYTES\` row; \`--no-range-check\` because its range probe rejects nginx (fangfufu/httpdirfs#188: it asks for 0-131072 and wants 131072 bytes)
- rclone: \`rclone mount :http: MNT --http-url http://127.0.0.2:PORT/buckets/$NS/$NAME/anchors/ --read-only --vfs-cache-mode off\` (chunked reads: defaults \`--vfs-read-chunk-size 128M\`, doubling), \`cat MNT/step_000001.safetensors >/dev/null\`
- diagnostics of dwsfs: \`dwsfs_warm\` = mount, \`cat\` (fills the fresh block cache), unmount, mount again on the same cache_dir, timed \`cat\` (no network: the FUSE path alone); \`dwsfs_1t\` = \`tests/bench/http_onetensor.py BUCKET2 --bytes $SIZE\`: the same byte count in one tensor of $((SIZE1 / 2048)) x 1024 BF16 (readahead is not cut at tensor ends), mounted and read like the model
- timed: the read only (\`date +%s%N\` around it); mount time reported apart; client CPU = /proc/PID/stat utime+stime of the daemon just before unmount (curl: \`/usr/bin/time\`; includes the mount's own work); machine busy = 1 - (idle+iowait)/total of /proc/stat's cpu line over the read (all processes, other sessions' included)
- rounds: $ROUNDS; each figure's two runs adjacent (a pair), their order alternating by round; the pairs of a round in an order rotating by one each round (see Raw per round)
EOF
{
	echo "rounds=$ROUNDS"
	echo "par=$PAR"
	echo "block=$BLOCK"
	echo "size=$SIZE"
	echo "prefix_bytes=$PREFIX_BYTES"
	echo "smoke=$SMOKE"
	echo "skipped=$(IFS=';'; echo "${SKIPPED[*]+"${SKIPPED[*]}"}")"
	echo "nproc=$(nproc)"
	echo "cpu=$(grep -m1 '^model name' /proc/cpuinfo | sed 's/^model name[[:space:]]*:[[:space:]]*//')"
	echo "mem=$(free -g | awk '/^Mem:/ {print $2 " GiB"}')"
	echo "kernel=$(uname -r)"
	if grep -q 'page_reporting' /proc/cmdline 2>/dev/null; then
		echo "vm=a virtual machine with free page reporting ($(grep -o 'page_reporting[^ ]*' /proc/cmdline | head -1)): freed guest memory goes back to the host, so first-touching fresh memory (page cache included) is slow and uneven"
	fi
	echo "build=meson buildtype=$("$PY" -c 'import json,sys; print(next(o["value"] for o in json.load(open(sys.argv[1])) if o["name"] == "buildtype"))' "$BUILD/meson-info/intro-buildoptions.json" 2>/dev/null || echo unknown), $("${CC:-cc}" --version 2>/dev/null | head -1)"
	echo "dwsfs=$("$DWSFS" --version 2>/dev/null | head -1)"
	echo "curl=$(curl --version 2>/dev/null | head -1 | cut -d' ' -f1-2)"
	[ "$HAVE_NGINX" = 1 ] && echo "nginx=$(nginx -v 2>&1 | sed 's/^nginx version: //')"
	have httpdirfs && echo "httpdirfs=$(httpdirfs --version 2>&1 | head -1)"
	have rclone && echo "rclone=$(rclone --config "$WORK/rclone.conf" version 2>/dev/null | head -1)"
	echo "libfuse=$(fusermount3 -V 2>&1)"
	have perf && echo "perf=$(perf --version 2>/dev/null)"
} >>"$WORK/info.txt"

mkdir -p "$(dirname "$MD")"
"$PY" tests/bench/http_report.py report "$WORK" "$MD"
log "wrote $MD"
if [ -n "${RAW_OUT:-}" ]; then
	mkdir -p "$RAW_OUT"
	cp "$WORK/rounds.txt" "$WORK/info.txt" "$RAW_OUT/"
fi
