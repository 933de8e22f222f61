#!/usr/bin/python3
"""A loopback Hugging Face Hub for dwsfs's tests (Python standard library only).

Serves, from a folder, the slice of the Hub API that dwsfs reads
(shared/spec/hf-bucket-api.md): Storage Buckets and model repositories, a
resolver that answers 302 to a separate CDN server serving byte ranges, bearer
auth, statistics and fault injection.

Layout of --root DIR (read live on every request: tests add, change and delete
files while the server runs):

    DIR/buckets/<ns>/<name>/<key...>          bucket objects, key = path under <name>/
    DIR/buckets/<ns>/<name>.private           optional: bucket is private, the file
                                              lists the tokens allowed (one a line)
    DIR/models/<ns>/<repo>/<revision>/<path>  model repository files at <revision>
    DIR/models/<ns>/<repo>.private            same, for a model repo

Command line:

    hubserver.py --root DIR [--port 0] [--cdn-host 127.0.0.2] [--cdn-port 0]
                 [--cdn-url BASE] [--cdn-by-path] [--resolve-direct] [--token TOKEN]
                 [--page-size N] [--ready-file FILE] [--max-seconds 3600]
                 [--exit-with-parent] [--verbose]

prints {"endpoint": "http://127.0.0.1:PORT", "cdn": "http://127.0.0.2:PORT2"} on one
line when listening (and writes it to --ready-file).

--cdn-url BASE (Hub(..., cdn_url=BASE)): the resolver's 302 points to
BASE/<path of the object under DIR> (e.g. BASE/buckets/<ns>/<name>/<key>), URL-quoted,
instead of this server's own CDN: for benchmarks where another server (nginx on
127.0.0.2 serving DIR) delivers the bytes. BASE is an http(s) URL on a loopback host.
The own CDN still runs; requests to BASE are neither counted nor faulted here.
Hub(..., tls=(CERTFILE, KEYFILE)): both servers speak https with that certificate
(the endpoint and cdn URLs say https://); for the TLS verification tests.

Object bytes are served as the Hub's CDN serves them: a strong ETag ("<sha256>",
which is also the listing's xetHash and the resolver's X-Xet-Hash here), Range (206
with Content-Range: bytes A-B/SIZE, 416 past the end), If-Match (412 when it names
no ETag the object has now) and If-Range (the whole object, 200, when it names
another content). By default a signed CDN URL names the content it was issued for
(410 once the object changed), as the Hub's content-addressed CDN URLs do. Two modes
(constructor arguments or attributes, changeable while running) model servers that
do not:
--cdn-by-path (cdn_by_path=True): the CDN serves the object's current bytes
    whatever content the signed URL named.
--resolve-direct (resolve_direct=True): a model repository's resolver answers GET
    and HEAD itself, 200/206 with the bytes (as the Hub does for files not in LFS),
    no redirect; bucket resolves still redirect.
In process:

    hub = Hub(root, token=None, page_size=1000).start()
    ... hub.endpoint, hub.cdn, hub.stats(), hub.reset_stats(),
    hub.set_faults({"class": "cdn", "kind": "reset", "count": 1}), hub.clear_faults()
    hub.stop()

Control endpoints on the main port (never counted, never faulted, no auth):
GET /_stats, POST /_stats/reset, GET /_faults, POST /_faults (a spec or a list of
specs), POST /_faults/clear.
"""
import argparse
import base64
import collections
import datetime
import hashlib
import hmac
import http.server
import ipaddress
import json
import os
import signal
import socket
import socketserver
import stat
import struct
import sys
import threading
import time
import traceback
import urllib.parse

CHUNK = 256 * 1024
MAX_REQUEST_BODY = 16 * 1024 * 1024
MAX_SCAN_ENTRIES = 2_000_000
MAX_PATHS_INFO = 1000
HANDLER_TIMEOUT = 60.0          # idle keep-alive connections and blocked sends
RANGES_KEPT = 1000
LOG_KEPT = 1000
HASH_CACHE_MAX = 200_000
RACY_NS = 100_000_000           # a cached hash is trusted only for a file last changed at
                                # least this long before hashing began (coarse kernel clock)

FAULT_CLASSES = ("api", "resolve", "cdn")
FAULT_KINDS = ("status", "429", "stall", "truncate", "reset", "slow")


class HubError(Exception):
    def __init__(self, status, message, code=None, headers=(), close=False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = list(headers)
        self.close = close


def iso_ms(ns):
    """ISO-8601 UTC with milliseconds and Z, from nanoseconds since the epoch."""
    ms = ns // 1_000_000
    dt = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(milliseconds=ms)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (ms % 1000)


def check_rel(path, what="path"):
    """A relative object path: no absolute path, no '.'/'..'/empty component, no NUL."""
    if not isinstance(path, str) or path == "":
        raise HubError(400, f"empty {what}", "BadRequest")
    if path.startswith("/") or "\0" in path:
        raise HubError(400, f"invalid {what}", "BadRequest")
    for comp in path.split("/"):
        if comp in ("", ".", ".."):
            raise HubError(400, f"invalid {what}: bad component", "BadRequest")
    return path


def check_segment(seg, what):
    name = urllib.parse.unquote(seg)
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise HubError(400, f"invalid {what}", "BadRequest")
    return name


def header_safe(text):
    text = str(text).replace("\r", " ").replace("\n", " ")
    return text.encode("ascii", "backslashreplace").decode("ascii")[:500]


def b64e(text):
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogateescape")).decode("ascii").rstrip("=")


def b64d(text):
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
        return raw.decode("utf-8", "surrogateescape")
    except Exception:
        raise HubError(400, "invalid cursor", "BadRequest")


class Resp:
    """A response: status, headers, and a body of bytes or a file segment."""

    def __init__(self, status, headers=(), body=b"", file=None, offset=0, length=None):
        self.status = status
        self.headers = list(headers)
        self.body = body
        self.file = file
        self.offset = offset
        self.length = len(body) if file is None else length

    def close(self):
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None


def json_resp(status, obj, headers=()):
    body = json.dumps(obj).encode("utf-8")
    return Resp(status, [("Content-Type", "application/json; charset=utf-8")] + list(headers), body)


def error_resp(err):
    headers = [("X-Error-Message", header_safe(err.message))]
    if err.code:
        headers.append(("X-Error-Code", err.code))
    return json_resp(err.status, {"error": err.message}, headers + err.headers)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, addr, handler, hub):
        self.hub = hub
        super().__init__(addr, handler)

    def server_bind(self):
        # HTTPServer.server_bind would call socket.getfqdn() (a DNS lookup): skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host
        self.server_port = port

    def handle_error(self, request, client_address):
        if self.hub.verbose:
            traceback.print_exc()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hubserver/1"
    sys_version = ""
    timeout = HANDLER_TIMEOUT
    role = "main"

    # ---- plumbing -------------------------------------------------------
    @property
    def hub(self):
        return self.server.hub

    def setup(self):
        super().setup()
        self.hub._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.hub._track(self.connection, False)

    def log_message(self, fmt, *args):
        if self.hub.verbose:
            sys.stderr.write("hubserver %s %s\n" % (self.role, fmt % args))

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def _read_body(self):
        if self.headers.get("Transfer-Encoding"):
            raise HubError(411, "chunked request bodies are not supported", "BadRequest", close=True)
        cl = self.headers.get("Content-Length")
        if cl is None:
            return b""
        try:
            n = int(cl)
        except ValueError:
            raise HubError(400, "bad Content-Length", "BadRequest", close=True)
        if n < 0 or n > MAX_REQUEST_BODY:
            raise HubError(413, "request body too large", "BadRequest", close=True)
        data = self.rfile.read(n) if n else b""
        if len(data) != n:
            raise HubError(400, "short request body", "BadRequest", close=True)
        return data

    def _dispatch(self, method):
        self._is_head = method == "HEAD"
        rawpath, _, query = self.path.partition("?")
        try:
            body = self._read_body()
        except HubError as e:
            self.close_connection = True
            self._deliver(error_resp(e), None, None)
            return
        except OSError:
            self.close_connection = True
            return
        params = urllib.parse.parse_qsl(query, keep_blank_values=True)
        decoded = urllib.parse.unquote(rawpath)
        hub = self.hub

        if self.role == "main" and rawpath in ("/_stats", "/_stats/reset", "/_faults", "/_faults/clear"):
            try:
                resp = self._control(method, rawpath, body)
            except HubError as e:
                resp = error_resp(e)
            self._deliver(resp, None, None)
            return

        cls = "cdn" if self.role == "cdn" else self._classify(rawpath)
        if cls is not None:
            hub._count(cls, method, decoded, self.headers.get("User-Agent"),
                       self.headers.get("Authorization") is not None)
        fault = hub._take_fault(cls, method, rawpath, decoded) if cls is not None else None
        if fault is not None and fault["kind"] in ("status", "429", "reset"):
            self._immediate_fault(fault, cls)
            return
        try:
            if self.role == "cdn":
                resp = self._route_cdn(method, rawpath, dict(params))
            else:
                resp = self._route_main(method, cls, rawpath, params, body)
        except HubError as e:
            if e.close:
                self.close_connection = True
            resp = error_resp(e)
        except Exception as e:  # a bug in this server: say so loudly
            traceback.print_exc()
            resp = error_resp(HubError(500, f"hubserver internal error: {e!r}", "InternalError"))
        self._deliver(resp, fault, cls)

    # ---- sending --------------------------------------------------------
    def _head_bytes(self, resp):
        reason = self.responses.get(resp.status, ("",))[0]
        lines = [f"HTTP/1.1 {resp.status} {reason}",
                 f"Server: {self.server_version}",
                 f"Date: {self.date_time_string()}"]
        have_cl = False
        for k, v in resp.headers:
            if k.lower() == "content-length":
                have_cl = True
            lines.append(f"{k}: {v}")
        if not have_cl:
            lines.append(f"Content-Length: {resp.length}")
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _write_body(self, resp, cls, limit=None, rate=None):
        """Write up to `limit` bytes of the body (at `rate` bytes/s). Returns bytes sent."""
        total = resp.length if limit is None else max(0, min(limit, resp.length))
        hub = self.hub
        piece = CHUNK if not rate else max(1, int(rate // 20))
        sent = 0
        if resp.file is not None:
            resp.file.seek(resp.offset)
        while sent < total:                       # bounded: sent grows or we break
            n = min(piece, total - sent)
            if resp.file is not None:
                data = resp.file.read(n)
                if not data:                      # the file shrank under us
                    break
            else:
                data = resp.body[sent:sent + n]
            # counted before the client can have them (it may ask /_stats as
            # soon as it has read the body), taken back if they never left
            if cls == "cdn":
                hub._add_cdn_bytes(len(data))
            try:
                self.wfile.write(data)
            except OSError:
                if cls == "cdn":
                    hub._add_cdn_bytes(-len(data))
                raise
            sent += len(data)
            if rate and sent < total and hub._stop.wait(len(data) / float(rate)):
                break
        return sent

    def _deliver(self, resp, fault, cls):
        self.hub._log(cls, self.command, self.path, resp.status, fault["kind"] if fault else None)
        try:
            bodyless = self._is_head or resp.status in (204, 304) or resp.status < 200
            kind = fault["kind"] if fault else None
            if kind == "stall":
                head = self._head_bytes(resp)      # as a healthy answer would start
                self.close_connection = True
                if not bodyless:
                    after = fault["after"] if resp.length == 0 else min(fault["after"], resp.length - 1)
                    self.wfile.write(head)
                    self._write_body(resp, cls, limit=after)
                self.hub._stop.wait(fault["seconds"])
                return
            if kind == "truncate":
                head = self._head_bytes(resp)
                self.close_connection = True
                if bodyless or resp.length == 0:
                    self.wfile.write(head[:len(head) // 2])
                else:
                    self.wfile.write(head)
                    self._write_body(resp, cls, limit=min(fault["after"], resp.length - 1))
                return
            self.wfile.write(self._head_bytes(resp))
            if not bodyless:
                rate = fault["rate"] if kind == "slow" else None
                if self._write_body(resp, cls, rate=rate) < resp.length:
                    self.close_connection = True
        except OSError:
            self.close_connection = True
        finally:
            resp.close()

    def _immediate_fault(self, fault, cls):
        kind = fault["kind"]
        if kind == "reset":
            self.hub._log(cls, self.command, self.path, 0, "reset")
            self.close_connection = True
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.rfile.close()            # drop the makefile reference so close() is real
                self.connection.close()       # abortive close: RST, no FIN
            except OSError:
                pass
            return
        if kind == "status":
            status = fault["status"]
            body = fault.get("body", f"injected fault: status {status}\n").encode("utf-8")
            headers = [("Content-Type", "text/plain; charset=utf-8")] + list(fault.get("headers", {}).items())
            self._deliver(Resp(status, headers, body), None, cls)
            return
        # 429
        name = {"api": "api", "resolve": "resolvers", "cdn": "cdn"}[cls]
        quota = {"api": 1000, "resolve": 5000, "cdn": 100000}[cls]
        headers = [("RateLimit", f'"{name}";r={fault["remaining"]};t={fault["reset"]}'),
                   ("RateLimit-Policy", f'"fixed window";"{name}";q={quota};w=300'),
                   ("X-Error-Code", "RateLimited")]
        if fault.get("retry_after") is not None:
            headers.append(("Retry-After", str(fault["retry_after"])))
        self._deliver(json_resp(429, {"error": "rate limited (injected)"}, headers), None, cls)

    # ---- control ----------------------------------------------------------
    def _control(self, method, rawpath, body):
        hub = self.hub
        if rawpath == "/_stats":
            if method not in ("GET", "HEAD"):
                raise HubError(405, "use GET", "MethodNotAllowed", [("Allow", "GET, HEAD")])
            return json_resp(200, hub.stats())
        if method != "POST" and not (rawpath == "/_faults" and method in ("GET", "HEAD")):
            raise HubError(405, "use POST", "MethodNotAllowed", [("Allow", "POST")])
        if rawpath == "/_stats/reset":
            hub.reset_stats()
            return json_resp(200, {"ok": True})
        if rawpath == "/_faults/clear":
            hub.clear_faults()
            return json_resp(200, {"ok": True})
        if method in ("GET", "HEAD"):
            return json_resp(200, hub.faults())
        try:
            spec = json.loads(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise HubError(400, "fault spec must be JSON", "BadRequest")
        try:
            hub.set_faults(spec)
        except (ValueError, TypeError) as e:
            raise HubError(400, f"bad fault spec: {e}", "BadRequest")
        return json_resp(200, {"ok": True, "pending": hub.faults()})

    # ---- routing ------------------------------------------------------------
    @staticmethod
    def _classify(rawpath):
        if rawpath.startswith("/api/") or rawpath == "/api":
            return "api"
        segs = rawpath[1:].split("/")
        if len(segs) >= 4 and segs[0] == "buckets" and segs[3] == "resolve":
            return "resolve"
        if len(segs) >= 3 and segs[2] == "resolve":
            return "resolve"
        return None

    def _bearer(self):
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        scheme, _, tok = auth.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        return tok.strip()

    def _check_token(self):
        tok = self.hub.token
        if tok is not None and self._bearer() != tok:
            raise HubError(401, "Invalid credentials in Authorization header", "Unauthorized",
                           [("WWW-Authenticate", 'Bearer realm="hubserver"')])

    def _check_private(self, marker):
        """marker: DIR/<kind>/<ns>/<name>.private; if present, the bearer must be listed in it."""
        try:
            with open(marker, encoding="utf-8") as f:
                allowed = {line.strip() for line in f if line.strip()}
        except FileNotFoundError:
            return
        except OSError:
            allowed = set()
        if self._bearer() not in allowed:
            raise HubError(401, "Repository not found or private", "RepoNotFound",
                           [("WWW-Authenticate", 'Bearer realm="hubserver"')])

    def _bucket_root(self, ns_seg, name_seg):
        ns = check_segment(ns_seg, "namespace")
        name = check_segment(name_seg, "bucket name")
        base = os.path.join(self.hub.root, "buckets", ns)
        self._check_private(os.path.join(base, name + ".private"))
        root = os.path.join(base, name)
        if not os.path.isdir(root):
            raise HubError(404, f"Bucket {ns}/{name} not found", "RepoNotFound")
        return f"{ns}/{name}", root

    def _model_root(self, ns_seg, repo_seg, rev_seg):
        ns = check_segment(ns_seg, "namespace")
        repo = check_segment(repo_seg, "repository name")
        rev = check_rel(urllib.parse.unquote(rev_seg), "revision")
        base = os.path.join(self.hub.root, "models", ns)
        self._check_private(os.path.join(base, repo + ".private"))
        if not os.path.isdir(os.path.join(base, repo)):
            raise HubError(404, f"Repository {ns}/{repo} not found", "RepoNotFound")
        root = os.path.join(base, repo, rev)
        if not os.path.isdir(root):
            raise HubError(404, f"Revision {rev} not found", "RevisionNotFound")
        return f"{ns}/{repo}", root

    def _route_main(self, method, cls, rawpath, params, body):
        if cls is None:
            raise HubError(404, "no such endpoint", "NotFound")
        self._check_token()
        segs = rawpath[1:].split("/")
        get_like = method in ("GET", "HEAD")
        if cls == "api":
            if len(segs) >= 4 and segs[1] == "buckets":
                rid, root = self._bucket_root(segs[2], segs[3])
                rest = segs[4:]
                if rest in ([], [""]):
                    self._need(get_like, "GET, HEAD")
                    return self.hub._bucket_info(rid, root, self._private_marker("buckets", segs))
                if rest[0] == "tree":
                    self._need(get_like, "GET, HEAD")
                    prefix = urllib.parse.unquote("/".join(rest[1:]))
                    return self._tree(root, prefix, params, rawpath, quirk=True)
                if rest == ["paths-info"]:
                    self._need(method == "POST", "POST")
                    return self._paths_info(root, body)
                raise HubError(404, "no such endpoint", "NotFound")
            if len(segs) >= 6 and segs[1] == "models" and segs[4] == "tree":
                self._need(get_like, "GET, HEAD")
                _, root = self._model_root(segs[2], segs[3], segs[5])
                prefix = urllib.parse.unquote("/".join(segs[6:]))
                return self._tree(root, prefix, params, rawpath, quirk=False)
            raise HubError(404, "no such endpoint", "NotFound")
        # resolver
        self._need(get_like, "GET, HEAD")
        if segs[0] == "buckets" and len(segs) >= 4 and segs[3] == "resolve":
            if len(segs) < 5:
                raise HubError(400, "missing path", "BadRequest")
            _, root = self._bucket_root(segs[1], segs[2])
            key = check_rel(urllib.parse.unquote("/".join(segs[4:])))
        else:
            if len(segs) < 5:
                raise HubError(400, "missing revision or path", "BadRequest")
            _, root = self._model_root(segs[0], segs[1], segs[3])
            key = check_rel(urllib.parse.unquote("/".join(segs[4:])))
            return self._resolve(root, key, direct=self.hub.resolve_direct)
        return self._resolve(root, key)

    def _private_marker(self, kind, segs):
        return os.path.isfile(os.path.join(self.hub.root, kind, urllib.parse.unquote(segs[2]),
                                           urllib.parse.unquote(segs[3]) + ".private"))

    @staticmethod
    def _need(ok, allow):
        if not ok:
            raise HubError(405, "method not allowed", "MethodNotAllowed", [("Allow", allow)])

    # ---- endpoints ----------------------------------------------------------
    def _tree(self, root, prefix, params, rawpath, quirk):
        hub = self.hub
        q = dict(params)
        rec = q.get("recursive")
        if rec is None:
            raise HubError(400, "the recursive= parameter is required", "BadRequest")
        if rec.lower() in ("true", "1"):
            recursive = True
        elif rec.lower() in ("false", "0"):
            recursive = False
        else:
            raise HubError(400, "recursive must be true or false", "BadRequest")
        limit = hub.page_size
        if "limit" in q:
            try:
                limit = int(q["limit"])
            except ValueError:
                raise HubError(400, "bad limit", "BadRequest")
            if limit < 1:
                raise HubError(400, "bad limit", "BadRequest")
            limit = min(limit, hub.page_size)
        after = b64d(q["cursor"]) if q.get("cursor") else None
        prefix = prefix.rstrip("/")
        if prefix:
            check_rel(prefix, "prefix")
        files = hub._scan(root, prefix, quirk)
        entries = hub._entries(files, prefix, recursive)
        entries.sort(key=lambda e: e[0])
        if after is not None:
            entries = [e for e in entries if e[0] > after]
        page, more = entries[:limit], len(entries) > limit
        out = []
        for path, kind, val in page:
            if kind == "dir":
                out.append({"type": "directory", "path": path, "uploadedAt": iso_ms(val)})
            else:
                ent = hub._file_entry(root, path)
                if ent is not None:
                    out.append(ent)
        headers = []
        if more:
            kept = [(k, v) for k, v in params if k != "cursor"] + [("cursor", b64e(page[-1][0]))]
            url = hub.endpoint + rawpath + "?" + urllib.parse.urlencode(kept, quote_via=urllib.parse.quote)
            headers.append(("Link", f'<{url}>; rel="next"'))
        return json_resp(200, out, headers)

    def _paths_info(self, root, body):
        ctype = (self.headers.get("Content-Type") or "").lower()
        if ctype.startswith("application/x-www-form-urlencoded"):
            paths = [v for k, v in urllib.parse.parse_qsl(body.decode("utf-8", "replace")) if k == "paths"]
        else:
            try:
                doc = json.loads(body.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise HubError(400, "body must be JSON {\"paths\": [...]}", "BadRequest")
            paths = doc.get("paths") if isinstance(doc, dict) else None
            if not isinstance(paths, list):
                raise HubError(400, "body must be JSON {\"paths\": [...]}", "BadRequest")
        if len(paths) > MAX_PATHS_INFO:
            raise HubError(400, f"at most {MAX_PATHS_INFO} paths per call", "BadRequest")
        out, seen = [], set()
        for p in paths:
            if not isinstance(p, str):
                raise HubError(400, "paths must be strings", "BadRequest")
            p = p.rstrip("/")
            check_rel(p)
            if p in seen:
                continue
            seen.add(p)
            ent = self.hub._file_entry(root, p)
            if ent is None and os.path.isdir(os.path.join(root, p)):
                files = self.hub._scan(root, p, False)
                if files:
                    newest = max(st.st_mtime_ns for st in files.values())
                    ent = {"type": "directory", "path": p, "uploadedAt": iso_ms(newest)}
            if ent is not None:
                out.append(ent)
        return json_resp(200, out)

    def _resolve(self, root, key, direct=False):
        hub = self.hub
        abspath = os.path.join(root, key)
        obj = hub._open_object(abspath)
        if obj is None:
            raise HubError(404, f"Entry {key} not found", "EntryNotFound")
        f, st, h = obj
        rel = os.path.relpath(abspath, hub.root).replace(os.sep, "/")
        if direct:
            return self._serve_object(rel, f, st, h)
        f.close()
        url = hub._cdn_url(rel, h)
        headers = [("Location", url), ("X-Xet-Hash", h), ("X-Linked-Size", str(st.st_size)),
                   ("X-Linked-Etag", f'"{h}"'), ("ETag", f'"{h}"'),
                   ("Last-Modified", self.date_time_string(st.st_mtime))]
        if self._is_head:
            return Resp(302, headers + [("Content-Length", str(st.st_size))], b"")
        body = f"Found. Redirecting to {url}\n".encode("utf-8")
        return Resp(302, headers + [("Content-Type", "text/plain; charset=utf-8")], body)

    def _route_cdn(self, method, rawpath, q):
        hub = self.hub
        self._need(method in ("GET", "HEAD"), "GET, HEAD")
        if not rawpath.startswith("/blob/"):
            raise HubError(404, "no such object", "EntryNotFound")
        rel = check_rel(urllib.parse.unquote(rawpath[len("/blob/"):]))
        xh, sig = q.get("xh", ""), q.get("sig", "")
        if not hmac.compare_digest(hub._sign(rel, xh), sig):
            raise HubError(403, "bad signature", "InvalidSignature")
        obj = hub._open_object(os.path.join(hub.root, rel))
        if obj is None:
            raise HubError(404, "object gone", "EntryNotFound")
        f, st, h = obj
        if h != xh and not hub.cdn_by_path:
            f.close()
            raise HubError(410, "object changed since this URL was issued", "ObjectChanged")
        return self._serve_object(rel, f, st, h)

    def _serve_object(self, rel, f, st, h):
        """The bytes of open object f (closed with the answer) as a CDN serves them:
        ETag, If-Match, If-Range, Range."""
        size = st.st_size
        etag = f'"{h}"'
        base = [("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes"),
                ("ETag", etag), ("Last-Modified", self.date_time_string(st.st_mtime))]
        want = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range.strip() != etag:
            want = None                       # another content: all of this one
        try:
            if_match = self.headers.get("If-Match")
            if if_match is not None and not etag_matches(if_match, etag):
                raise HubError(412, "precondition failed: the object has another ETag now",
                               "PreconditionFailed", [("ETag", etag)])
            rng = parse_range(want, size)
        except HubError as e:
            f.close()
            raise e
        if rng is None:
            start, end, status = 0, size - 1, 200
            headers = base
        else:
            start, end = rng
            status = 206
            headers = base + [("Content-Range", f"bytes {start}-{end}/{size}")]
        if self.command == "GET":
            self.hub._record_range(rel, start, end)
        return Resp(status, headers, file=f, offset=start, length=end - start + 1)


def etag_matches(header, etag):
    """If-Match: '*' or a list naming `etag` (strong comparison: a W/ tag never matches)."""
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or etag in tags


def parse_range(value, size):
    """(start, end) inclusive, or None for the whole object. 416 / 400 as HubError."""
    if value is None:
        return None
    value = value.strip()
    if not value.lower().startswith("bytes="):
        raise HubError(400, "only bytes ranges are supported", "BadRequest")
    spec = value[6:].strip()
    if "," in spec:
        raise HubError(400, "multiple ranges are not supported", "BadRequest")
    a, sep, b = spec.partition("-")
    a, b = a.strip(), b.strip()
    ok = lambda s: s.isascii() and s.isdigit()
    unsat = HubError(416, "range not satisfiable", "RangeNotSatisfiable",
                     [("Content-Range", f"bytes */{size}")])
    if not sep or (a and not ok(a)) or (b and not ok(b)) or (not a and not b):
        raise HubError(400, "malformed Range", "BadRequest")
    if not a:
        n = int(b)
        if n == 0 or size == 0:
            raise unsat
        return max(0, size - n), size - 1
    start = int(a)
    end = int(b) if b else size - 1
    if b and end < start:
        raise HubError(400, "malformed Range", "BadRequest")
    if start >= size:
        raise unsat
    return start, min(end, size - 1)


class _MainHandler(_Handler):
    role = "main"


class _CdnHandler(_Handler):
    role = "cdn"


def _loopback(host):
    try:
        addr = ipaddress.ip_address(host)
        if addr.version != 4 or not addr.is_loopback:
            raise ValueError
    except ValueError:
        raise ValueError(f"hubserver binds IPv4 loopback addresses (127.0.0.0/8) only, not {host!r}")
    return host


def _loopback_url(url):
    """An http(s) URL whose host is an IPv4 loopback address or localhost, without
    its trailing slash."""
    u = urllib.parse.urlsplit(str(url))
    if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
        raise ValueError(f"cdn_url must be an http(s) URL without query, not {url!r}")
    if u.hostname != "localhost":
        _loopback(u.hostname)
    return str(url).rstrip("/")


class Hub:
    """The loopback Hub: a main server (API + resolver) and a CDN server."""

    def __init__(self, root, port=0, cdn_host="127.0.0.2", cdn_port=0, token=None,
                 page_size=1000, host="127.0.0.1", verbose=False, cdn_url=None, tls=None,
                 cdn_by_path=False, resolve_direct=False):
        self.root = os.path.abspath(str(root))
        self.host = _loopback(host)
        self.cdn_host = _loopback(cdn_host)
        self.cdn_url = _loopback_url(cdn_url) if cdn_url else None
        self.tls = tuple(tls) if tls else None  # (certfile, keyfile): both servers speak https
        self.cdn_by_path = bool(cdn_by_path)      # the CDN serves current bytes whatever the URL named
        self.resolve_direct = bool(resolve_direct)  # model resolves answer with the bytes, no redirect
        self.port = int(port)
        self.cdn_port = int(cdn_port)
        self.token = token or None
        if int(page_size) < 1:
            raise ValueError("page_size must be >= 1")
        self.page_size = int(page_size)
        self.verbose = verbose
        self.endpoint = None
        self.cdn = None
        self._secret = os.urandom(32)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._servers = []
        self._threads = []
        self._conns = set()
        self._faults = []
        self._hash_cache = {}
        self._bucket_memo = {}
        self._stats_init()

    # ---- lifecycle ----------------------------------------------------------
    def start(self):
        if self._servers:
            return self
        self._stop.clear()
        main = _Server((self.host, self.port), _MainHandler, self)
        try:
            cdn = _Server((self.cdn_host, self.cdn_port), _CdnHandler, self)
        except OSError:
            main.server_close()
            raise
        self._servers = [main, cdn]
        scheme = "http"
        if self.tls:
            import ssl
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            for srv in self._servers:  # a client that rejects the certificate fails in accept()
                srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
            scheme = "https"
        self.endpoint = f"{scheme}://{self.host}:{main.server_address[1]}"
        self.cdn = f"{scheme}://{self.cdn_host}:{cdn.server_address[1]}"
        for srv in self._servers:
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                 name=f"hubserver-{srv.server_address[1]}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self):
        self._stop.set()                  # wakes stalls and slow senders
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:                   # wake handler threads parked in a read
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _track(self, conn, add):
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # ---- stats --------------------------------------------------------------
    def _stats_init(self):
        self._st = {"api": 0, "resolve": 0, "head": 0, "cdn": 0, "cdn_bytes": 0, "cdn_auth_seen": 0,
                    "faults_fired": 0}
        self._by_path = collections.Counter()
        self._ua = {}
        self._ranges = collections.deque(maxlen=RANGES_KEPT)
        self._log_entries = collections.deque(maxlen=LOG_KEPT)

    def reset_stats(self):
        with self._lock:
            self._stats_init()

    def stats(self):
        with self._lock:
            out = dict(self._st)
            out["by_path"] = dict(self._by_path)
            out["user_agent"] = dict(self._ua)
            out["ranges"] = [list(r) for r in self._ranges]
            out["log"] = [list(r) for r in self._log_entries]
        return out

    def _count(self, cls, method, decoded, ua, has_auth):
        with self._lock:
            self._st[cls] += 1
            if cls == "resolve" and method == "HEAD":
                self._st["head"] += 1
            if cls == "cdn" and has_auth:
                self._st["cdn_auth_seen"] += 1
            self._by_path[decoded] += 1
            self._ua[cls] = ua

    def _add_cdn_bytes(self, n):
        with self._lock:
            self._st["cdn_bytes"] += n

    def _record_range(self, rel, start, end):
        with self._lock:
            self._ranges.append((rel, start, end))

    def _log(self, cls, method, path, status, fault):
        if cls is None:
            return
        with self._lock:
            self._log_entries.append((cls, method, path, status, fault))

    # ---- faults -------------------------------------------------------------
    def set_faults(self, spec=None, **kw):
        """Queue faults: a dict spec, a list of specs, or keywords
        (cls= or class via **{"class": ...}, kind=, count=1, match=None, method=None, params...).
        Each spec hits the next `count` requests of its class whose path contains `match`."""
        if spec is None:
            spec = dict(kw)
            if "cls" in spec:
                spec["class"] = spec.pop("cls")
        elif kw:
            raise TypeError("give a spec or keywords, not both")
        specs = spec if isinstance(spec, list) else [spec]
        ready = [self._check_fault(s) for s in specs]
        with self._lock:
            self._faults.extend(ready)

    def clear_faults(self):
        with self._lock:
            self._faults = []

    def faults(self):
        with self._lock:
            return [dict(f) for f in self._faults]

    @staticmethod
    def _check_fault(s):
        if not isinstance(s, dict):
            raise TypeError("a fault spec is a JSON object")
        f = dict(s)
        if "cls" in f and "class" not in f:
            f["class"] = f.pop("cls")
        if f.get("class") not in FAULT_CLASSES:
            raise ValueError(f"class must be one of {FAULT_CLASSES}")
        f["kind"] = str(f.get("kind"))
        if f["kind"] not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {FAULT_KINDS}")
        f["count"] = int(f.get("count", 1))
        if f["count"] < 1:
            raise ValueError("count must be >= 1")
        if f.get("match") is not None and not isinstance(f["match"], str):
            raise ValueError("match is a string")
        if f.get("method") is not None:
            f["method"] = str(f["method"]).upper()
        kind = f["kind"]
        if kind == "status":
            f["status"] = int(f.get("status", 500))
            if not 100 <= f["status"] <= 599:
                raise ValueError("status out of range")
            if not isinstance(f.get("headers", {}), dict):
                raise ValueError("headers is an object")
        elif kind == "429":
            f["reset"] = int(f.get("reset", 1))
            f["remaining"] = int(f.get("remaining", 0))
            if f.get("retry_after") is not None:
                f["retry_after"] = int(f["retry_after"])
        elif kind == "stall":
            f["seconds"] = min(float(f.get("seconds", 30)), 3600.0)
            f["after"] = max(0, int(f.get("after", 0)))
        elif kind == "truncate":
            f["after"] = max(0, int(f.get("after", 0)))
        elif kind == "slow":
            f["rate"] = float(f.get("rate", 16384))
            if f["rate"] <= 0:
                raise ValueError("rate must be > 0")
        return f

    def _take_fault(self, cls, method, rawpath, decoded):
        with self._lock:
            for i, f in enumerate(self._faults):
                if f["class"] != cls:
                    continue
                m = f.get("match")
                if m is not None and m not in decoded and m not in rawpath:
                    continue
                if f.get("method") and f["method"] != method:
                    continue
                f["count"] -= 1
                if f["count"] <= 0:
                    del self._faults[i]
                self._st["faults_fired"] += 1
                return dict(f)
        return None

    # ---- objects --------------------------------------------------------------
    def _sign(self, rel, xh):
        msg = (rel + "\0" + xh).encode("utf-8", "surrogateescape")
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:32]

    def _cdn_url(self, rel, h):
        if self.cdn_url:
            return f"{self.cdn_url}/{urllib.parse.quote(rel, safe='/')}"
        return (f"{self.cdn}/blob/{urllib.parse.quote(rel, safe='/')}"
                f"?xh={h}&sig={self._sign(rel, h)}")

    def _open_object(self, abspath):
        """(open file, its stat, sha256 hex) for a regular file, or None if missing."""
        for _ in range(5):                          # bounded retries if it changes while hashing
            try:
                f = open(abspath, "rb")
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
                return None
            try:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    f.close()
                    return None
                key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
                with self._lock:
                    hit = self._hash_cache.get(abspath)
                if hit is not None and hit[0] == key:
                    return f, st, hit[1]
                began = time.time_ns()
                h = hashlib.sha256()
                for _ in range(st.st_size // CHUNK + 2):   # bounded by the size seen
                    data = f.read(CHUNK)
                    if not data:
                        break
                    h.update(data)
                st2 = os.fstat(f.fileno())
                key2 = (st2.st_size, st2.st_mtime_ns, st2.st_ctime_ns, st2.st_ino, st2.st_dev)
                if key2 != key or f.tell() != st.st_size:
                    f.close()
                    continue
                digest = h.hexdigest()
                # Racy-git rule: a file modified within RACY_NS of hashing could change
                # again without a visible stat change, so do not cache it.
                if max(st.st_mtime_ns, st.st_ctime_ns) < began - RACY_NS:
                    with self._lock:
                        if len(self._hash_cache) >= HASH_CACHE_MAX:
                            self._hash_cache.clear()
                        self._hash_cache[abspath] = (key, digest)
                return f, st, digest
            except OSError:
                f.close()
                return None
        return None

    def _file_entry(self, root, key):
        obj = self._open_object(os.path.join(root, key))
        if obj is None:
            return None
        f, st, h = obj
        f.close()
        t = iso_ms(st.st_mtime_ns)
        return {"type": "file", "path": key, "size": st.st_size, "xetHash": h, "mtime": t, "uploadedAt": t}

    def _scan(self, root, prefix, quirk, dirs=None):
        """{key: stat} of regular files matching prefix (raw string match if quirk,
        else the file `prefix` or files under `prefix/`). dirs: optional dict filled with
        {dir key: mtime_ns} of the folders visited."""
        out = {}
        if prefix:
            d, _, first = prefix.rpartition("/")
            start, startkey = (os.path.join(root, d), d + "/") if d else (root, "")
        else:
            start, startkey, first = root, "", None
        stack = [(start, startkey, True)]
        seen = 0
        while stack:
            path, key, top = stack.pop()
            try:
                if dirs is not None:
                    dirs[key] = os.stat(path).st_mtime_ns
                with os.scandir(path) as it:
                    ents = list(it)
            except OSError:
                continue
            seen += len(ents)
            if seen > MAX_SCAN_ENTRIES:
                raise HubError(500, "too many files under this prefix", "InternalError")
            for de in ents:
                name = de.name
                if top and first is not None:
                    if (quirk and not name.startswith(first)) or (not quirk and name != first):
                        continue
                k = key + name
                try:
                    if de.is_dir(follow_symlinks=False):
                        stack.append((de.path, k + "/", False))
                    elif de.is_file():
                        out[k] = de.stat()
                except OSError:
                    continue
        if prefix:
            if quirk:
                out = {k: v for k, v in out.items() if k.startswith(prefix)}
            else:
                out = {k: v for k, v in out.items() if k == prefix or k.startswith(prefix + "/")}
        return out

    @staticmethod
    def _entries(files, prefix, recursive):
        """[(path, "file"|"dir", stat|mtime_ns)] for a listing."""
        if recursive:
            return [(k, "file", st) for k, st in files.items()]
        base = prefix + "/" if prefix else ""
        res, dirs = [], {}
        for k, st in files.items():
            if prefix and k == prefix:
                res.append((k, "file", st))
                continue
            pos = len(base) if k.startswith(base) else len(prefix)   # else: a prefix-quirk entry
            idx = k.find("/", pos)
            if idx < 0:
                res.append((k, "file", st))
            else:
                d = k[:idx]
                dirs[d] = max(dirs.get(d, 0), st.st_mtime_ns)
        res.extend((d, "dir", t) for d, t in dirs.items())
        return res

    def _bucket_info(self, rid, root, private):
        dirs = {}
        files = self._scan(root, "", True, dirs)
        sig = hashlib.sha256()
        for k in sorted(files):
            st = files[k]
            sig.update(f"{k}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode("utf-8", "surrogateescape"))
        sig = sig.hexdigest()
        newest = max([st.st_mtime_ns for st in files.values()] + list(dirs.values()) + [0])
        try:
            rst = os.stat(root)
        except OSError:
            raise HubError(404, f"Bucket {rid} not found", "RepoNotFound")
        with self._lock:
            memo = self._bucket_memo.get(root)
            if memo is None or memo["ino"] != rst.st_ino:
                oldest = min([st.st_mtime_ns for st in files.values()] + [rst.st_mtime_ns])
                memo = {"ino": rst.st_ino, "created": oldest, "sig": sig, "updated": newest}
                self._bucket_memo[root] = memo
            elif memo["sig"] != sig:
                memo["sig"] = sig
                memo["updated"] = max(newest, memo["updated"] + 1_000_000)
            created, updated = memo["created"], memo["updated"]
        return json_resp(200, {"id": rid, "private": private,
                               "size": sum(st.st_size for st in files.values()),
                               "totalFiles": len(files),
                               "createdAt": iso_ms(created), "updatedAt": iso_ms(updated)})


def main(argv=None):
    ap = argparse.ArgumentParser(description="Loopback Hugging Face Hub for dwsfs tests")
    ap.add_argument("--root", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cdn-host", default="127.0.0.2")
    ap.add_argument("--cdn-port", type=int, default=0)
    ap.add_argument("--cdn-url", default=None,
                    help="resolve redirects to CDN_URL/<path under --root> instead of the own CDN")
    ap.add_argument("--cdn-by-path", action="store_true",
                    help="the CDN serves an object's current bytes whatever content its URL named")
    ap.add_argument("--resolve-direct", action="store_true",
                    help="a model repository's resolver answers with the bytes itself (200/206), no redirect")
    ap.add_argument("--token", default=None)
    ap.add_argument("--page-size", type=int, default=1000)
    ap.add_argument("--ready-file", default=None)
    ap.add_argument("--max-seconds", type=float, default=3600.0,
                    help="exit after this long (0 = never); default 3600")
    ap.add_argument("--exit-with-parent", action="store_true",
                    help="exit when the parent process goes away")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    hub = Hub(args.root, port=args.port, cdn_host=args.cdn_host, cdn_port=args.cdn_port,
              token=args.token, page_size=args.page_size, verbose=args.verbose,
              cdn_url=args.cdn_url, cdn_by_path=args.cdn_by_path, resolve_direct=args.resolve_direct)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    signal.signal(signal.SIGINT, lambda *a: done.set())
    hub.start()
    line = json.dumps({"endpoint": hub.endpoint, "cdn": hub.cdn})
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(line + "\n")
        os.replace(tmp, args.ready_file)
    print(line, flush=True)
    parent = os.getppid()
    deadline = time.monotonic() + args.max_seconds if args.max_seconds > 0 else None
    while not done.wait(0.25):
        if deadline is not None and time.monotonic() >= deadline:
            break
        if args.exit_with_parent and os.getppid() != parent:
            break
    hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
