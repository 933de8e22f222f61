#!/usr/bin/python3
"""The scale benchmark (issue #17 item 5). Not a test.

    tests/bench/run_scale_bench.py             # 1, 8, 32 and 40 GB models, local and hf://, 3 steps each
    SIZES=1 tests/bench/run_scale_bench.py     # one size (GB, decimal; comma-separated)
    SMOKE=1 tests/bench/run_scale_bench.py     # 0.1 and 0.3 GB, 1 step (CI, ~20 s)
    tests/bench/run_scale_bench.py --report bench-results/scale.json   # the .md and .png again

For each size, tests/bench/make_sparse_model.py writes in seconds a Qwen3-shaped
BF16 bucket whose base shards and complete anchor (step 1) are sparse files (a
few non-zero regions per tensor, the rest holes: they take almost no disk),
one delta (step 2) and ROUNDS held-back deltas changing ~1% of every tensor's
elements, spread as an RL step's. Then, for a local-folder bucket and for
hf:// through the loopback Hub (tests/hubserver.py, its own CDN), a mount with
`poll=1,swap_idle=0` takes the held deltas one at a time. Per step:

  fetched / delta   status bytes_fetched across the step (until its copy is made)
  written / delta   the daemon's /proc/PID/io write_bytes across the step (and
                    read_bytes: a copy larger than the page cache is read back
                    to be patched in place)
  build ms          status last_build_ms
  publish -> root   status root_since_ns - the wall clock when the delta was
                    linked into the bucket, vs poll + transfer + 200 ms
  copy              how the step's materialized copy was made (in place by the
                    catch-up patch, or written whole) and in how long (log)

and per size and bucket: peak RSS (VmHWM, and the peak of RssAnon sampled
every 50 ms: VmHWM also counts the copy's pages the in-place patch maps) with
status patch_bytes; the warm mmap load (tests/bench/mmap_load.py) and the full
re-read (`cat`) of the root's shards vs a dense local copy of the same bytes
(`dwsctl extract` of the last step), alternating, LOAD_ROUNDS rounds. hf://
also: the first full read over the loopback Hub (it fills the block cache,
which materialization needs; when a block was not kept and no copy comes, a
second full read, noted).

Disk: the materialized copy (1x the model: in place, one copy serves while
nothing holds it open), the local copy (1x), the hf:// block cache (1x) and
catch-up patches (~5% of the model per step) come and go; the bench checks the
free disk before each and keeps RESERVE_GB free: what cannot fit is done one
after the other (the local copy measured after the unmount), or skipped
(materialize_max=0, cache_size=0), with a note in the results. Everything is
deleted as it goes. A bucket is not mounted at all when the daemon's expected
memory (patches: ~0.1 byte per model byte per 1% delta held, no cap yet) would
leave under 2 GiB of MemAvailable (noted).

Environment: SMOKE, SIZES, ROUNDS (held steps per bucket, 3), LOAD_ROUNDS (3,
1 above a third of RAM), KINDS (local,hf), CHANGED (0.01), RESERVE_GB (10),
KEEP=1, BUILD (build/), OUT (bench-results/scale.md; SMOKE: bench-results/tmp/).
Writes OUT, its .json and .png (python3-matplotlib). Exit status non-zero only
when something fails (a mount, a byte comparison), never for a missed target.
"""
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = "/usr/bin/python3"
SMOKE = os.environ.get("SMOKE", "0") == "1"
KEEP = os.environ.get("KEEP", "0") == "1"
BUILD = os.path.abspath(os.environ.get("BUILD", os.path.join(ROOT, "build")))
SIZES = [float(x) for x in os.environ.get("SIZES", "0.1,0.3" if SMOKE else "1,8,32,40").split(",")]
ROUNDS = int(os.environ.get("ROUNDS", "1" if SMOKE else "3"))
KINDS = os.environ.get("KINDS", "local,hf").split(",")
CHANGED = float(os.environ.get("CHANGED", "0.01"))
RESERVE = float(os.environ.get("RESERVE_GB", "1" if SMOKE else "10")) * 2**30
OUT = os.path.abspath(os.environ.get("OUT", os.path.join(ROOT, "bench-results", "tmp" if SMOKE else "", "scale.md")))
RAM = next(int(ln.split()[1]) * 1024 for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))
POLL = 1
GIB = 2**30
os.environ["DWSFS"] = os.path.join(BUILD, "dwsfs")
os.environ["DWSCTL"] = os.path.join(BUILD, "dwsctl")
sys.path.insert(0, os.path.join(ROOT, "tests"))
import mountutil  # noqa: E402

T0 = time.monotonic()


def log(msg):
    print(f"scale-bench {time.monotonic() - T0:7.1f}s: {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def kv(text):
    return dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln)


def room(path):
    """Bytes free under path beyond the reserve kept for everyone else."""
    sv = os.statvfs(path)
    return sv.f_bavail * sv.f_frsize - RESERVE


def proc_io(pid):
    with open(f"/proc/{pid}/io") as f:
        d = dict(ln.split(":") for ln in f)
    return int(d["read_bytes"]), int(d["write_bytes"])


def vm(pid):
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, _, v in (ln.partition(":") for ln in f)
                if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


class AnonPeak(threading.Thread):
    """The daemon's peak RssAnon, sampled every 50 ms. VmHWM also counts the
    file pages it maps (the in-place patch maps the whole copy: up to the
    model's size of reclaimable page cache); this is its own memory."""
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self):
        while not self.stop.wait(0.05):
            try:
                self.peak = max(self.peak, vm(self.pid)["RssAnon"])
            except (OSError, KeyError):
                return


def wait_for(cond, timeout, what, m):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n{m.log()[-3000:]}")
        time.sleep(0.02)


def wait_copy(m, step, timeout, idle=30):
    """None once step is materialized, else why it is not: the status's
    materialize_note, passthrough off, or no copy while the daemon wrote
    nothing for `idle` s (a remote root's copy waits, without a note, for
    every source byte to be in the block cache), or within timeout."""
    deadline, last_w, quiet = time.monotonic() + timeout, None, time.monotonic()
    while True:
        st, w = m.status(), proc_io(m.proc.pid)[1]
        if not str(st.get("passthrough", "")).startswith("on"):
            return "passthrough " + str(st.get("passthrough"))
        if st.get("materialized_step") == step and not st.get("materializing"):
            return None
        if st.get("materialize_note") and not st.get("materializing"):
            return st["materialize_note"]
        if w != last_w:
            last_w, quiet = w, time.monotonic()
        now = time.monotonic()
        if now > deadline or now - quiet > idle:
            return (f"not materialized: {'no write for %d s' % idle if now <= deadline else 'timed out'} "
                    f"(materializing {st.get('materializing')}, materialized_step {st.get('materialized_step')}, "
                    f"note {st.get('materialize_note')!r})")
        time.sleep(0.05)


def copy_log(m, step):
    """(how, ms) of step's materialized copy from the daemon's log."""
    got = re.search(rf"step {step}: materialized \d+ files \(\d+ bytes\), (written|brought forward in place) in (\d+) ms",
                    m.log())
    return (("in place" if got.group(1).startswith("brought") else "whole"), int(got.group(2))) if got else (None, None)


def timed_cat(files):
    t = time.perf_counter()
    run(["cat", *files], stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def mmap_load(files):
    out = run([PY, os.path.join(ROOT, "tests", "bench", "mmap_load.py"), *files, "--no-folios"],
              capture_output=True, text=True).stdout
    x = json.loads(out.splitlines()[0])
    return x["seconds"], x["checksum"]


def make_tree(dst, gen, upto):
    """A bucket of hard links to the generated one: base, anchor, deltas <= upto."""
    os.makedirs(dst)
    for d in ("base", "anchors"):
        run(["cp", "-al", os.path.join(gen["dir"], d), os.path.join(dst, d)])
    os.makedirs(os.path.join(dst, "deltas"))
    for n in sorted(os.listdir(os.path.join(gen["dir"], "deltas"))):
        if int(n.split("_")[1].split(".")[0]) <= upto:
            os.link(os.path.join(gen["dir"], "deltas", n), os.path.join(dst, "deltas", n))
    return dst


class Hub:
    def __init__(self):
        self.proc = None

    def start(self, root, work):
        ready = os.path.join(work, "hub.ready")
        self.logf = os.path.join(work, "hub.log")
        self.proc = subprocess.Popen([PY, os.path.join(ROOT, "tests", "hubserver.py"), "--root", root, "--ready-file",
                                      ready, "--exit-with-parent", "--max-seconds", "14400"],
                                     stdout=open(self.logf, "w"), stderr=subprocess.STDOUT)
        for _ in range(400):
            if os.path.exists(ready) and os.path.getsize(ready):
                return json.load(open(ready))["endpoint"]
            if self.proc.poll() is not None:
                raise RuntimeError("hubserver exited: " + open(self.logf).read())
            time.sleep(0.05)
        raise RuntimeError("hubserver did not start within 20 s")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


HUB = Hub()


def hub_prehash(ep):
    """The loopback Hub hashes a file on its first listing (a real Hub did at
    upload): one untimed listing first, so that at 32 GB and more the mount's
    own listing does not wait for minutes of hashing (its stall timeout is 10 s)."""
    import urllib.request
    t = time.monotonic()
    with urllib.request.urlopen(f"{ep}/api/buckets/bench/model/tree/?recursive=true", timeout=3600) as r:
        r.read()
    return time.monotonic() - t


def cdn_bandwidth(ep, key):
    url = f"{ep}/buckets/bench/model/resolve/{key}"
    bws = []
    for _ in range(3):
        o = run(["curl", "-sfL", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
                capture_output=True, text=True).stdout.split()
        bws.append(float(o[0]) / float(o[1]))
    return statistics.median(bws[1:])


def sha256_ms(path):
    """What the loopback Hub spends hashing a new file on first sight (a real Hub did at upload)."""
    import hashlib
    t, h = time.perf_counter(), hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return (time.perf_counter() - t) * 1e3


def take_step(m, src, deltas_dir, step, bw, kind, timeout, copies, gen_bytes):
    # untimed: the copy's pages written back first, so that write_bytes counts
    # every page this step dirties (a page still dirty from the step before
    # is not counted again: steps minutes apart find every page clean)
    run(["sync", "-f", deltas_dir])
    st0, io0 = m.status(), proc_io(m.proc.pid)
    hash_ms = sha256_ms(src) if kind == "hf" else 0.0
    t_pub = time.time_ns()
    os.link(src, os.path.join(deltas_dir, os.path.basename(src)))
    st1 = wait_for(lambda: (lambda s: s if s["step"] >= step else None)(m.status()), timeout, f"step {step}", m)
    note = wait_copy(m, step, 120 + gen_bytes / 20e6) if copies else "no copy"
    st2, io1 = m.status(), proc_io(m.proc.pid)
    how, mat_ms = copy_log(m, step)
    delta = os.path.getsize(src)
    r = {"step": step, "delta_bytes": delta, "fetched": st1["bytes_fetched"] - st0["bytes_fetched"],
         "fetched_with_copy": st2["bytes_fetched"] - st0["bytes_fetched"],
         "written": io1[1] - io0[1], "read": io1[0] - io0[0], "build_ms": st1["last_build_ms"],
         "publish_to_root_ms": (st1["root_since_ns"] - t_pub) / 1e6,
         "allowance_ms": POLL * 1000 + (delta / bw * 1000 if bw else 0) + 200, "hub_hash_ms": hash_ms,
         "copy": how, "copy_ms": mat_ms, "note": note,
         "in_place": st2.get("materialized_in_place", 0) - st0.get("materialized_in_place", 0),
         "whole": st2.get("materialized_whole", 0) - st0.get("materialized_whole", 0),
         **{k: st2.get(k) for k in ("patch_bytes", "patched_elements", "whole_tensors", "whole_tensor_bytes")},
         **{k: st2[k] - st0[k] for k in ("api_calls", "resolver_calls", "cdn_requests") if k in st2}}
    log(f"{kind} step {step}: delta {delta:,} B, fetched {r['fetched'] / delta:.2f}x, written {r['written'] / delta:.1f}x, "
        f"read {r['read'] / delta:.1f}x, build {r['build_ms']} ms, publish->root {r['publish_to_root_ms']:.0f} ms, "
        f"copy {how} {mat_ms} ms{'' if note is None else ' (' + note + ')'}")
    return r


def loads(sides, rounds, warm, check):
    """{side: {"cat": [s], "mmap": [s]}}: the files of each side read whole
    (`cat`) and loaded (mmap_load.py), alternating sides each round."""
    if check and len(sides) == 2:  # every byte the same (untimed; warms both)
        a, b = sides.values()
        for x, y in zip(a, b):
            run(["cmp", x, y])
    elif warm:
        for files in sides.values():
            timed_cat(files)
    if warm:  # a first mmap of pages read with read() runs slower than every later one, either side
        for files in sides.values():
            mmap_load(files)
    out, sums = {k: {"cat": [], "mmap": []} for k in sides}, {}
    names = list(sides)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            out[k]["cat"].append(timed_cat(sides[k]))
            s, c = mmap_load(sides[k])
            out[k]["mmap"].append(s)
            sums.setdefault(k, c)
        log("loads round %d: %s" % (r + 1, ", ".join(f"{k} cat {out[k]['cat'][-1]:.2f} s mmap {out[k]['mmap'][-1]:.2f} s"
                                                     for k in names)))
    if len(set(sums.values())) > 1:
        raise RuntimeError(f"mmap_load checksums differ: {sums}")
    return out


def extract_ref(bucket, step, dst):
    """The local copy: `dwsctl extract` of step into dst, seconds. Its pages
    are then dropped from the page cache (written back first), file by file:
    read again they come in by readahead, in large folios, as a model read
    from a local disk does, not in the small ones extract's writes left."""
    t = time.monotonic()
    run([os.path.join(BUILD, "dwsctl"), "extract", bucket, dst, "--step", str(step)], stdout=subprocess.DEVNULL)
    took = time.monotonic() - t
    for n in os.listdir(dst):
        fd = os.open(os.path.join(dst, n), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return took


def phase(kind, gen, work, size_res):
    """One bucket kind at one size: mount, the held steps, RSS, loads."""
    S, last = gen["model_bytes"], gen["last"]
    res = {"kind": kind, "steps": [], "notes": []}
    tmo = 300 + S / 30e6            # generous: a 40 GB copy at this VM's ~1 GB/s takes a minute
    copy_tmo = 120 + S / 20e6       # then the copy is reported missing (not a failure)
    mnt, tmp = os.path.join(work, "mnt"), os.path.join(work, "tmp")
    os.makedirs(tmp, exist_ok=True)
    patch_allow = patch_room(S)
    opts, env = [f"poll={POLL}", "swap_idle=0"], {"TMPDIR": tmp}
    ref = size_res.get("ref_dir")
    final = last + ROUNDS
    if kind == "local":
        bucket = make_tree(os.path.join(work, "lbucket"), gen, last)
        uri, deltas, bw = bucket, os.path.join(bucket, "deltas"), 0.0
        matdir = os.path.join(work, "mat")
        os.makedirs(matdir, exist_ok=True)
        opts.append(f"materialize_dir={matdir}")
        copies = room(work) >= S + GIB + patch_allow
    else:
        bucket = make_tree(os.path.join(work, "hub", "buckets", "bench", "model"), gen, last)
        ep = HUB.start(os.path.join(work, "hub"), work)
        env["HF_ENDPOINT"] = ep
        uri, deltas = "hf://buckets/bench/model", os.path.join(bucket, "deltas")
        res["hub_prehash_s"] = hub_prehash(ep)
        log(f"loopback Hub hashed the bucket's files in {res['hub_prehash_s']:.1f} s (untimed: a real Hub did at upload)")
        bw = cdn_bandwidth(ep, f"deltas/step_{last:06d}.safetensors")
        res["cdn_bw"] = bw
        cache = os.path.join(work, "cache")
        if room(work) >= S * 1.05 + GIB:
            opts += [f"cache_dir={cache}", f"cache_size={int(S * 1.1) + GIB}"]
            copies = room(work) - S * 1.05 >= S + GIB + patch_allow
        else:
            opts += [f"cache_dir={cache}", "cache_size=0"]
            copies = False
            res["notes"].append("block cache off (cache_size=0): the model does not fit on the free disk beside "
                                f"the {RESERVE / GIB:.0f} GiB reserve; served from memory, never materialized")
    if not copies:
        opts.append("materialize_max=0")
        if not res["notes"]:
            res["notes"].append("no materialized copy (materialize_max=0): a copy of the model would not fit on "
                                f"the free disk beside the {RESERVE / GIB:.0f} GiB reserve; loads go through the daemon")
    res["opts"] = opts
    log(f"{kind} {S / 1e9:.1f} GB: mount {uri} -o {','.join(opts)}")
    t = time.monotonic()
    with mountutil.mounted(uri, mnt, *opts, env=env, mount_timeout=tmo, exit_timeout=tmo) as m:
        anon = AnonPeak(m.proc.pid)
        anon.start()
        wait_for(lambda: m.status()["step"] == last, tmo, f"the root at step {last}", m)
        res["mount_s"] = time.monotonic() - t
        shards = [m.path(n) for n in gen["shards"]]
        if kind == "hf":  # the first read fills the block cache: a copy needs every source byte local
            st0, io0 = m.status(), proc_io(m.proc.pid)
            s = timed_cat(sorted(m.path(n) for n in os.listdir(mnt) if n not in ("steps", ".dwsfs")))
            st1, io1 = m.status(), proc_io(m.proc.pid)
            res["cold"] = {"s": s, "fetched": st1["bytes_fetched"] - st0["bytes_fetched"], "written": io1[1] - io0[1],
                           "cdn_requests": st1.get("cdn_requests", 0) - st0.get("cdn_requests", 0),
                           **{k: st1.get(k) for k in ("cache_bytes", "cache_unkept_blocks", "cache_unkept_bytes")}}
            log(f"hf first read: {S / s / 1e6:,.0f} MB/s, fetched {res['cold']['fetched'] / S:.3f}x the model, "
                f"{st1.get('cache_unkept_blocks')} blocks not kept in the block cache")
        io0 = proc_io(m.proc.pid)
        note = wait_copy(m, last, copy_tmo) if copies else "materialize_max=0"
        if note and kind == "hf" and note.startswith("not materialized"):
            # a block the disk could not take at once was served and not kept:
            # the copy waits for it, and the kernel's page cache of the mount
            # answers a second read without the daemon. Dropped (fadvise), a
            # second full read fetches what is missing
            files = sorted(m.path(n) for n in os.listdir(mnt) if n not in ("steps", ".dwsfs"))
            for fn in files:
                fd = os.open(fn, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            st0 = m.status()
            s = timed_cat(files)
            st1 = m.status()
            res["second_read"] = {"s": s, "fetched": st1["bytes_fetched"] - st0["bytes_fetched"], "note": note,
                                  "cache_unkept_blocks": st1.get("cache_unkept_blocks")}
            res["notes"].append(f"no copy after the first full read, {res['cold'].get('cache_unkept_blocks')} blocks "
                                f"of which were not kept in the block cache ({note}); a second full read, the mount's "
                                f"page cache dropped first, fetched {res['second_read']['fetched']:,} B more")
            log(f"hf: {note}; second read fetched {res['second_read']['fetched']:,} B")
            note = wait_copy(m, last, copy_tmo)
        copies = copies and note is None
        how, ms = copy_log(m, last)
        res["first_copy"] = {"how": how, "ms": ms, "written": proc_io(m.proc.pid)[1] - (io0[1] if kind == "hf" else 0),
                             "note": note}
        log(f"{kind} first copy: {how} in {ms} ms{'' if note is None else ' (' + note + ')'}")
        for k in range(ROUNDS):
            step = last + 1 + k
            src = os.path.join(gen["dir"] + ".pending", "deltas", f"step_{step:06d}.safetensors")
            res["steps"].append(take_step(m, src, deltas, step, bw, kind, tmo, copies, S))
        # the local copy of the final step beside the mount, if it fits
        if not ref and room(work) >= S * 1.05:
            ref = os.path.join(work, "ref")
            size_res["ref_extract_s"] = extract_ref(bucket, final, ref)
            size_res["ref_dir"] = ref
            log(f"local copy: dwsctl extract --step {final}: {size_res['ref_extract_s']:.1f} s")
        st0 = m.status()
        warm = 2.2 * S < RAM  # the copy and the local copy both in the page cache
        sides = {"mount": shards}
        if ref:
            sides["local"] = [os.path.join(ref, n) for n in gen["shards"]]
        res["loads"] = loads(sides, load_rounds(S), warm, check=warm)
        if not warm:
            res["notes"].append("loads: the model and its local copy exceed the page cache; the re-read and the "
                                "mmap load read the disk")
        st1 = m.status()
        res["loads_passthrough_opens"] = st1["passthrough_opens"] - st0["passthrough_opens"]
        res["loads_daemon_reads"] = st1["daemon_reads"] - st0["daemon_reads"]
        anon.stop.set()
        anon.join()
        res["vm"] = dict(vm(m.proc.pid), anon_peak=max(anon.peak, vm(m.proc.pid)["RssAnon"]))
        res["status"] = {k: st1.get(k) for k in ("patch_bytes", "patched_elements", "whole_tensor_bytes", "materialize_note",
                                                 "materialized_in_place", "materialized_whole", "passthrough")}
        log(f"{kind} peak RSS {res['vm']['VmHWM'] / 2**20:,.0f} MiB (anonymous {res['vm']['anon_peak'] / 2**20:,.0f} MiB), patch {st1.get('patch_bytes', 0) / 2**20:,.0f} MiB; "
            f"loads: {res['loads_passthrough_opens']} opens passed through, {res['loads_daemon_reads']} daemon reads")
    HUB.stop()
    shutil.rmtree(os.path.join(work, "cache"), ignore_errors=True)
    if not ref:  # one after the other: the mount's copies are gone now
        if size_res.get("ref_loads"):
            res["notes"].append("compared with the local copy as measured in the local-folder phase (it did not fit "
                                "beside this mount's block cache and copy)")
        elif room(work) >= S * 1.05:
            ref = os.path.join(work, "ref")
            size_res["ref_extract_s"] = extract_ref(bucket, final, ref)
            size_res["ref_dir"] = ref
            res["local_sequential"] = loads({"local": [os.path.join(ref, n) for n in gen["shards"]]},
                                            load_rounds(S), 2.2 * S < RAM, False)["local"]
            res["notes"].append("local copy measured after the unmount, not side by side: it did not fit beside the "
                                "mount's copy")
        else:
            res["notes"].append("no local copy: it does not fit on the free disk")
    size_res.setdefault("ref_loads", res["loads"].get("local") or res.get("local_sequential"))
    shutil.rmtree(os.path.join(work, "hub" if kind == "hf" else "lbucket"), ignore_errors=True)
    return res


def patch_room(S):
    """Disk for catch-up patches (unnamed files in TMPDIR): 10 bytes per
    changed element, the mount keeps the last 4."""
    return 5 * CHANGED * S * min(ROUNDS + 1, 4)


def mem_need(S):
    """The daemon's memory to expect (issue #17 item 3, a patch cap, is not
    there yet): measured at 1 GB with 4 deltas of 1%, ~0.1 byte per model byte
    per delta held (patches of the root and of the steps still referenced),
    plus ~128 MiB of buffers."""
    return 128 * 2**20 + 0.1 * S * (1 + ROUNDS) * CHANGED / 0.01


def mem_available():
    return next(int(ln.split()[1]) * 1024 for ln in open("/proc/meminfo") if ln.startswith("MemAvailable"))


def load_rounds(S):
    return int(os.environ.get("LOAD_ROUNDS", "1" if S > RAM / 3 else "3"))


def one_size(gb, work_root):
    work = tempfile.mkdtemp(prefix=f"scale-{gb:g}GB.", dir=work_root)
    size_res = {"size_gb": gb, "notes": [], "phases": {}}
    try:
        t = time.monotonic()
        out = run([PY, os.path.join(ROOT, "tests", "bench", "make_sparse_model.py"), os.path.join(work, "gen"),
                   "--bytes", str(gb * 1e9), "--deltas", str(1 + ROUNDS), "--hold", str(ROUNDS), "--changed",
                   str(CHANGED)], capture_output=True, text=True).stdout
        model = kv(out)
        gen = {"dir": os.path.join(work, "gen"), "model_bytes": int(model["model_bytes"]),
               "last": int(model["last_step"]), "shards": model["base_shards"].split(",")}
        size_res["model"] = model
        log(f"{gb:g} GB: {model['shape']}-shaped, {int(model['params']):,} params, {model['tensors']} tensors in "
            f"{len(gen['shards'])} shards; {int(model['disk_bytes']) / 1e6:,.0f} MB on disk; generated in "
            f"{time.monotonic() - t:.1f} s")
        for kind in KINDS:
            S = gen["model_bytes"]
            if kind == "hf" and size_res.get("ref_dir") and room(work) < 2.1 * S + GIB + patch_room(S):
                # the hf:// mount's block cache and copy come first: a node's state
                shutil.rmtree(size_res.pop("ref_dir"))
                size_res["notes"].append("the local copy was deleted after the local-folder phase to make room for "
                                         "the hf:// block cache and copy")
            if mem_need(S) > mem_available() - 2 * GIB:
                size_res["notes"].append(f"{kind} not run: the daemon would need ~{mem_need(S) / GIB:.1f} GiB of "
                                         f"memory (patches of {1 + ROUNDS} deltas), {mem_available() / GIB:.1f} GiB "
                                         "available")
                log(size_res["notes"][-1])
                continue
            size_res["phases"][kind] = phase(kind, gen, work, size_res)
    finally:
        HUB.stop()
        if KEEP:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    size_res.pop("ref_dir", None)
    return size_res


# ---------------------------------------------------------------- report

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def span(xs, fmt="{:.2f}"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    m = fmt.format(statistics.median(xs))
    return m if len(xs) == 1 else f"{m} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def load_ratio(p, ref, what):
    """local copy's time / the mount's (>= 0.9: the target), per round when side by side."""
    mine = p["loads"]["mount"][what]
    if "local" in p["loads"]:
        return [lo / mo for lo, mo in zip(p["loads"]["local"][what], mine)]
    if ref:
        return [statistics.median(ref[what]) / mo for mo in mine]
    return []


def figures(sz, kind):
    p, S = sz["phases"][kind], int(sz["model"]["model_bytes"])
    st = p["steps"]
    return {"fetched": [x["fetched_with_copy"] / x["delta_bytes"] for x in st],
            "written": [x["written"] / x["delta_bytes"] for x in st],
            "read": [x["read"] / x["delta_bytes"] for x in st],
            "build": [x["build_ms"] for x in st],
            "swap": [x["publish_to_root_ms"] for x in st],
            "swap_ratio": [x["publish_to_root_ms"] / x["allowance_ms"] for x in st],
            "copy_ms": [x["copy_ms"] for x in st],
            "rss": p["vm"]["VmHWM"], "anon": p["vm"].get("anon_peak", 0), "patch": p["status"].get("patch_bytes") or 0,
            "mmap": load_ratio(p, sz.get("ref_loads"), "mmap"), "cat": load_ratio(p, sz.get("ref_loads"), "cat"),
            "model": S}


def report(data):
    sizes = data["sizes"]
    L = ["# Scale benchmark" + (" (SMOKE configuration)" if data["config"]["smoke"] else ""), "",
         f"Produced by `{data['config']['command']}` in {data['seconds'] / 60:.1f} min "
         f"({data['config']['rounds']} step(s) per bucket, median (min–max) over them; loads: the mount vs a dense "
         "local copy of the same bytes, alternating). Targets from issue #17: written <= 3x the delta, loads >= 0.9x "
         "a local copy, publish -> root <= poll + transfer + 200 ms.", "",
         "| model | bucket | fetched / delta | written / delta | read / delta | build ms | publish -> root ms "
         "(/ allowance) | copy per step | peak RSS: VmHWM / anonymous (patch_bytes) | mmap load vs local | re-read vs local |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for sz in sizes:
        m = sz["model"]
        for kind in sz["phases"]:
            f, p = figures(sz, kind), sz["phases"][kind]
            hows = sorted({x["copy"] or "none" for x in p["steps"]})
            L.append(f"| {f['model'] / 1e9:.2f} GB ({m['shape']}, {int(m['tensors'])} tensors) | {kind} | "
                     f"{span(f['fetched'])} | {span(f['written'], '{:.1f}')} | {span(f['read'], '{:.1f}')} | "
                     f"{span(f['build'], '{:.0f}')} | {span(f['swap'], '{:.0f}')} ({span(f['swap_ratio'])}) | "
                     f"{'/'.join(hows)}, {span(f['copy_ms'], '{:.0f}')} ms | {f['rss'] / 2**20:,.0f} / "
                     f"{f['anon'] / 2**20:,.0f} MiB ({f['patch'] / 2**20:,.0f} MiB) | {span(f['mmap'])} | {span(f['cat'])} |")
    L += ["", "## First copy, first read, local copy", "",
          "| model | bucket | first copy: how, ms, written | hf:// first read (fills the cache) | "
          "local copy: `dwsctl extract` s | mount took s |", "|---|---|---|---|---|---|"]
    for sz in sizes:
        S = int(sz["model"]["model_bytes"])
        for kind, p in sz["phases"].items():
            fc = p["first_copy"]
            cold = p.get("cold")
            coldt = (f"{S / cold['s'] / 1e6:,.0f} MB/s, fetched {cold['fetched'] / S:.3f}x the model"
                     if cold else "—")
            copy = (f"{fc['how']}, {fc['ms']} ms, {fc['written'] / S:.2f}x the model" if fc["how"]
                    else (fc["note"] or "none"))
            L.append(f"| {S / 1e9:.2f} GB | {kind} | {copy} | {coldt} | "
                     f"{sz.get('ref_extract_s', 0):.1f} | {p['mount_s']:.1f} |")
    L += ["", "## Every step", "", "| model | bucket | step | delta B | fetched | written | read | build ms | "
          "publish -> root ms | allowance ms | Hub hashing ms | copy | copy ms | patch MiB | API / resolver / CDN "
          "requests | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for sz in sizes:
        S = int(sz["model"]["model_bytes"])
        for kind, p in sz["phases"].items():
            for x in p["steps"]:
                L.append(f"| {S / 1e9:.2f} GB | {kind} | {x['step']} | {x['delta_bytes']:,} | {x['fetched_with_copy']:,} | "
                         f"{x['written']:,} | {x['read']:,} | {x['build_ms']} | {x['publish_to_root_ms']:.0f} | "
                         f"{x['allowance_ms']:.0f} | {x['hub_hash_ms']:.0f} | {x['copy'] or '—'} | {x['copy_ms'] or '—'} | "
                         f"{(x['patch_bytes'] or 0) / 2**20:,.0f} | "
                         f"{x.get('api_calls', '—')} / {x.get('resolver_calls', '—')} / {x.get('cdn_requests', '—')} | "
                         f"{x['note'] or ''} |")
    L += ["", "## Loads, seconds per round", "", "| model | bucket | mount cat | mount mmap | local cat | local mmap | "
          "passed through / daemon reads |", "|---|---|---|---|---|---|---|"]
    for sz in sizes:
        S = int(sz["model"]["model_bytes"])
        for kind, p in sz["phases"].items():
            lo = p["loads"].get("local") or p.get("local_sequential") or {"cat": [], "mmap": []}
            fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs) or "—"
            L.append(f"| {S / 1e9:.2f} GB | {kind} | {fmt(p['loads']['mount']['cat'])} | {fmt(p['loads']['mount']['mmap'])} | "
                     f"{fmt(lo['cat'])} | {fmt(lo['mmap'])} | {p['loads_passthrough_opens']} / {p['loads_daemon_reads']} |")
    notes = [(sz, kind, n) for sz in sizes for kind, p in sz["phases"].items() for n in p["notes"]]
    notes += [(sz, "", n) for sz in sizes for n in sz["notes"]]
    if notes:
        L += ["", "## Notes: what did not fit or was not measured", ""]
        L += [f"- {int(sz['model']['model_bytes']) / 1e9:.2f} GB {kind}: {n}" for sz, kind, n in notes]
    c, mc = data["config"], data["machine"]
    L += ["", "## Configuration", "",
          f"- models: `tests/bench/make_sparse_model.py --bytes SIZE --deltas {c['rounds'] + 1} --hold {c['rounds']} "
          f"--changed {c['changed']}`: Qwen3-family shapes, shards of at most 4 GB, base and anchor sparse; "
          f"{c['changed'] * 100:g}% of every tensor's elements per delta, spread (gap_delta, 2 + 2 bytes per element)",
          f"- mounts: `-o poll={POLL},swap_idle=0`; local: `materialize_dir` under the work folder; hf://: "
          "`tests/hubserver.py` (its own CDN on 127.0.0.2), `cache_dir` and `cache_size` sized to the model; the "
          "allowance is poll + delta / the CDN's bandwidth for the delta (curl) + 200 ms (local: no transfer). The "
          "loopback Hub hashes a new delta on first sight (its own column: a real Hub did at upload)",
          "- fetched / delta: status bytes_fetched from the publication until the step's copy is made (a local "
          "bucket counts every read of a bucket file, the delta's included); written / read: the daemon's "
          "/proc/PID/io across the step, after a `sync` (a page dirtied again before its writeback is counted once): "
          "the copy's pages and the catch-up patch (10 bytes per changed element: 2.5x a gap_delta delta's 4), and "
          "for hf:// the delta in the block cache",
          "- peak RSS: VmHWM counts the copy's file pages the in-place patch maps (page cache, reclaimable); "
          "anonymous = the peak of RssAnon sampled every 50 ms: the daemon's own memory",
          "- loads: `cat` of the root's shards and `tests/bench/mmap_load.py --no-folios` (mmap, header, a byte per "
          "4 KiB page of every tensor) on the mount after the last step vs the same on `dwsctl extract --step LAST`, "
          "both warmed first (`cat`, `cmp` of every byte, one untimed mmap load) when both fit in the page cache "
          "(2.2x the model < RAM; beyond, mmap_load's checksum, a byte per page, is compared); ratio = local s / "
          "mount s; the local copy's pages are dropped after extract (fadvise), so they come back by readahead",
          f"- reserve kept free on the disk: {c['reserve_gb']:g} GiB", "",
          "## Machine", "",
          f"- nproc {mc['nproc']}; CPU {mc['cpu']}; RAM {mc['ram'] / GIB:.1f} GiB; kernel {mc['kernel']}; "
          f"disk free at the start {mc['disk_free'] / 1e9:.0f} GB",
          f"- source: `{mc['git']}`; the machine is shared: other sessions may run at the same time", ""]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(L))
    print("\n".join(L[:6 + sum(len(sz["phases"]) for sz in sizes)]))
    log(f"wrote {OUT}")
    plot(sizes, os.path.splitext(OUT)[0] + ".png", data["config"]["smoke"])


def plot(sizes, png, smoke):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (apt-get install python3-matplotlib): no chart")
        return
    panels = [("fetched", "bytes fetched / delta bytes", None), ("written", "bytes the daemon wrote / delta bytes", 3),
              ("build", "build ms (last_build_ms)", None), ("swap_ratio", "publish -> root / (poll + transfer + 200 ms)", 1),
              ("anon", "peak anonymous RSS, MiB (dashed: patch_bytes)", None), ("mmap", "warm mmap load vs local copy (speed)", 0.9),
              ("cat", "full re-read vs local copy (speed)", 0.9), ("copy_ms", "materialized copy per step, ms", None)]
    fig, axes = plt.subplots(2, 4, figsize=(17, 8))
    for ax, (key, title, target) in zip(axes.flat, panels):
        for kind, color in (("local", "tab:blue"), ("hf", "tab:orange")):
            xs, ys, lo, hi, patch = [], [], [], [], []
            for sz in sizes:
                if kind not in sz["phases"]:
                    continue
                f = figures(sz, kind)
                v = f[key] if isinstance(f[key], list) else [f[key]]
                v = [x / 2**20 if key == "anon" else x for x in v if x is not None]
                if not v:
                    continue
                xs.append(f["model"] / 1e9)
                ys.append(statistics.median(v))
                lo.append(ys[-1] - min(v))
                hi.append(max(v) - ys[-1])
                patch.append(f["patch"] / 2**20)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=color, label=kind)
                if key == "anon":
                    ax.plot(xs, patch, linestyle="--", marker="x", color=color)
        if target:
            ax.axhline(target, color="black", linestyle=":", linewidth=1, label=f"target {target}")
        ax.set_xscale("log")
        ax.set_xlabel("model size, GB")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("dwsfs scale benchmark" + (" (SMOKE)" if smoke else "") + ": per step and per size")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    log(f"wrote {png}")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        with open(sys.argv[2]) as f:
            report(json.load(f))
        return 0
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        log("no /dev/fuse or fusermount3: dwsfs cannot mount here")
        return 1
    if not os.path.exists(os.path.join(BUILD, "build.ninja")):
        run(["meson", "setup", BUILD], stdout=sys.stderr)
    run(["ninja", "-C", BUILD, "dwsfs", "dwsctl"], stdout=sys.stderr)
    work_root = os.path.join(ROOT, "bench-results", "tmp")
    os.makedirs(work_root, exist_ok=True)
    sv = os.statvfs(work_root)
    git = run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    data = {"config": {"smoke": SMOKE, "sizes": SIZES, "rounds": ROUNDS, "kinds": KINDS, "changed": CHANGED,
                       "reserve_gb": RESERVE / GIB, "poll": POLL,
                       "command": ("SMOKE=1 " if SMOKE else "") + (f"SIZES={','.join(f'{s:g}' for s in SIZES)} "
                                                                   if "SIZES" in os.environ else "")
                       + "tests/bench/run_scale_bench.py"},
            "machine": {"nproc": os.cpu_count(), "cpu": cpu, "ram": RAM, "kernel": platform.release(),
                        "disk_free": sv.f_bavail * sv.f_frsize, "git": git}, "sizes": []}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    for gb in SIZES:
        data["sizes"].append(one_size(gb, work_root))
        data["seconds"] = time.monotonic() - T0
        with open(os.path.splitext(OUT)[0] + ".json", "w") as f:  # after each size: a long run keeps what it did
            json.dump(data, f, indent=1)
    report(data)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
