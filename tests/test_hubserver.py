"""Self-test of the loopback Hub (tests/hubserver.py): every endpoint, pagination,
the prefix quirk, redirects and ranges, auth, each fault kind, and the stats."""
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

import hubserver

UA = "dwsfs-test/1"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
Q = lambda p: urllib.parse.quote(p, safe="/")


def call(url, method="GET", headers=None, body=None, timeout=5):
    """One request on a fresh connection, no redirect following: (status, headers, body)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        h = {"User-Agent": UA}
        h.update(headers or {})
        conn.request(method, u.path + ("?" + u.query if u.query else ""), body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        conn.close()


def jget(url, **kw):
    status, headers, body = call(url, **kw)
    return status, headers, (json.loads(body) if body else None)


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sha(data):
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "hub"
    b = r / "buckets" / "user" / "run"
    write(b / "anchors" / "step_000001.safetensors", b"A" * 100)
    for i in range(2, 6):
        write(b / "deltas" / f"step_{i:06d}.safetensors", bytes([i]) * (10 + i))
    write(b / "a" / "x" / "g", b"under a/x")
    write(b / "a" / "x#1" / "f", b"quirk")
    write(b / "a" / "xy", b"also quirk")
    write(b / "a" / "b", b"not under a/x")
    write(b / "we#ird ?%" / "sp ace.bin", b"0123456789")
    write(r / "models" / "org" / "base" / "main" / "config.json", b'{"a": 1}')
    write(r / "models" / "org" / "base" / "main" / "sub" / "w.safetensors", b"W" * 50)
    return r


@pytest.fixture
def hub(root):
    h = hubserver.Hub(root, page_size=4).start()
    yield h
    h.stop()


def bucket(hub, rest=""):
    return f"{hub.endpoint}/api/buckets/user/run{rest}"


def tree_all(first_url, **kw):
    """Follow Link rel=next; return (entries, number of pages)."""
    url, out, pages = first_url, [], 0
    for _ in range(100):
        status, headers, body = jget(url, **kw)
        assert status == 200, body
        out += body
        pages += 1
        link = headers.get("link")
        if not link:
            return out, pages
        m = re.fullmatch(r'<([^>]+)>; rel="next"', link)
        assert m, link
        url = m.group(1)
    raise AssertionError("pagination does not end")


# ---- API endpoints -----------------------------------------------------------

def test_bucket_info_and_updated_at(hub, root):
    status, headers, info = jget(bucket(hub))
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert info["id"] == "user/run"
    assert info["totalFiles"] == 10
    assert info["size"] == 100 + sum(10 + i for i in range(2, 6)) + 9 + 5 + 10 + 13 + 10
    assert ISO_MS.match(info["createdAt"]) and ISO_MS.match(info["updatedAt"])
    seen = {info["updatedAt"]}
    b = root / "buckets" / "user" / "run"
    steps = [lambda: write(b / "deltas" / "step_000006.safetensors", b"new"),
             lambda: write(b / "deltas" / "step_000006.safetensors", b"NEW"),
             lambda: (b / "deltas" / "step_000006.safetensors").unlink()]
    for change in steps:
        change()
        info2 = jget(bucket(hub))[2]
        assert info2["updatedAt"] not in seen, "updatedAt must change on every mutation"
        seen.add(info2["updatedAt"])
    assert info2["totalFiles"] == 10
    assert jget(bucket(hub))[2]["updatedAt"] == info2["updatedAt"], "stable without changes"
    status, headers, _ = jget(f"{hub.endpoint}/api/buckets/user/nope")
    assert status == 404 and headers["x-error-code"] == "RepoNotFound"


def test_tree_entries(hub, root):
    entries, pages = tree_all(bucket(hub, "/tree/deltas?recursive=true"))
    assert pages == 1
    assert [e["path"] for e in entries] == [f"deltas/step_{i:06d}.safetensors" for i in range(2, 6)]
    for e in entries:
        data = (root / "buckets" / "user" / "run" / e["path"]).read_bytes()
        assert e["type"] == "file" and e["size"] == len(data) and e["xetHash"] == sha(data)
        assert ISO_MS.match(e["mtime"]) and ISO_MS.match(e["uploadedAt"])
    # non-recursive root: folders and files, sorted
    entries, _ = tree_all(bucket(hub, "/tree/?recursive=false"))
    assert [(e["type"], e["path"]) for e in entries] == [
        ("directory", "a"), ("directory", "anchors"), ("directory", "deltas"), ("directory", "we#ird ?%")]
    assert all(ISO_MS.match(e["uploadedAt"]) for e in entries)
    # both /tree and /tree/ list everything; files are live
    write(root / "buckets" / "user" / "run" / "deltas" / "step_000007.safetensors", b"7")
    a, _ = tree_all(bucket(hub, "/tree?recursive=true"))
    b, _ = tree_all(bucket(hub, "/tree/?recursive=true"))
    assert a == b and len(a) == 11 and [e["path"] for e in a] == sorted(e["path"] for e in a)
    # recursive= is mandatory; bad values are refused
    assert call(bucket(hub, "/tree/deltas"))[0] == 400
    assert call(bucket(hub, "/tree/deltas?recursive=maybe"))[0] == 400
    assert call(bucket(hub, "/tree/deltas?recursive=true&limit=0"))[0] == 400
    assert call(bucket(hub, "/tree/deltas?recursive=true"), method="POST")[0] == 405
    status, _, body = jget(bucket(hub, "/tree/nothing-here?recursive=true"))
    assert status == 200 and body == []


def test_pagination(hub):
    full, pages = tree_all(bucket(hub, "/tree?recursive=true"))
    assert len(full) == 10 and pages == 3          # page size 4
    status, headers, body = jget(bucket(hub, "/tree?recursive=true&limit=2"))
    assert len(body) == 2
    link = re.fullmatch(r'<([^>]+)>; rel="next"', headers["link"]).group(1)
    assert link.startswith(hub.endpoint + "/api/buckets/user/run/tree?") and "cursor=" in link
    assert "limit=2" in link and "recursive=true" in link
    by2, pages = tree_all(bucket(hub, "/tree?recursive=true&limit=2"))
    assert by2 == full and pages == 5
    big, pages = tree_all(bucket(hub, "/tree?recursive=true&limit=1000"))
    assert big == full and pages == 3               # capped by --page-size
    assert call(bucket(hub, "/tree?recursive=true&cursor=%%%"))[0] == 400


def test_prefix_quirk(hub):
    rec, _ = tree_all(bucket(hub, "/tree/a/x?recursive=true"))
    assert [e["path"] for e in rec] == ["a/x#1/f", "a/x/g", "a/xy"]
    flat, _ = tree_all(bucket(hub, "/tree/a/x?recursive=false"))
    assert [(e["type"], e["path"]) for e in flat] == [
        ("directory", "a/x#1"), ("file", "a/x/g"), ("file", "a/xy")]
    enc, _ = tree_all(bucket(hub, "/tree/" + urllib.parse.quote("a/x", safe="") + "?recursive=true"))
    assert enc == rec
    # with a trailing slash the prefix is the same folder
    assert tree_all(bucket(hub, "/tree/a/x/?recursive=true"))[0] == rec


def test_paths_info(hub):
    body = json.dumps({"paths": ["a/b", "missing", "deltas/step_000002.safetensors", "we#ird ?%/sp ace.bin",
                                 "anchors"]}).encode()
    status, _, out = jget(bucket(hub, "/paths-info"), method="POST", body=body,
                          headers={"Content-Type": "application/json"})
    assert status == 200
    assert [(e["type"], e["path"]) for e in out] == [
        ("file", "a/b"), ("file", "deltas/step_000002.safetensors"), ("file", "we#ird ?%/sp ace.bin"),
        ("directory", "anchors")]
    assert out[0]["xetHash"] == sha(b"not under a/x") and out[0]["size"] == 13
    too_many = json.dumps({"paths": [f"p{i}" for i in range(1001)]}).encode()
    assert call(bucket(hub, "/paths-info"), method="POST", body=too_many)[0] == 400
    ok = json.dumps({"paths": [f"p{i}" for i in range(1000)]}).encode()
    assert jget(bucket(hub, "/paths-info"), method="POST", body=ok)[:3:2] == (200, [])
    assert call(bucket(hub, "/paths-info"), method="POST", body=b'{"paths": ["../x"]}')[0] == 400
    assert call(bucket(hub, "/paths-info"), method="POST", body=b'{"paths": ["/etc/passwd"]}')[0] == 400
    assert call(bucket(hub, "/paths-info"), method="POST", body=b"nope")[0] == 400


# ---- resolver and CDN ----------------------------------------------------------

def test_head_resolve(hub):
    url = f"{hub.endpoint}/buckets/user/run/resolve/deltas/step_000003.safetensors"
    status, h, body = call(url, method="HEAD")
    data = bytes([3]) * 13
    assert status == 302 and body == b""
    assert h["x-xet-hash"] == sha(data) and h["x-linked-size"] == "13" and h["content-length"] == "13"
    assert h["etag"] == h["x-linked-etag"] == f'"{sha(data)}"'
    assert h["location"].startswith(hub.cdn + "/blob/")
    status, h, _ = call(f"{hub.endpoint}/buckets/user/run/resolve/deltas/missing", method="HEAD")
    assert status == 404 and h["x-error-code"] == "EntryNotFound"
    status, h, _ = call(f"{hub.endpoint}/buckets/user/nope/resolve/x", method="HEAD")
    assert status == 404 and h["x-error-code"] == "RepoNotFound"
    status, h, _ = call(f"{hub.endpoint}/buckets/user/run/resolve/deltas", method="HEAD")
    assert status == 404 and h["x-error-code"] == "EntryNotFound"


def test_resolve_redirect_and_ranges(hub):
    data = b"A" * 100
    status, h, body = call(f"{hub.endpoint}/buckets/user/run/resolve/anchors/step_000001.safetensors")
    assert status == 302 and int(h["content-length"]) == len(body) > 0
    loc = h["location"]
    assert loc.startswith(hub.cdn + "/blob/") and h["x-xet-hash"] in loc
    st, h2, got = call(loc)
    assert st == 200 and got == data and h2["content-length"] == "100"
    cases = {"bytes=10-19": (206, 10, 19), "bytes=90-": (206, 90, 99), "bytes=-5": (206, 95, 99),
             "bytes=95-200": (206, 95, 99), "bytes=-500": (206, 0, 99), "bytes=0-0": (206, 0, 0)}
    for rng, (want, a, b) in cases.items():
        st, h2, got = call(loc, headers={"Range": rng})
        assert st == want and got == data[a:b + 1], rng
        assert h2["content-range"] == f"bytes {a}-{b}/100"
    for rng in ("bytes=100-", "bytes=150-160", "bytes=-0"):
        st, h2, _ = call(loc, headers={"Range": rng})
        assert st == 416 and h2["content-range"] == "bytes */100", rng
    assert call(loc, headers={"Range": "bytes=5-2"})[0] == 400
    assert call(loc, headers={"Range": "bytes=0-1,5-6"})[0] == 400
    # HEAD on the CDN, a forged signature, a path outside the signed one
    st, h2, got = call(loc, method="HEAD")
    assert st == 200 and got == b"" and h2["content-length"] == "100"
    assert call(re.sub(r"sig=[0-9a-f]+", "sig=" + "0" * 32, loc))[0] == 403
    assert call(loc.replace("step_000001", "step_000002"))[0] == 403
    rs = hub.stats()["ranges"]
    assert ["buckets/user/run/anchors/step_000001.safetensors", 10, 19] in rs
    assert ["buckets/user/run/anchors/step_000001.safetensors", 0, 99] in rs


def test_changed_object_gets_new_url(hub, root):
    f = root / "buckets" / "user" / "run" / "deltas" / "step_000004.safetensors"
    url = f"{hub.endpoint}/buckets/user/run/resolve/deltas/step_000004.safetensors"
    old = call(url)[1]["location"]
    assert call(old)[2] == bytes([4]) * 14
    f.write_bytes(b"rewritten!!!!!")                 # same size, new content
    new = call(url)[1]["location"]
    assert new != old and call(new)[2] == b"rewritten!!!!!"
    assert call(old)[0] == 410
    f.unlink()
    assert call(new)[0] == 404
    assert call(url)[0] == 404


def test_conditional_requests(hub, root):
    """If-Match: 412 unless it names the current ETag (or is '*'); If-Range:
    the range only while it names the current content, else the whole object."""
    f = root / "buckets" / "user" / "run" / "deltas" / "step_000005.safetensors"
    loc = call(f"{hub.endpoint}/buckets/user/run/resolve/deltas/step_000005.safetensors")[1]["location"]
    etag = f'"{sha(bytes([5]) * 15)}"'
    st, h, got = call(loc, headers={"Range": "bytes=2-4", "If-Match": etag})
    assert st == 206 and got == bytes([5]) * 3 and h["etag"] == etag
    assert call(loc, headers={"Range": "bytes=2-4", "If-Match": f'"x", {etag}'})[0] == 206
    assert call(loc, headers={"Range": "bytes=2-4", "If-Match": "*"})[0] == 206
    st, h, _ = call(loc, headers={"Range": "bytes=2-4", "If-Match": '"' + "0" * 64 + '"'})
    assert st == 412 and h["x-error-code"] == "PreconditionFailed" and h["etag"] == etag
    assert call(loc, headers={"Range": "bytes=2-4", "If-Match": "W/" + etag})[0] == 412  # strong comparison
    assert call(loc, headers={"Range": "bytes=2-4", "If-Range": etag})[:3:2] == (206, bytes([5]) * 3)
    st, h, got = call(loc, headers={"Range": "bytes=2-4", "If-Range": '"other"'})
    assert st == 200 and got == bytes([5]) * 15 and "content-range" not in h
    # the signed URL of the old content: 410 by default, the new bytes by path
    f.write_bytes(b"N" * 15)
    assert call(loc, headers={"Range": "bytes=2-4"})[0] == 410
    hub.cdn_by_path = True
    try:
        st, h, got = call(loc, headers={"Range": "bytes=2-4"})
        assert st == 206 and got == b"NNN" and h["etag"] == f'"{sha(b"N" * 15)}"'
        assert h["content-range"] == "bytes 2-4/15"
        assert call(loc, headers={"Range": "bytes=2-4", "If-Match": etag})[0] == 412
        assert call(loc, headers={"Range": "bytes=2-4", "If-Range": etag})[:3:2] == (200, b"N" * 15)
    finally:
        hub.cdn_by_path = False


def test_model_resolve_direct(hub, root):
    """resolve_direct: a model repo's resolver answers with the bytes (ranges,
    ETag, If-Match) and no redirect; bucket resolves still redirect."""
    url = f"{hub.endpoint}/org/base/resolve/main/sub/w.safetensors"
    etag = f'"{sha(b"W" * 50)}"'
    hub.resolve_direct = True
    try:
        st, h, got = call(url, method="HEAD")
        assert st == 200 and "location" not in h and h["content-length"] == "50" and h["etag"] == etag
        st, h, got = call(url, headers={"Range": "bytes=40-"})
        assert st == 206 and got == b"W" * 10 and h["content-range"] == "bytes 40-49/50"
        assert call(url)[:3:2] == (200, b"W" * 50)
        assert call(url, headers={"Range": "bytes=0-1", "If-Match": '"nope"'})[0] == 412
        assert call(f"{hub.endpoint}/buckets/user/run/resolve/a/b")[0] == 302
        assert call(f"{hub.endpoint}/org/base/resolve/main/nope.json")[0] == 404
        s = hub.stats()
        assert ["models/org/base/main/sub/w.safetensors", 40, 49] in s["ranges"] and s["cdn"] == 0
    finally:
        hub.resolve_direct = False
    assert call(url)[0] == 302


def test_escaped_and_bad_paths(hub):
    key = "we#ird ?%/sp ace.bin"
    st, h, _ = call(f"{hub.endpoint}/buckets/user/run/resolve/{Q(key)}", method="HEAD")
    assert st == 302 and h["x-linked-size"] == "10"
    assert call(h["location"], headers={"Range": "bytes=3-4"})[2] == b"34"
    entries, _ = tree_all(bucket(hub, "/tree/" + Q("we#ird ?%") + "?recursive=true"))
    assert [e["path"] for e in entries] == [key]
    for bad in ("a/../a/b", "a/./b", "%2Fetc%2Fpasswd", "a//b", "..%2F..%2Fetc"):
        assert call(f"{hub.endpoint}/buckets/user/run/resolve/{bad}")[0] == 400, bad
    assert call(bucket(hub, "/tree/..?recursive=true"))[0] == 400
    assert call(f"{hub.endpoint}/api/buckets/user/..")[0] == 400


def test_model_repo(hub, root):
    api = f"{hub.endpoint}/api/models/org/base/tree/main"
    full, _ = tree_all(api + "?recursive=true")
    assert [e["path"] for e in full] == ["config.json", "sub/w.safetensors"]
    assert full[1]["xetHash"] == sha(b"W" * 50)
    flat, _ = tree_all(api + "?recursive=false")
    assert [(e["type"], e["path"]) for e in flat] == [("file", "config.json"), ("directory", "sub")]
    sub, _ = tree_all(api + "/sub?recursive=true")
    assert [e["path"] for e in sub] == ["sub/w.safetensors"]
    assert call(api + "/sub")[0] == 400
    st, h, _ = call(f"{hub.endpoint}/api/models/org/base/tree/v2?recursive=true")
    assert st == 404 and h["x-error-code"] == "RevisionNotFound"
    st, h, _ = call(f"{hub.endpoint}/api/models/org/nope/tree/main?recursive=true")
    assert st == 404 and h["x-error-code"] == "RepoNotFound"
    url = f"{hub.endpoint}/org/base/resolve/main/sub/w.safetensors"
    st, h, _ = call(url, method="HEAD")
    assert st == 302 and h["x-linked-size"] == "50" and h["x-xet-hash"] == sha(b"W" * 50)
    st, h, _ = call(url)
    assert st == 302 and call(h["location"], headers={"Range": "bytes=0-9"})[2] == b"W" * 10
    st, h, _ = call(f"{hub.endpoint}/org/base/resolve/main/nope.json")
    assert st == 404 and h["x-error-code"] == "EntryNotFound"


# ---- auth --------------------------------------------------------------------------

def test_auth_and_cdn_never_sees_it(root):
    marker = root / "buckets" / "user" / "secret.private"
    write(root / "buckets" / "user" / "secret" / "f", b"s")
    marker.write_text("other-token\n")
    with hubserver.Hub(root, token="sekrit") as hub:
        ok = {"Authorization": "Bearer sekrit"}
        for url in (bucket(hub), bucket(hub, "/tree?recursive=true"),
                    f"{hub.endpoint}/buckets/user/run/resolve/a/b",
                    f"{hub.endpoint}/api/models/org/base/tree/main?recursive=true",
                    f"{hub.endpoint}/org/base/resolve/main/config.json"):
            assert call(url)[0] == 401, url
            assert call(url, headers={"Authorization": "Bearer wrong"})[0] == 401, url
            assert call(url, headers=ok)[0] in (200, 302), url
        assert call(bucket(hub, "/paths-info"), method="POST", body=b'{"paths":[]}')[0] == 401
        assert call(f"{hub.endpoint}/api/buckets/user/missing", headers=ok)[0] == 404
        # the private bucket is invisible even with the server's token
        st, h, _ = call(f"{hub.endpoint}/api/buckets/user/secret", headers=ok)
        assert st == 401 and h["x-error-code"] == "RepoNotFound"
        st, h, _ = call(f"{hub.endpoint}/buckets/user/run/resolve/a/b", headers=ok)
        assert call(h["location"])[0] == 200                    # the CDN needs no auth
        assert hub.stats()["cdn_auth_seen"] == 0
        assert call(h["location"], headers=ok)[0] == 200        # ... and counts a leak
        assert hub.stats()["cdn_auth_seen"] == 1
    with hubserver.Hub(root) as hub:                           # no --token: only the marker
        assert call(bucket(hub))[0] == 200
        assert call(f"{hub.endpoint}/api/buckets/user/secret")[0] == 401
        st, _, info = jget(f"{hub.endpoint}/api/buckets/user/secret",
                           headers={"Authorization": "Bearer other-token"})
        assert st == 200 and info["private"] is True


# ---- faults ------------------------------------------------------------------------

def test_fault_status_and_429(hub):
    url = bucket(hub)
    hub.set_faults({"class": "api", "kind": "status", "status": 503, "count": 2})
    assert [call(url)[0] for _ in range(3)] == [503, 503, 200]
    hub.set_faults(cls="api", kind="429", reset=7, retry_after=2)
    st, h, _ = call(url)
    assert st == 429 and h["ratelimit"] == '"api";r=0;t=7' and h["retry-after"] == "2"
    hub.set_faults({"class": "resolve", "kind": "429", "reset": 3})
    st, h, _ = call(f"{hub.endpoint}/buckets/user/run/resolve/a/b", method="HEAD")
    assert st == 429 and h["ratelimit"] == '"resolvers";r=0;t=3' and "retry-after" not in h
    # match: only paths containing the substring; other classes untouched
    hub.set_faults({"class": "api", "kind": "status", "status": 500, "match": "tree/deltas"})
    assert call(url)[0] == 200
    assert call(bucket(hub, "/tree/anchors?recursive=true"))[0] == 200
    assert call(bucket(hub, "/tree/deltas?recursive=true"))[0] == 500
    assert call(bucket(hub, "/tree/deltas?recursive=true"))[0] == 200
    # the HTTP control API
    for code in (408, 502, 504):
        st, _, _ = call(f"{hub.endpoint}/_faults", method="POST",
                        body=json.dumps({"class": "api", "kind": "status", "status": code}).encode())
        assert st == 200
        assert call(url)[0] == code
    call(f"{hub.endpoint}/_faults", method="POST",
         body=json.dumps([{"class": "api", "kind": "status", "count": 5}]).encode())
    assert len(jget(f"{hub.endpoint}/_faults")[2]) == 1
    assert call(f"{hub.endpoint}/_faults/clear", method="POST")[0] == 200
    assert call(url)[0] == 200
    assert call(f"{hub.endpoint}/_faults", method="POST", body=b'{"class": "x", "kind": "reset"}')[0] == 400
    with pytest.raises(ValueError):
        hub.set_faults({"class": "cdn", "kind": "explode"})


def cdn_url(hub, key="anchors/step_000001.safetensors"):
    return call(f"{hub.endpoint}/buckets/user/run/resolve/{key}")[1]["location"]


def open_get(url, headers=None, timeout=5):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    conn.request("GET", u.path + "?" + u.query, headers={"User-Agent": UA, **(headers or {})})
    return conn, conn.getresponse()


def test_fault_stall_does_not_block_others(hub):
    loc = cdn_url(hub)
    hub.set_faults({"class": "cdn", "kind": "stall", "seconds": 1.0, "after": 4})
    t0 = time.monotonic()
    conn, r = open_get(loc)
    assert r.status == 200 and r.getheader("Content-Length") == "100"
    assert r.read(4) == b"AAAA"
    # meanwhile the servers answer other requests at once
    t1 = time.monotonic()
    assert call(loc, headers={"Range": "bytes=0-1"})[0] == 206
    assert call(bucket(hub))[0] == 200
    assert time.monotonic() - t1 < 0.5
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    assert 0.9 <= time.monotonic() - t0 < 3
    conn.close()
    # a client timeout shorter than the stall fires
    hub.set_faults({"class": "api", "kind": "stall", "seconds": 2})
    with pytest.raises(socket.timeout):
        call(bucket(hub), timeout=0.3)
    hub.clear_faults()


def test_fault_truncate(hub):
    loc = cdn_url(hub)
    hub.set_faults({"class": "cdn", "kind": "truncate", "after": 30})
    conn, r = open_get(loc, headers={"Range": "bytes=0-49"})
    assert r.status == 206 and r.getheader("Content-Length") == "50"
    with pytest.raises(http.client.IncompleteRead) as e:
        r.read()
    assert len(e.value.partial) == 30
    conn.close()
    hub.set_faults({"class": "resolve", "kind": "truncate"})   # GET 302: short body
    with pytest.raises((http.client.IncompleteRead, http.client.RemoteDisconnected)):
        call(f"{hub.endpoint}/buckets/user/run/resolve/a/b")
    assert call(loc)[2] == b"A" * 100


def test_fault_reset(hub):
    hub.set_faults({"class": "api", "kind": "reset", "count": 1})
    with pytest.raises(ConnectionResetError):
        call(bucket(hub))
    assert call(bucket(hub))[0] == 200
    loc = cdn_url(hub)
    hub.set_faults({"class": "cdn", "kind": "reset"})
    with pytest.raises(ConnectionResetError):
        call(loc)
    assert call(loc)[0] == 200


def test_fault_slow(hub):
    loc = cdn_url(hub)
    hub.set_faults({"class": "cdn", "kind": "slow", "rate": 200})
    t0 = time.monotonic()
    st, _, got = call(loc, headers={"Range": "bytes=0-99"})      # 100 bytes at 200 B/s
    dt = time.monotonic() - t0
    assert st == 206 and got == b"A" * 100
    assert 0.4 <= dt < 2, dt
    t0 = time.monotonic()
    call(loc)
    assert time.monotonic() - t0 < 0.3


# ---- stats, keep-alive, command line -----------------------------------------------

def test_stats(hub):
    hub.reset_stats()
    call(bucket(hub))
    call(bucket(hub, "/tree/deltas?recursive=true"), headers={"User-Agent": "lister/2"})
    key = "deltas/step_000002.safetensors"
    call(f"{hub.endpoint}/buckets/user/run/resolve/{key}", method="HEAD")
    loc = call(f"{hub.endpoint}/buckets/user/run/resolve/{key}", headers={"User-Agent": "resolver/3"})[1]["location"]
    call(loc, headers={"Range": "bytes=1-3", "User-Agent": "cdn/4"})
    call(loc)
    s = jget(f"{hub.endpoint}/_stats")[2]
    assert (s["api"], s["resolve"], s["head"], s["cdn"]) == (2, 2, 1, 2)
    assert s["cdn_bytes"] == 3 + 12 and s["cdn_auth_seen"] == 0
    assert s["by_path"]["/api/buckets/user/run"] == 1
    assert s["by_path"]["/api/buckets/user/run/tree/deltas"] == 1
    assert s["by_path"][f"/buckets/user/run/resolve/{key}"] == 2
    assert s["by_path"][f"/blob/buckets/user/run/{key}"] == 2
    assert s["user_agent"] == {"api": "lister/2", "resolve": "resolver/3", "cdn": UA}
    assert s["ranges"] == [[f"buckets/user/run/{key}", 1, 3], [f"buckets/user/run/{key}", 0, 11]]
    assert s == hub.stats()
    # faulted requests count too; control endpoints do not
    hub.set_faults({"class": "api", "kind": "status", "status": 502})
    call(bucket(hub))
    assert hub.stats()["api"] == 3 and hub.stats()["faults_fired"] == 1
    assert call(f"{hub.endpoint}/_stats/reset", method="POST")[0] == 200
    s = hub.stats()
    assert (s["api"], s["resolve"], s["cdn"], s["by_path"], s["ranges"]) == (0, 0, 0, {}, [])


def test_keep_alive(hub):
    u = urllib.parse.urlsplit(hub.endpoint)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    hub.set_faults({"class": "api", "kind": "status", "status": 503})
    socks = []
    for path in ("/api/buckets/user/run", "/api/buckets/user/run", "/api/buckets/user/nope",
                 "/buckets/user/run/resolve/a/b", "/api/buckets/user/run/tree/a?recursive=true"):
        conn.request("GET", path)
        r = conn.getresponse()
        assert r.getheader("Content-Length") is not None
        r.read()
        socks.append(conn.sock)
        assert not r.will_close
    assert all(s is socks[0] for s in socks)
    conn.close()


def test_cdn_url_redirects_elsewhere(root, tmp_path):
    """--cdn-url: the resolver sends clients to BASE/<path under root> (another
    server, e.g. nginx serving root); the headers stay; the own CDN is not used."""
    with hubserver.Hub(root, cdn_url="http://127.0.0.2:9/files/") as h:
        key = "we#ird ?%/sp ace.bin"
        url = f"{h.endpoint}/buckets/user/run/resolve/{Q(key)}"
        for method in ("GET", "HEAD"):
            st, hd, _ = call(url, method=method)
            assert st == 302
            assert hd["location"] == "http://127.0.0.2:9/files/buckets/user/run/" + Q(key)
            assert hd["x-xet-hash"] == sha(b"0123456789") and hd["x-linked-size"] == "10"
        st, hd, _ = call(f"{h.endpoint}/org/base/resolve/main/sub/w.safetensors")
        assert st == 302 and hd["location"] == "http://127.0.0.2:9/files/models/org/base/main/sub/w.safetensors"
        assert h.stats()["resolve"] == 3 and h.stats()["cdn"] == 0
    with hubserver.Hub(root) as h:                              # default unchanged
        loc = call(f"{h.endpoint}/buckets/user/run/resolve/a/b")[1]["location"]
        assert loc.startswith(h.cdn + "/blob/")
    for bad in ("http://192.0.2.1/", "ftp://127.0.0.2/", "http://127.0.0.2/?q=1", "127.0.0.2"):
        with pytest.raises(ValueError):
            hubserver.Hub(root, cdn_url=bad)
    ready = tmp_path / "ready.json"                             # the command line
    p = subprocess.Popen([sys.executable, str(Path(hubserver.__file__)), "--root", str(root),
                          "--cdn-url", "http://127.0.0.2:9", "--ready-file", str(ready)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(p.stdout.readline())
        loc = call(info["endpoint"] + "/buckets/user/run/resolve/a/b")[1]["location"]
        assert loc == "http://127.0.0.2:9/buckets/user/run/a/b"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=5) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=5)
        p.stdout.close()
        p.stderr.close()


def test_loopback_only(tmp_path):
    with pytest.raises(ValueError):
        hubserver.Hub(tmp_path, host="0.0.0.0")
    with pytest.raises(ValueError):
        hubserver.Hub(tmp_path, cdn_host="192.0.2.1")


def test_command_line(root, tmp_path):
    ready = tmp_path / "ready.json"
    p = subprocess.Popen([sys.executable, str(Path(hubserver.__file__)), "--root", str(root),
                          "--token", "tok", "--page-size", "2", "--ready-file", str(ready)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        info = json.loads(line)
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", info["endpoint"])
        assert re.fullmatch(r"http://127\.0\.0\.2:\d+", info["cdn"])
        assert json.loads(ready.read_text()) == info
        auth = {"Authorization": "Bearer tok"}
        url = info["endpoint"] + "/api/buckets/user/run/tree/deltas?recursive=true"
        assert call(url)[0] == 401
        assert len(jget(url, headers=auth)[2]) == 2
        entries, pages = tree_all(url, headers=auth)
        assert len(entries) == 4 and pages == 2
        loc = call(info["endpoint"] + "/buckets/user/run/resolve/a/b", headers=auth)[1]["location"]
        assert loc.startswith(info["cdn"]) and call(loc)[2] == b"not under a/x"
        assert jget(info["endpoint"] + "/_stats")[2]["cdn"] == 1
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=5) == 0
        assert time.monotonic() - t0 < 2
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=5)
        p.stdout.close()
        p.stderr.close()
