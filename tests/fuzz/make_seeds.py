#!/usr/bin/python3
"""Write seed corpora for the libFuzzer targets from the project's generators.

    make_seeds.py OUT

OUT/fuzz_header/   small .safetensors files (every scenario of gen_bucket.py and
                   every case of gen_malformed.py)
OUT/fuzz_delta/    the same files (the sparse ones are what it decodes; the dense
                   ones exercise the refusals)
OUT/fuzz_skyrl/    SkyRL manifests with a payload file, OUT/fuzz_miles/ miles indexes
                   with a shard (tests/fuzz/xor_seeds.py): valid and malformed
OUT/fuzz_zstd/     small .safetensors.zst files, zstd bombs (a valid delta or anchor
                   followed by zeros, with and without the frame's content size),
                   plus zstd-compressed copies of the malformed cases when the zstd
                   tool is installed

Only files under 64 KiB (the fuzzers' -max_len) are kept. Each seed is named by
its SHA-1, so identical files (the same anchor in several scenarios) are kept once.
Needs Debian's /usr/bin/python3 with numpy, like the generators.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
MAX_LEN = 64 * 1024
TARGETS = ("fuzz_header", "fuzz_delta", "fuzz_zstd", "fuzz_skyrl", "fuzz_miles")

sys.path.insert(0, TESTS)
import gen_malformed  # noqa: E402 - the tests' folder is put on the path first
sys.path.insert(0, HERE)
import xor_seeds  # noqa: E402


def run(args):
    subprocess.run([sys.executable] + args, check=True, stdout=subprocess.DEVNULL)


def scenarios():
    out = subprocess.run([sys.executable, os.path.join(TESTS, "gen_bucket.py"), "--list"],
                         check=True, capture_output=True, text=True).stdout
    return [s.strip() for s in out.split() if s.strip()]


def files_under(root, suffix):
    for d, _, names in os.walk(root):
        for n in sorted(names):
            if n.endswith(suffix):
                p = os.path.join(d, n)
                if os.path.getsize(p) < MAX_LEN:
                    yield p


def add(outdir, data):
    name = hashlib.sha1(data).hexdigest()
    path = os.path.join(outdir, name)
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(data)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        sys.exit(__doc__)
    out = argv[0]
    for t in TARGETS:
        os.makedirs(os.path.join(out, t), exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="dwsfs-seeds-") as tmp:
        for s in scenarios():
            run([os.path.join(TESTS, "gen_bucket.py"), os.path.join(tmp, "bucket", s), "--scenario", s])
        run([os.path.join(TESTS, "gen_malformed.py"), os.path.join(tmp, "malformed")])

        for p in files_under(tmp, ".safetensors"):
            data = open(p, "rb").read()
            add(os.path.join(out, "fuzz_header"), data)
            add(os.path.join(out, "fuzz_delta"), data)
        for p in files_under(tmp, ".safetensors.zst"):
            add(os.path.join(out, "fuzz_zstd"), open(p, "rb").read())

        # zstd bombs small enough to be seeds (the corpus's 2 GiB ones are
        # past -max_len): one zero byte too many, and 64 MiB of them
        for blob in (gen_malformed.gap_delta(), gen_malformed.ANCHOR_BLOB):
            for zeros in (1, 64 << 20):
                for sized in (False, True):
                    add(os.path.join(out, "fuzz_zstd"), gen_malformed.zstd_frame(
                        blob, zeros, content_size=len(blob) + zeros if sized else None))

        # more zstd seeds: the (small) malformed files, compressed with and
        # without a checksum, so the decompressed header path sees them too
        zstd = shutil.which("zstd")
        if zstd:
            for p in files_under(os.path.join(tmp, "malformed"), ".safetensors"):
                for extra in (["--no-check"], ["--check"]):
                    r = subprocess.run([zstd, "-q", "-c", "-3"] + extra + [p],
                                       check=True, capture_output=True)
                    if len(r.stdout) < MAX_LEN:
                        add(os.path.join(out, "fuzz_zstd"), r.stdout)

    for t, blobs in xor_seeds.seeds().items():
        for data in blobs:
            add(os.path.join(out, t), data)

    for t in TARGETS:
        n = len(os.listdir(os.path.join(out, t)))
        print(f"{t}: {n} seeds")
        if n == 0:
            sys.exit(f"make_seeds.py: no seeds for {t}")


if __name__ == "__main__":
    main()
