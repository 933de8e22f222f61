"""A fleet shares downloads through a caching proxy (docs/remote.md, "A
fleet behind a caching proxy"): dwsfs reaches the CDN through
http_proxy/HTTPS_PROXY (libcurl's own proxy settings), the Hub's API and
resolver directly (NO_PROXY), so a second node's bytes come from the proxy's
cache, not the CDN, and the token never reaches the proxy."""
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from mountutil import SLOW, mounted, read_file, wait_until
from test_http import TOKEN, add_bucket, hf_env

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port(host):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture
def caching_proxy(tmp_path):
    """nginx as a forward proxy on 127.0.0.3 that caches 200 and 206 answers
    per URL and range; its log says HIT/MISS and any Authorization sent."""
    if not os.access(NGINX, os.X_OK):
        pytest.skip("nginx is not installed")
    d = tmp_path / "proxy"
    for sub in ("cache", "tmp"):
        (d / sub).mkdir(parents=True)
    port = free_port("127.0.0.3")
    conf = d / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
  log_format p '$upstream_cache_status $status "$http_range" "$http_authorization" $host$uri';
  access_log {d}/access.log p;
  client_body_temp_path {d}/tmp;
  proxy_temp_path {d}/tmp;
  fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp;
  scgi_temp_path {d}/tmp;
  proxy_cache_path {d}/cache levels=1:2 keys_zone=blocks:10m max_size=1g inactive=1h use_temp_path=off;
  server {{
    listen 127.0.0.3:{port};
    location / {{
      proxy_pass http://$http_host;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Range $http_range;
      proxy_cache blocks;
      proxy_cache_key $host$request_uri$http_range;
      proxy_cache_valid 200 206 1h;
      proxy_cache_lock on;
    }}
  }}
}}
""")
    proc = subprocess.Popen([NGINX, "-p", str(d), "-c", str(conf)], stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: proc.poll() is not None or _listening("127.0.0.3", port), 10 * SLOW, "nginx to listen")
        if proc.poll() is not None:
            pytest.fail(f"nginx exited: {proc.stderr.read()}")
        yield f"http://127.0.0.3:{port}", d / "access.log"
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _listening(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def test_second_node_reads_from_the_proxy_and_the_token_stays_home(hub, caching_proxy, scenarios, tmp_path):
    h, root = hub
    proxy, log = caching_proxy
    sdir, info = scenarios["v1"]
    uri, _ = add_bucket(root, "v1", sdir)
    host = h.endpoint.split("//")[1].split(":")[0]
    expected = sdir / "expected" / str(info["latest"])
    names = sorted(p.name for p in expected.iterdir() if p.is_file())

    def node(n):
        env = hf_env(h, tmp_path / f"cache{n}", token=TOKEN)  # each node its own block cache
        env.update(http_proxy=proxy, HTTPS_PROXY=proxy, NO_PROXY=host, no_proxy=host)
        before = h.stats()["cdn_bytes"]
        with mounted(uri, tmp_path / f"mnt{n}", "poll=60", "block_size=65536", "materialize_max=0", env=env) as m:
            for name in names:
                assert read_file(m.path(name)) == (expected / name).read_bytes(), name
        return h.stats()["cdn_bytes"] - before

    first = node(1)
    assert first > 0, "the first node fetched nothing from the CDN"
    second = node(2)
    assert second == 0, f"the second node fetched {second} bytes from the CDN, not from the proxy"
    lines = log.read_text().splitlines()
    hits = [ln for ln in lines if ln.startswith("HIT ")]
    assert hits, "\n".join(lines[:20])
    assert all('"-"' == ln.split(" ")[3] for ln in lines), "a request through the proxy carried Authorization"
    assert TOKEN not in log.read_text()
    assert all(host not in ln.split(" ")[-1] for ln in lines), "a Hub API or resolver call went through the proxy"
