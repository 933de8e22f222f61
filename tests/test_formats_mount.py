"""SkyRL and miles folders mounted like TRL buckets: the root is the base
folder at the latest version, steps/NNNNNN every version, .dwsfs/status; new
versions taken, a bad one never served (last_error names it) and its
corrected upload taken by itself; local folders, s3:// and hf://."""
import json
import os
import shutil
from pathlib import Path

import pytest

import dwsref
import xorgen
from mountutil import mounted, read_file, read_status, wait_until
from test_formats import xscen  # noqa: F401  (fixture)
from test_http import Mount, add_bucket, ctl, hf_env, read_mmap, s3, s3_env, s3_put_tree, same_tree  # noqa: F401


def same_as(mnt, expected):
    for p in Path(expected).iterdir():
        assert read_file(os.path.join(mnt, p.name)) == p.read_bytes(), f"{mnt}/{p.name} differs from {expected}"


def install(src_bucket, dst_bucket, folder):
    """A version's folder as a producer writes it: payloads, then the index."""
    src, dst = Path(src_bucket) / folder, Path(dst_bucket) / folder
    dst.mkdir()
    idx = [p for p in src.iterdir() if p.suffix == ".json"]
    for p in sorted(src.iterdir()):
        if p not in idx:
            shutil.copy2(p, dst / p.name)
    for p in idx:
        shutil.copy2(p, dst / (p.name + ".tmp"))
        os.rename(dst / (p.name + ".tmp"), dst / p.name)


@pytest.mark.parametrize("name", ["skyrl", "miles"])
def test_mount_presents_versions_as_steps(xscen, tmp_path, name):  # noqa: F811
    sdir, info = xscen[name]
    with mounted(info["bucket"], tmp_path / "mnt", f"base={sdir / 'base'}", "poll=200ms") as m:
        st = m.status()
        assert st["step"] == info["latest"] and st["latest_step"] == info["latest"], st
        same_as(m.mnt, sdir / "expected" / str(info["latest"]))
        assert sorted(os.listdir(m.path("steps"))) == ["%06d" % v for v in info["versions"]]
        for v in info["versions"]:
            same_as(m.path("steps", "%06d" % v), sdir / "expected" / str(v))


def test_mount_takes_new_versions_refuses_a_bad_one_and_its_correction(xscen, tmp_path):  # noqa: F811
    """Version 4 arrives with version 5, whose checksum is wrong, and 6 on
    top of it: the root takes 4 and stays there, last_error names version
    5, its tensor and the reason (the swap to 4 does not clear it), 5 and 6
    are not served; the corrected upload is taken."""
    sdir, info = xscen["skyrl"]
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    for v in (1, 2, 3):
        install(info["bucket"], bucket, "delta-%08d" % v)
    with mounted(bucket, tmp_path / "mnt", f"base={sdir / 'base'}", "poll=100ms", "swap_idle=0",
                 allowed_errors=(r"version 5",)) as m:
        assert m.status()["step"] == 3
        # version 5 with a wrong checksum, published with 4 and 6
        stage = tmp_path / "stage"
        shutil.copytree(Path(info["bucket"]) / "delta-00000005", stage / "delta-00000005")
        man = stage / "delta-00000005" / "manifest.json"
        d = json.loads(man.read_text())
        bad = d["tensors"][0]["name"]
        d["tensors"][0]["checksum"] = "f" * 32
        man.write_text(json.dumps(d))
        stage4 = tmp_path / "stage4"
        for folder, src in (("delta-00000004", info["bucket"]), ("delta-00000005", stage),
                            ("delta-00000006", info["bucket"])):
            install(src, stage4, folder) if stage4.exists() else (stage4.mkdir(), install(src, stage4, folder))
        for folder in ("delta-00000004", "delta-00000005", "delta-00000006"):  # one poll sees all three
            os.rename(stage4 / folder, bucket / folder)
        m.wait_step(4, 20)
        same_as(m.mnt, sdir / "expected" / "4")
        err = wait_until(lambda: read_status(m.mnt)["last_error"], 20, "last_error")
        assert "version 5" in err and bad in err and "checksum mismatch" in err, err
        assert read_status(m.mnt)["step"] == 4
        assert not os.path.exists(m.path("steps", "000005")) and not os.path.exists(m.path("steps", "000006"))
        same_as(m.mnt, sdir / "expected" / "4")
        # the corrected upload: taken by itself
        good = Path(info["bucket"]) / "delta-00000005" / "manifest.json"
        tmp = bucket / "delta-00000005" / "manifest.json.tmp"
        shutil.copy2(good, tmp)
        os.rename(tmp, bucket / "delta-00000005" / "manifest.json")
        m.wait_step(6, 20)
        same_as(m.mnt, sdir / "expected" / "6")
        same_as(m.path("steps", "000005"), sdir / "expected" / "5")
        assert not read_status(m.mnt)["last_error"]


def test_s3_skyrl_extract_and_mount(s3, xscen, tmp_path):  # noqa: F811
    """SkyRL publishes to s3:// prefixes."""
    sdir, info = xscen["skyrl"]
    s3_put_tree(s3, info["bucket"], "sync")
    env = s3_env(s3, tmp_path / "cache")
    for v in info["versions"]:
        out = tmp_path / f"out{v}"
        ctl("extract", "s3://grpo/sync", out, "--step", v, "--base", sdir / "base", env=env)
        assert dwsref.diff_folders(out, sdir / "expected" / str(v)) is None, v
    with Mount("s3://grpo/sync", tmp_path / "mnt", ["poll=1", f"base={sdir / 'base'}"], env=env) as m:
        same_tree(m.mnt, sdir / "expected" / str(info["latest"]), read_mmap)
        assert m.status()["step"] == info["latest"]


def test_hf_miles_extract_and_mount(hub, xscen, tmp_path):  # noqa: F811
    h, root = hub
    sdir, info = xscen["miles"]
    uri, _ = add_bucket(root, "miles", sdir)
    env = hf_env(h, tmp_path / "cache")
    for v in (1, 4, info["latest"]):
        out = tmp_path / f"out{v}"
        ctl("extract", uri, out, "--step", v, "--base", sdir / "base", env=env)
        assert dwsref.diff_folders(out, sdir / "expected" / str(v)) is None, v
    with Mount(uri, tmp_path / "mnt", ["poll=1", f"base={sdir / 'base'}"], env=env) as m:
        same_tree(m.mnt, sdir / "expected" / str(info["latest"]), read_mmap)
        assert m.status()["step"] == info["latest"]
