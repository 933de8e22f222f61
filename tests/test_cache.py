"""The block cache of remote buckets on disk (src/remote.c, src/cache_dir.c):
its folders are opened without following links and refused when another user
could change them; each block file is bound to its object and block number;
a block changed on disk is never served; the bytes on disk stay under
cache_size. Against the loopback Hub, as in test_http.py."""
import mmap
import os
import subprocess
import threading
import time

from test_http import DWSFS, Mount, big_anchor_bucket, hf_env, read_all, wait_until
from test_http import _need_binaries  # noqa: F401 (a fixture)

BS = 1 << 20
URI = "hf://buckets/test/big"


def anchor(root, mib=4):
    """The one-anchor bucket `big` (8 tensors of `mib` MiB): its bytes."""
    dst = root / "buckets" / "test" / "big"
    big_anchor_bucket(dst, tensors=8, mib=mib)
    return read_all(dst / "anchors" / "step_000001.safetensors")


def start(mnt, opts, env, read=None):
    """dwsfs -f with `opts`: (exit code, stderr) when it refuses to start; when
    it mounts instead, reads `read` through it, unmounts and returns
    (None, its log)."""
    mnt.mkdir(exist_ok=True)
    logp = mnt.parent / (mnt.name + ".log")
    with open(logp, "w") as logf:
        p = subprocess.Popen([DWSFS, "-f", URI, str(mnt), "-o", ",".join(opts)], stderr=logf, env=env)
    deadline = time.monotonic() + 30
    while not os.path.ismount(mnt):
        if p.poll() is not None:
            return p.returncode, logp.read_text()
        if time.monotonic() > deadline:
            p.kill()
            p.wait(10)
            raise AssertionError(f"neither mounted nor refused after 30 s: {logp.read_text()}")
        time.sleep(0.02)
    try:
        if read:
            read_all(mnt / read)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30)
        p.wait(20)
    return None, logp.read_text()


def assert_refused(rc, out, cache, why):
    lines = out.strip().splitlines()
    assert rc == 1, f"dwsfs started (exit {rc}) on a cache it should refuse ({why}): {out}"
    assert len(lines) == 1 and lines[0].startswith("dwsfs: ") and str(cache) in lines[0] and why in lines[0], out


def opts_for(cache, size="64M"):
    return ["poll=60", f"block_size={BS}", f"cache_size={size}", f"cache_dir={cache}"]


# ---------------------------------------------------------------- F6: the folders

def test_cache_tmp_symlink_is_refused_and_not_followed(hub, tmp_path):
    """cache_dir/tmp a link to another folder: the start-up scan emptied that
    folder (it deleted the files of whatever tmp pointed to). Now the cache
    is refused with one line, and the other folder is untouched."""
    h, root = hub
    anchor(root, mib=1)
    cache, victim = tmp_path / "cache", tmp_path / "victim"
    cache.mkdir(mode=0o700)
    victim.mkdir()
    (victim / "canary").write_text("keep me")
    (cache / "tmp").symlink_to(victim)
    rc, out = start(tmp_path / "mnt", opts_for(cache), hf_env(h, cache))
    assert (victim / "canary").exists(), f"the scan deleted the files of the folder tmp links to ({out})"
    assert_refused(rc, out, cache, "tmp is a symbolic link")
    assert (cache / "tmp").is_symlink()  # left for its owner to look at


def test_cache_blocks_symlinks_are_refused_and_nothing_written_through(hub, tmp_path):
    """cache_dir/blocks, or a blocks/XX subfolder, a link to another folder:
    block files were written there. Now nothing is, and the cache is refused."""
    h, root = hub
    anchor(root, mib=1)
    for case in ("blocks", "blocks/XX"):
        cache, elsewhere = tmp_path / case.replace("/", "_"), tmp_path / ("elsewhere_" + case.replace("/", "_"))
        cache.mkdir(mode=0o700)
        elsewhere.mkdir()
        if case == "blocks":
            (cache / "blocks").symlink_to(elsewhere)
            why = "blocks is a symbolic link"
        else:  # every subfolder a block could go to
            (cache / "blocks").mkdir(mode=0o700)
            for i in range(256):
                (cache / "blocks" / f"{i:02x}").symlink_to(elsewhere)
            why = "is a symbolic link"
        rc, out = start(tmp_path / "mnt", opts_for(cache), hf_env(h, cache), read="model.safetensors")
        written = sorted(p.name for p in elsewhere.rglob("*"))
        assert not written, f"{case}: written through the link: {written[:3]} ({out})"
        assert_refused(rc, out, cache, why)


def test_cache_folder_owner_and_mode_checked(hub, tmp_path):
    """A cache_dir another user owns or could write to (or a link to one that
    another user made) is refused with one line; the daemon's own folder,
    0755 or reached through its own link, is taken."""
    h, root = hub
    want = anchor(root, mib=1)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    env = hf_env(h, cache)
    os.chown(cache, 65534, 65534)
    assert_refused(*start(tmp_path / "mnt", opts_for(cache), env), cache, "owned by uid 65534")
    os.chown(cache, os.geteuid(), os.getegid())
    for mode, why in ((0o777, "writable by others"), (0o770, "writable by its group")):
        os.chmod(cache, mode)
        assert_refused(*start(tmp_path / "mnt", opts_for(cache), env), cache, why)
    os.chmod(cache, 0o755)
    (cache / "blocks").mkdir(mode=0o777)
    os.chmod(cache / "blocks", 0o777)  # past the umask
    assert_refused(*start(tmp_path / "mnt", opts_for(cache), env), cache, "blocks is writable by others")
    os.chmod(cache / "blocks", 0o700)
    link = tmp_path / "link"
    link.symlink_to(cache)
    os.lchown(link, 65534, 65534)
    assert_refused(*start(tmp_path / "mnt", opts_for(link), env), link, "a symbolic link owned by uid 65534")
    os.lchown(link, os.geteuid(), os.getegid())
    with Mount(URI, tmp_path / "mnt", opts_for(link), env=env) as m:
        assert read_all(m.mnt / "model.safetensors") == want
    assert list((cache / "blocks").rglob("*.blk"))


# ---------------------------------------------------------------- F7: the blocks

def object_blocks(cache):
    """{block number: path} of the object with the most blocks in the cache."""
    by = {}
    for p in (cache / "blocks").rglob("*.blk"):
        ident, blk = p.stem.rsplit("-", 1)
        by.setdefault(ident, {})[int(blk)] = p
    return max(by.values(), key=len, default={})


def test_swapped_block_files_are_refetched(hub, tmp_path):
    """Two block files of one object swapped on disk between two mounts: each
    is whole and checks out by itself, but it is not the block asked for.
    Served as they were (wrong bytes); now refetched."""
    h, root = hub
    want = anchor(root)
    cache = tmp_path / "cache"
    env = hf_env(h, cache)
    with Mount(URI, tmp_path / "mnt", opts_for(cache), env=env) as m:
        assert read_all(m.mnt / "model.safetensors") == want
    blocks = object_blocks(cache)
    nblk = (len(want) + BS - 1) // BS
    a, b = [k for k in sorted(blocks) if 0 < k < nblk - 1][:2]  # whole blocks of the data
    pa, pb = blocks[a], blocks[b]
    tmp = pa.with_suffix(".swap")
    pa.rename(tmp)
    pb.rename(pa)
    tmp.rename(pb)
    with Mount(URI, tmp_path / "mnt", opts_for(cache), env=env) as m:
        got = read_all(m.mnt / "model.safetensors")
        assert got[a * BS:(a + 1) * BS] == want[a * BS:(a + 1) * BS], f"block {a}: the bytes of another block"
        assert got == want
        assert m.log().count("bad on disk") >= 2, m.log()


def direct_read(path, off, n):
    """n bytes at off with O_DIRECT: the read reaches the daemon."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, n)  # page aligned
        got = os.preadv(fd, [buf], off)
        return bytes(buf[:got])
    finally:
        os.close(fd)


def test_block_changed_on_disk_after_its_check_is_refetched(hub, tmp_path):
    """Blocks written (so checked) by this process, then changed on disk:
    they were served as they were. Now a read of part of one (a random read,
    read from the file) and a sequential pass (its blocks loaded whole into
    memory, by the reader or read ahead) get the right bytes, fetched again."""
    h, root = hub
    want = anchor(root)
    cache = tmp_path / "cache"
    env = hf_env(h, cache)
    nblk = (len(want) + BS - 1) // BS
    with Mount(URI, tmp_path / "mnt", opts_for(cache), env=env) as m:
        f = m.mnt / "model.safetensors"
        assert read_all(f) == want
        wait_until(lambda: len(object_blocks(cache)) + m.status()["cache_unkept_blocks"] == nblk, 20,
                   "every block on disk or not kept")
        # blocks 1-20: long out of the hot set (the last ~11 of 33 read are in it)
        changed = [k for k in sorted(object_blocks(cache).items()) if 1 <= k[0] <= 20]
        assert len(changed) >= 10, changed
        for _, p in changed:
            with open(p, "r+b") as fh:
                fh.seek(BS // 2)
                byte = fh.read(1)
                fh.seek(BS // 2)
                fh.write(bytes([byte[0] ^ 0xFF]))
        k = changed[0][0]
        off = k * BS + BS // 2 - 4096  # far from the last read: no readahead
        assert direct_read(f, off, 8192) == want[off:off + 8192], f"block {k}: a changed byte served"
        got = b"".join(direct_read(f, o, BS) for o in range(0, len(want), BS))
        bad = [b for b in range(nblk) if got[b * BS:(b + 1) * BS] != want[b * BS:(b + 1) * BS]]
        assert not bad, f"blocks {bad}: changed bytes served"
        assert m.log().count("bad on disk") >= len(changed), m.log()


# ---------------------------------------------------------------- the cap

def test_cache_never_passes_cache_size(hub, tmp_path):
    """A cache_size of three blocks and a read of 32: the block files on disk
    (what du counts of them, and their sizes) and the status's cache_bytes
    stay under cache_size during the read and after. Blocks waiting for the
    writers were made room for when fetched but counted only once written:
    the blocks fetched meanwhile made room for themselves alone, and the
    cache went past its cap."""
    h, root = hub
    want = anchor(root)
    cache = tmp_path / "cache"
    cap = 3 * (BS + 4096)  # three blocks with their trailers: not four
    env = hf_env(h, cache)
    worst = {"du": 0, "size": 0, "status": 0}
    stop = threading.Event()

    def on_disk():
        du = size = 0
        for p in (cache / "blocks").rglob("*.blk"):
            try:
                st = p.stat()
            except FileNotFoundError:  # evicted meanwhile
                continue
            du += st.st_blocks * 512
            size += st.st_size
        return du, size

    def watch():
        for _ in range(20000):  # bounded: ~2 ms a round
            du, size = on_disk()
            worst["du"], worst["size"] = max(worst["du"], du), max(worst["size"], size)
            if stop.is_set():
                return
            time.sleep(0.001)

    with Mount(URI, tmp_path / "mnt", opts_for(cache, str(cap)), env=env) as m:
        f = m.mnt / "model.safetensors"
        t = threading.Thread(target=watch)
        t.start()
        try:
            with open(f, "rb") as fh:
                got = b""
                while chunk := fh.read(BS):
                    got += chunk
                    worst["status"] = max(worst["status"], m.status()["cache_bytes"])
            assert got == want
            # again, past the page cache: blocks back from the disk or fetched
            for o in range(0, len(want), BS):
                assert direct_read(f, o, BS) == want[o:o + BS], o
                worst["status"] = max(worst["status"], m.status()["cache_bytes"])
        finally:
            stop.set()
            t.join(60)
        st = m.status()
    du, size = on_disk()  # the writers drained at the unmount
    assert not t.is_alive()
    assert max(worst.values()) <= cap and max(du, size, st["cache_bytes"]) <= cap, (cap, worst, du, size, st)
