"""Error answers from the Hub's CDN, against the mount (tests/hubserver.py's
fault injection): an error body of any size, shorter or longer than the range
asked, never lands in a data buffer (the read fails cleanly with EIO, or
succeeds after retries with exact bytes), and a retryable status is retried
whatever its body. Run under the ASan build too: Mount fails the test on any
sanitizer report in the daemon's log."""
import mmap
import os

import pytest

from test_http import DWSCTL, DWSFS, Mount, add_bucket, big_anchor_bucket, ctl, hf_env, read_all  # noqa: F401

BS = 65536
# empty, shorter than a block, a byte short of it, equal, a byte over, 1 MB
BODY_SIZES = [0, 1000, BS - 1, BS, BS + 1, 1_000_000]


@pytest.fixture(autouse=True)
def _need_binaries():
    if not (os.access(DWSFS, os.X_OK) and os.access(DWSCTL, os.X_OK)):
        pytest.skip("dwsfs/dwsctl not built")


def pread_direct(path, off, n=4096):
    """n bytes at off with O_DIRECT: the read reaches the daemon, not the page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, n)
        got = os.preadv(fd, [buf], off)
        return bytes(buf[:got])
    finally:
        os.close(fd)


@pytest.mark.parametrize("status", [404, 410, 403])
def test_final_error_body_of_any_size_is_a_clean_eio(hub, tmp_path, status):
    """Each body size on a block never read before: every CDN answer is the
    error (a 404/410 is resolved again once, then fails), the read is EIO;
    with the fault gone the same read gives the right bytes."""
    h, root = hub
    dst = root / "buckets" / "test" / "big"
    big_anchor_bucket(dst, tensors=4, mib=1)
    want = read_all(dst / "anchors" / "step_000001.safetensors")
    env = hf_env(h, tmp_path / "cache")
    with Mount("hf://buckets/test/big", tmp_path / "mnt", ["poll=60", f"block_size={BS}", "read_timeout=20",
                                                           "cache_size=0"], env=env) as m:
        f = m.mnt / "model.safetensors"
        for i, size in enumerate(BODY_SIZES):
            off = (8 + 4 * i) * BS + 123 * 4096 % BS  # a cold block, past the header
            h.set_faults({"class": "cdn", "kind": "status", "status": status, "count": 1000,
                          "body": "e" * size})
            with pytest.raises(OSError) as e:
                pread_direct(f, off)
            assert e.value.errno == 5, (size, e.value)
            h.clear_faults()
            assert pread_direct(f, off) == want[off:off + 4096], size
        assert "HTTP %d" % status in m.log()


@pytest.mark.parametrize("size", BODY_SIZES)
def test_retryable_status_retried_whatever_its_body(hub, tmp_path, size):
    """Two 503s with a body of each size on one block read: both retried
    (a body longer than the range asked once ended the read with 'the server
    sent more than the ... bytes asked for'), exact bytes after."""
    h, root = hub
    dst = root / "buckets" / "test" / "big"
    big_anchor_bucket(dst, tensors=2, mib=1)
    want = read_all(dst / "anchors" / "step_000001.safetensors")
    env = hf_env(h, tmp_path / "cache")
    with Mount("hf://buckets/test/big", tmp_path / "mnt", ["poll=60", f"block_size={BS}", "cache_size=0"],
               env=env) as m:
        off = 20 * BS + 4096
        h.set_faults({"class": "cdn", "kind": "status", "status": 503, "count": 2, "body": "x" * size})
        assert pread_direct(m.mnt / "model.safetensors", off) == want[off:off + 4096]
        assert h.stats()["faults_fired"] == 2


@pytest.mark.parametrize("status,size", [(410, 60), (404, 3000), (404, 1_000_000), (503, 40_000)])
def test_extract_survives_one_error_answer(hub, scenarios, tmp_path, status, size):
    """dwsctl extract with the first CDN answer for the anchor the latest
    step needs an error whose body is shorter or longer than the range (its
    header read asks 4 KiB): a 404/410 is resolved again, a 503 retried, and
    the output is exact."""
    h, root = hub
    sdir, info = scenarios["v1"]
    uri, _ = add_bucket(root, "v1", sdir)
    env = hf_env(h, tmp_path / "cache")
    h.set_faults({"class": "cdn", "kind": "status", "status": status, "count": 1, "body": "b" * size,
                  "match": "anchors/step_000010"})
    out = tmp_path / "out"
    p = ctl("extract", uri, out, env=env, check=False)
    assert p.returncode == 0, p.stderr
    for bad in ("AddressSanitizer", "runtime error"):
        assert bad not in p.stderr, p.stderr
    assert h.stats()["faults_fired"] == 1
    exp = sdir / "expected" / str(info["latest"])
    for name in os.listdir(exp):
        assert read_all(out / name) == read_all(exp / name), name
