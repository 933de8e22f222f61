"""-o metrics_addr=HOST:PORT: the Prometheus text format at /metrics
(docs/metrics.md), bound to that address only, its numbers the status's
(dwsfs_step is the status step, before and after a swap), counters that only
grow, HELP and TYPE for every family, every metric documented; a bad address
refused before anything is opened."""
import mmap
import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mountutil import SLOW, mounted, read_status
from test_http import Mount, big_anchor_bucket, hf_env, read_all
from test_mount import publish
from test_options import NOWHERE, run_dwsfs

REPO = Path(__file__).resolve().parent.parent
LIVE = ("poll=1", "swap_idle=0.1")
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+-?\d+)?$')
LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(text):
    """The text format 0.0.4: (samples {(name, ((label, value), ...)): float},
    types {family: type}, helps {family: text}). Raises on a malformed line."""
    samples, types, helps = {}, {}, {}
    for ln in text.splitlines():
        if not ln.strip():
            continue
        if ln.startswith("#"):
            parts = ln.split(None, 3)
            if len(parts) >= 3 and parts[1] == "HELP":
                assert parts[2] not in helps, f"two HELP lines for {parts[2]}"
                helps[parts[2]] = parts[3] if len(parts) > 3 else ""
            elif len(parts) >= 3 and parts[1] == "TYPE":
                assert parts[2] not in types, f"two TYPE lines for {parts[2]}"
                assert parts[3] in ("counter", "gauge", "histogram", "summary", "untyped"), ln
                types[parts[2]] = parts[3]
            continue
        m = SAMPLE.match(ln)
        assert m, f"not a sample line: {ln!r}"
        labels, rest = [], m.group(3) or ""
        while rest:
            lm = LABEL.match(rest)
            assert lm, f"bad labels in {ln!r}"
            labels.append((lm.group(1), lm.group(2)))
            rest = rest[lm.end():]
        key = (m.group(1), tuple(sorted(labels)))
        assert key not in samples, f"sample twice: {ln!r}"
        samples[key] = float(m.group(4))
    return samples, types, helps


def family(name, types):
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and types.get(name[:-len(suffix)]) == "histogram":
            return name[:-len(suffix)]
    return name


def check_format(samples, types, helps):
    """HELP and TYPE for every family, counters named _total, histograms
    with cumulative buckets ending in +Inf equal to _count."""
    for name, _ in samples:
        f = family(name, types)
        assert f in types and f in helps, f"{name}: no TYPE or HELP line"
        assert f.startswith("dwsfs_"), f
        if types[f] == "counter":
            assert f.endswith("_total"), f"counter {f} does not end in _total"
    for f, t in types.items():
        if t != "histogram":
            continue
        buckets = sorted((float(dict(lb)["le"]), v) for (n, lb), v in samples.items() if n == f + "_bucket")
        assert buckets and buckets[-1][0] == float("inf"), (f, buckets)
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{f}: buckets not cumulative: {buckets}"
        assert buckets[-1][1] == samples[(f + "_count", ())], f
        assert (f + "_sum", ()) in samples, f


def scrape(port, host="127.0.0.1", path="/metrics"):
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10 * SLOW) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4"), r.headers["Content-Type"]
        text = r.read().decode()
    samples, types, helps = parse(text)
    check_format(samples, types, helps)
    return samples, types


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def counters(samples, types):
    """Every sample of a counter family and every histogram count."""
    return {k: v for k, v in samples.items()
            if types.get(family(k[0], types)) in ("counter", "histogram") and not k[0].endswith("_sum")}


def documented():
    """{metric: type} from docs/metrics.md's tables."""
    md = (REPO / "docs" / "metrics.md").read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r"^\|\s*`(dwsfs_\w+)`\s*\|\s*(\w+)\s*\|", md, flags=re.M)}


def test_metrics_follow_the_status_and_only_grow(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    expected, s = root / "expected", info["steps"]
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, expected / str(s[0]), bucket, s[0], "anchor")
    port = free_port()
    with mounted(bucket, tmp_path / "mnt", *LIVE, f"metrics_addr=127.0.0.1:{port}", "on_swap=true") as m:
        before, types = scrape(port)
        st = read_status(m.mnt)
        assert value(before, "dwsfs_step") == st["step"] == s[0]
        assert value(before, "dwsfs_latest_step") == st["latest_step"]
        assert value(before, "dwsfs_lag_steps") == st["lag_steps"] == 0
        assert value(before, "dwsfs_swaps_total") == st["swaps"] == 0
        assert value(before, "dwsfs_build_seconds_count") >= 1       # the first root
        assert 0 < value(before, "dwsfs_bytes_fetched_total") <= st["bytes_fetched"]
        for prev, cur in zip(s, s[1:3]):
            publish(dwsctl, expected / str(prev), expected / str(cur), bucket, cur)
            m.wait_step(cur, 10 * SLOW)
            after, types = scrape(port)
            st = read_status(m.mnt)
            assert value(after, "dwsfs_step") == st["step"] == cur
            assert value(after, "dwsfs_latest_step") == cur and value(after, "dwsfs_lag_steps") == 0
            assert value(after, "dwsfs_swaps_total") == st["swaps"] >= value(before, "dwsfs_swaps_total") + 1
            assert value(after, "dwsfs_build_seconds_count") > value(before, "dwsfs_build_seconds_count")
            assert value(after, "dwsfs_build_seconds_sum") > 0
            grown = counters(before, types)
            for k, v in grown.items():
                assert k in after and after[k] >= v, f"{k} went from {v} to {after.get(k)}"
            before = after
        # every family emitted (the hook's too) is documented, with its type
        docs = documented()
        emitted = {family(n, types) for n, _ in after}
        assert emitted - set(docs) == set(), f"not in docs/metrics.md: {sorted(emitted - set(docs))}"
        for f in emitted:
            assert docs[f] == types[f], f"{f}: {types[f]} here, {docs[f]} in docs/metrics.md"
        assert "dwsfs_on_swap_runs_total" in emitted
        with pytest.raises(urllib.error.HTTPError) as e:
            scrape(port, path="/")
        assert e.value.code == 404


def test_every_metric_in_the_code_is_documented():
    src = (REPO / "fs" / "metrics.c").read_text()
    names = set(re.findall(r'"(dwsfs_[a-z0-9_]+)"', src))
    assert len(names) >= 15, names
    missing = sorted(names - set(documented()))
    assert not missing, f"emitted by fs/metrics.c, not in docs/metrics.md: {missing}"


def listeners(port):
    """Local addresses (hex, as /proc/net/tcp* has them) listening on port."""
    out = []
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(f):
            continue
        for ln in open(f).read().splitlines()[1:]:
            local, state = ln.split()[1], ln.split()[3]
            addr, p = local.split(":")
            if int(p, 16) == port and state == "0A":
                out.append(addr)
    return out


def test_bound_to_that_address_only(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, root / "expected" / str(info["steps"][0]), bucket, info["steps"][0], "anchor")
    port = free_port()
    with mounted(bucket, tmp_path / "mnt", f"metrics_addr=127.0.0.1:{port}"):
        scrape(port)
        assert listeners(port) == ["0100007F"], listeners(port)
        # 127.0.0.2 is this machine too (127/8 is loopback): nothing listens there
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", port), timeout=5).close()
    assert listeners(port) == []


def test_no_metrics_by_default(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, root / "expected" / str(info["steps"][0]), bucket, info["steps"][0], "anchor")
    with mounted(bucket, tmp_path / "mnt") as m:
        pid = m.proc.pid
        socks = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        inodes = {s[8:-1] for s in socks if s.startswith("socket:[")}
        for f in ("/proc/net/tcp", "/proc/net/tcp6"):
            for ln in open(f).read().splitlines()[1:]:
                assert ln.split()[9] not in inodes or ln.split()[3] != "0A", f"dwsfs listens: {ln}"


@pytest.mark.parametrize("addr", ["127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:9x",
                                  "1.2.3:9100", "nohost.invalid:9100", "[::1]9100", "::1:9100", ":9100"])
def test_bad_metrics_addr_refused_up_front(tmp_path, addr):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p, took = run_dwsfs("hf://buckets/acme/run", mnt, f"metrics_addr={addr}", env=NOWHERE)
    lines = p.stderr.splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert "metrics_addr" in lines[0] and "HOST:PORT" in lines[0], lines[0]
    assert took < 1.0 * SLOW, took
    assert not os.path.ismount(mnt)


def test_metrics_addr_in_use_refused_up_front(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p, took = run_dwsfs("hf://buckets/acme/run", mnt, f"metrics_addr=127.0.0.1:{port}", env=NOWHERE)
    lines = p.stderr.splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert f"metrics_addr 127.0.0.1:{port}" in lines[0] and "in use" in lines[0], lines[0]
    assert took < 1.0 * SLOW, took


def test_remote_requests_retries_and_cache(hub, tmp_path):
    """A Hub bucket: requests by class, the block cache's misses and hits,
    and two 503s counted as retries (the read still exact)."""
    h, root = hub
    dst = root / "buckets" / "test" / "big"
    big_anchor_bucket(dst, tensors=2, mib=1)
    want = read_all(dst / "anchors" / "step_000001.safetensors")
    port = free_port()
    env = hf_env(h, tmp_path / "cache")
    with Mount("hf://buckets/test/big", tmp_path / "mnt", ["poll=60", "block_size=65536",
                                                           f"metrics_addr=127.0.0.1:{port}"], env=env) as m:
        before, types = scrape(port)
        assert value(before, "dwsfs_http_requests_total", **{"class": "api"}) > 0
        h.set_faults({"class": "cdn", "kind": "status", "status": 503, "count": 2})
        f = m.mnt / "model.safetensors"
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)
            off = 20 * 65536
            assert os.preadv(fd, [buf], off) == 4096 and bytes(buf) == want[off:off + 4096]
            assert os.preadv(fd, [buf], off) == 4096   # the same block: from the cache
        finally:
            os.close(fd)
        after, _ = scrape(port)
        assert h.stats()["faults_fired"] == 2
        assert value(after, "dwsfs_http_retries_total", reason="status") - \
            value(before, "dwsfs_http_retries_total", reason="status") == 2
        assert value(after, "dwsfs_http_requests_total", **{"class": "cdn"}) > \
            value(before, "dwsfs_http_requests_total", **{"class": "cdn"})
        assert value(after, "dwsfs_cache_misses_total") > value(before, "dwsfs_cache_misses_total")
        assert value(after, "dwsfs_cache_hits_total") <= m.status()["cache_hits"]
