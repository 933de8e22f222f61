#!/usr/bin/python3
"""Helpers of tests/bench/run_http_bench.sh (not a test).

    http_report.py conc NGINX_LOG        in-flight profile of the byte requests of one
                                         timed run, from nginx's access log (format
                                         `bench` of run_http_bench.sh), as key=value
    http_report.py fuse PERF_SCRIPT DEV  FUSE_READ sizes and outstanding READs of
                                         connection DEV, from `perf script` output of the
                                         fuse:fuse_request_send/end tracepoints
    http_report.py report WORK MD        the markdown report from WORK/rounds.txt,
                                         WORK/info.txt, WORK/commands.md, WORK/diag/
"""
import collections
import os
import re
import statistics
import sys


def kv_line(line):
    return dict(x.split("=", 1) for x in line.split() if "=" in x)


def kv_file(path):
    out = {}
    if os.path.exists(path):
        for line in open(path, encoding="utf-8", errors="replace"):
            line = line.rstrip("\n")
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                out[k.strip()] = v
    return out


# ---- nginx access log: how many byte requests were in flight, over time ----

def conc(path):
    """nginx `bench` format: msec connection request_time status bytes "range" "ua".
    A request's interval is [msec - request_time, msec] (1 ms resolution)."""
    iv, small = [], 0
    for line in open(path, encoding="utf-8", errors="replace"):
        f = line.split()
        if len(f) < 5:
            continue
        end, rt, n = float(f[0]), float(f[2]), int(f[4])
        if n < 65536:               # index pages, HEADs, the safetensors header
            small += 1
            continue
        iv.append((end - rt, end, n, f[1]))
    if not iv:
        return {"reqs": 0, "small_reqs": small}
    t0 = min(s for s, _, _, _ in iv)
    t1 = max(e for _, e, _, _ in iv)
    ev = sorted([(s, 1) for s, _, _, _ in iv] + [(e, -1) for _, e, _, _ in iv])
    cur, last, at = 0, t0, collections.Counter()
    peak = 0
    for t, d in ev:
        at[cur] += t - last
        last = t
        cur += d
        peak = max(peak, cur)
    span = max(t1 - t0, 1e-9)
    mean = sum(k * v for k, v in at.items()) / span
    return {"reqs": len(iv), "small_reqs": small, "conns": len({c for *_, c in iv}),
            "req_mb": round(statistics.mean(n for _, _, n, _ in iv) / 1e6, 3),
            "req_ms": round(1000 * statistics.mean(e - s for s, e, _, _ in iv), 1),
            "span_s": round(span, 3), "inflight_mean": round(mean, 2), "inflight_max": peak,
            "idle_frac": round(at[0] / span, 3), "one_frac": round(at[1] / span, 3)}


# ---- perf tracepoints: FUSE READ sizes and how many were outstanding ----

def fuse(path, dev):
    sends, sizes, hist = {}, collections.Counter(), collections.Counter()
    outstanding = peak = 0
    for line in open(path, encoding="utf-8", errors="replace"):
        m = re.search(r"fuse_request_send: connection (\d+) req (\d+) opcode (\d+)", line)
        if m:
            if m.group(1) == dev and m.group(3) == "15":          # FUSE_READ
                sends[m.group(2)] = True
                outstanding += 1
                peak = max(peak, outstanding)
                hist[outstanding] += 1
            continue
        m = re.search(r"fuse_request_end: connection (\d+) req (\d+) len (\d+)", line)
        if m and m.group(1) == dev and sends.pop(m.group(2), None):
            outstanding -= 1
            sizes[int(m.group(3)) - 16] += 1                       # minus fuse_out_header
    total = sum(sizes.values())
    common = sizes.most_common(1)[0] if sizes else (0, 0)
    return {"fuse_reads": total, "fuse_read_size_common": common[0],
            "fuse_read_size_common_frac": round(common[1] / total, 3) if total else 0,
            "fuse_reads_outstanding_max": peak,
            "fuse_reads_outstanding_hist": ",".join(f"{k}:{v}" for k, v in sorted(hist.items()))}


# ---- the report ----

NAMES = {
    "curl": "`curl --parallel --parallel-max {par}` over {blk} ranges to /dev/null",
    "curlfile": "the same curl writing each range to a file beside the dwsfs cache",
    "curl_dw": "the same curl to /dev/null while `tests/bench/direct_write` writes the same bytes beside the dwsfs "
               "cache (O_DIRECT, from memory), until both are done: a download that keeps the bytes on disk, no page cache copy",
    "dwsfs_cat": "dwsfs `cat`",
    "dwsfs_mem": "dwsfs `cat` with `cache_size=0` (no disk cache)",
    "fetch_disk": "the fetch pipeline without FUSE (`tests/bench/fetch_pipeline`), disk cache",
    "fetch_mem": "the fetch pipeline without FUSE (`tests/bench/fetch_pipeline`), no disk cache",
    "dwsfs_dd": "dwsfs `dd bs=1M`",
    "dwsfs_par4": "dwsfs, 4 `dd bs=1M` readers on quarters",
    "dwsfs_warm": "dwsfs `cat` with the block cache already filled (remount)",
    "dwsfs_1t": "dwsfs `cat` of a one-tensor model of the same size",
    "httpdirfs": "httpdirfs `--cache` `cat`",
    "rclone": "rclone mount `cat`",
    "dwsfs_head": "dwsfs `head -c {prefix}`",
    "httpdirfs_nc_head": "httpdirfs (no `--cache`) `head -c {prefix}`",
}


def fmt_mb(x):
    return f"{x:,.0f}" if x >= 10 else f"{x:.2f}"


def report(work, md):
    info = kv_file(os.path.join(work, "info.txt"))
    by_client = collections.defaultdict(list)     # client -> [fields of each run]
    pairs = collections.defaultdict(dict)         # pair id -> round -> client -> fields
    for line in open(os.path.join(work, "rounds.txt")):
        f = kv_line(line)
        if f:
            by_client[f["client"]].append(f)
            pairs[f.get("pair", "")].setdefault(int(f["round"]), {})[f["client"]] = f
    rounds = int(info["rounds"])
    par, blk = info["par"], f"{int(info['block']) >> 20} MiB"
    pb = int(info["prefix_bytes"])
    prefix = f"{pb >> 20} MiB" if pb >= 1 << 20 else f"{pb} B"
    name = {k: v.format(par=par, blk=blk, prefix=prefix) for k, v in NAMES.items()}

    def rate(f):
        return int(f["bytes"]) / (int(f["ns"]) / 1e9) / 1e6

    def pair_rates(pid, ours, ref):
        return [(rate(d[ours]), rate(d[ref])) for _, d in sorted(pairs.get(pid, {}).items()) if ours in d and ref in d]

    rows = []

    def row(figure, pid, ours, ref, target):
        """ratio ours/ref of the two adjacent runs of pair pid, per round."""
        pr = pair_rates(pid, ours, ref)
        tgt = "—" if target is None else f">= {target}x"
        if not pr:
            rows.append((figure, "—", "—", "skipped (see the note below)", tgt, "—"))
            return
        ratios = [x / y for x, y in pr]
        med = statistics.median(ratios)
        met = "—" if target is None else ("yes" if med >= target else f"**no** ({med / target:.2f} of target)")
        rows.append((figure, fmt_mb(statistics.median(x for x, _ in pr)), fmt_mb(statistics.median(y for _, y in pr)),
                     f"{med:.2f}x ({min(ratios):.2f}–{max(ratios):.2f})", tgt, met))

    mb = int(info["size"]) / 1e6
    row(f"cold read of the {mb:,.0f} MB model: {name['dwsfs_cat']} vs {name['curl']}", "cat_curl", "dwsfs_cat", "curl", 0.8)
    row(f"cold read: {name['dwsfs_dd']} vs the same curl", "dd_curl", "dwsfs_dd", "curl", 0.8)
    row(f"cold read: {name['dwsfs_cat']} vs {name['httpdirfs']} of the same file from the same nginx",
        "cat_httpdirfs", "dwsfs_cat", "httpdirfs", 2)
    row(f"cold read: {name['dwsfs_cat']} vs {name['rclone']} (`:http:`, `--vfs-cache-mode off`) of the same file",
        "cat_rclone", "dwsfs_cat", "rclone", 2)
    row(f"cold read: {name['dwsfs_mem']} vs the same curl (neither writes to disk)", "mem_curl", "dwsfs_mem", "curl", 0.8)
    row(f"cold read: {name['dwsfs_cat']} vs {name['curlfile']} (both write to disk)", "cat_curlfile", "dwsfs_cat",
        "curlfile", 0.8)
    row(f"cold read: {name['dwsfs_cat']} vs {name['curl_dw']}", "cat_curldw", "dwsfs_cat", "curl_dw", 0.8)
    row(f"diagnostic (not dwsfs), what writing the bytes to this disk during a download costs it: {name['curl_dw']} "
        "vs the same curl alone", "curldw_curl", "curl_dw", "curl", None)
    row(f"cold read: {name['dwsfs_mem']} vs {name['rclone']} (neither writes to disk)", "mem_rclone", "dwsfs_mem",
        "rclone", 2)
    row(f"diagnostic: {name['fetch_disk']} vs {name['fetch_mem']}", "fetch_pipeline", "fetch_disk", "fetch_mem", None)
    row(f"diagnostic, what FUSE costs: {name['dwsfs_mem']} vs {name['fetch_mem']}", "mem_fetchmem", "dwsfs_mem",
        "fetch_mem", None)
    row(f"diagnostic, the HTTP side alone: {name['fetch_mem']} vs the same curl", "fetchmem_curl", "fetch_mem", "curl", None)
    row(f"diagnostic: {name['dwsfs_par4']} vs the same curl", "par4_curl", "dwsfs_par4", "curl", None)
    row(f"diagnostic: {name['dwsfs_warm']}: no network, the FUSE path alone, vs the same curl", "warm_curl", "dwsfs_warm", "curl", None)
    row(f"diagnostic: {name['dwsfs_1t']} (readahead not cut at tensor ends) vs the same curl", "1t_curl", "dwsfs_1t", "curl", None)
    row(f"diagnostic (not dwsfs): {name['curlfile']} vs the same curl to /dev/null", "curlfile_curl", "curlfile", "curl", None)
    row(f"diagnostic: first {prefix}: {name['dwsfs_head']} vs {name['httpdirfs_nc_head']}",
        "head_httpdirfs_nc", "dwsfs_head", "httpdirfs_nc_head", None)

    L = []
    smoke = info.get("smoke") == "1"
    L.append("# dwsfs HTTP read benchmark" + (" (SMOKE configuration)" if smoke else ""))
    L.append("")
    L.append("Produced by `tests/bench/run_http_bench.sh`" + (" with `SMOKE=1`" if smoke else "") +
             ". Every figure is the ratio of two reads run back to back in the same round (a pair; the order within a pair "
             f"alternates, the order of the pairs rotates); ratio = median over {rounds} round(s) (min–max across rounds); "
             "MB/s (10^6 bytes) are the medians of each side, for orientation only: the machine is shared and noisy.")
    L.append("")
    L.append("| figure | dwsfs MB/s | reference MB/s | ratio median (min–max) | target | met? |")
    L.append("|---|---|---|---|---|---|")
    for r_ in rows:
        L.append("| " + " | ".join(r_) + " |")
    L.append("")
    skipped = [s_ for s_ in info.get("skipped", "").split(";") if s_]
    if skipped:
        L.append("Skipped: " + "; ".join(skipped) + ".")
        L.append("")

    L.append("## Where the time goes (medians over every run of each client)")
    L.append("")
    L.append("Byte requests seen by nginx during each timed read (its access log: end time and `$request_time`): "
             "how many were in flight on average, the share of the read during which none was, and the request size. "
             "Client CPU = the client process (daemon for the mounts, curl itself), user+sys seconds per GB read; "
             "machine busy = share of both cores busy during the read (every process, other sessions' too).")
    L.append("")
    L.append("| client | runs | MB/s | requests | MB/request | ms/request | in flight (mean / max) | time with 0 in flight | "
             "time with 1 | client CPU s/GB | machine busy | mount s |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in ("curl", "curlfile", "dwsfs_cat", "dwsfs_dd", "dwsfs_par4", "dwsfs_warm", "dwsfs_1t", "httpdirfs", "rclone",
              "dwsfs_head", "httpdirfs_nc_head"):
        runs = by_client.get(c)
        if not runs:
            continue

        def m(key):
            vals = [float(f[key]) for f in runs if f.get(key) not in (None, "", "None")]
            return statistics.median(vals) if vals else None

        fm = lambda v, p=2: "—" if v is None else f"{v:.{p}f}"
        pct = lambda v: "—" if v is None else f"{100 * v:.0f}%"
        cpu = [float(f["cpu_s"]) / (int(f["bytes"]) / 1e9) for f in runs if f.get("cpu_s")]
        ms = m("mount_ms")
        L.append(f"| {name[c]} | {len(runs)} | {fmt_mb(statistics.median(rate(f) for f in runs))} | {fm(m('reqs'), 0)} | "
                 f"{fm(m('req_mb'))} | {fm(m('req_ms'), 1)} | {fm(m('inflight_mean'))} / {fm(m('inflight_max'), 0)} | "
                 f"{pct(m('idle_frac'))} | {pct(m('one_frac'))} | {fm(statistics.median(cpu) if cpu else None)} | "
                 f"{pct(m('machine_busy'))} | {fm(None if ms is None else ms / 1000)} |")
    L.append("")
    if by_client.get("dwsfs_cat"):
        f1 = by_client["dwsfs_cat"][0]
        if "cdn_requests" in f1:
            L.append(f"dwsfs `.dwsfs/status` after its first timed cat: cdn_requests={f1['cdn_requests']}, "
                     f"bytes_fetched={int(f1['bytes_fetched']):,}, cache_misses={f1.get('cache_misses')}, "
                     f"cache_hits={f1.get('cache_hits')}.")
            L.append("")

    diag = os.path.join(work, "diag")
    if os.path.isdir(diag):
        L.append("## Diagnostics (one more cold read each, after the rounds)")
        L.append("")
        for c in ("dwsfs_cat", "rclone"):
            d = kv_file(os.path.join(diag, f"fuse.{c}.txt"))
            if d:
                L.append(f"- {name[c]}: kernel FUSE connection max_background={d.get('max_background')}, "
                         f"congestion_threshold={d.get('congestion_threshold')}; {d.get('fuse_reads')} FUSE_READ requests, "
                         f"{float(d.get('fuse_read_size_common_frac', 0)) * 100:.0f}% of them "
                         f"{int(d.get('fuse_read_size_common', 0)) // 1024} KiB; at most {d.get('fuse_reads_outstanding_max')} "
                         f"outstanding (READs outstanding at each send, count: {d.get('fuse_reads_outstanding_hist')}) "
                         "— perf tracepoints fuse:fuse_request_send/end")
        prof = os.path.join(diag, "perf.dwsfs.txt")
        if os.path.exists(prof):
            L.append("- `perf record -g -p <dwsfs>` during a cold `cat` (self time, top symbols, all dwsfs threads):")
            L.append("")
            L.append("```")
            L.extend(open(prof).read().rstrip().splitlines())
            L.append("```")
        L.append("")

    L.append("## Configuration and exact commands")
    L.append("")
    L.extend(open(os.path.join(work, "commands.md")).read().rstrip().splitlines())
    L.append("")
    L.append("## Machine")
    L.append("")
    for k in ("nproc", "cpu", "mem", "kernel", "vm", "build", "dwsfs", "curl", "nginx", "httpdirfs", "rclone", "libfuse", "perf"):
        if info.get(k):
            L.append(f"- {k}: {info[k]}")
    L.append("")
    L.append("## Raw per round")
    L.append("")
    L.append("| round | pair | first | second | ratio (ours / reference) |")
    L.append("|---|---|---|---|---|")
    # each pair's OURS:REFERENCE:ID as the script defined it
    roles = {p.split(":")[2]: tuple(p.split(":")[:2]) for p in info["pairs"].split()}
    for r in range(1, rounds + 1):
        for item in info.get(f"order{r}", "").split():
            a, b, pid = item.split(",")
            d = pairs.get(pid, {}).get(r, {})
            if a not in d or b not in d:
                continue
            cell = lambda c: f"{c} {int(d[c]['ns']) / 1e9:.3f} s, {fmt_mb(rate(d[c]))} MB/s"
            ours, ref = roles[pid]
            L.append(f"| {r} | {pid} | {cell(a)} | {cell(b)} | {rate(d[ours]) / rate(d[ref]):.2f} |")
    L.append("")
    text = "\n".join(L)
    with open(md, "w") as fh:
        fh.write(text)
    print(text)


def main(argv):
    if len(argv) >= 2 and argv[0] == "conc":
        print(" ".join(f"{k}={v}" for k, v in conc(argv[1]).items()))
    elif len(argv) >= 3 and argv[0] == "fuse":
        print("\n".join(f"{k}={v}" for k, v in fuse(argv[1], argv[2]).items()))
    elif len(argv) >= 3 and argv[0] == "report":
        report(argv[1], argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
