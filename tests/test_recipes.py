"""The shipped on_swap recipes (recipes/, docs/inference.md) against loopback
mocks of vLLM and SGLang that record each call, its order and its body, and
hold a model as numpy arrays: after each step the mock's model must be the
oracle's step, whether it came by a patch (applied with the vLLM extension's
own numpy functions, torch being absent here) or by a full reload."""
import json
import os
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from mountutil import SLOW, mounted, read_status, wait_until
from test_mount import publish
from test_patches import tensors

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
sys.path.insert(0, str(RECIPES))
import dwsfs_vllm  # noqa: E402

LIVE = ("poll=1", "swap_idle=0.1")
STORAGE = {1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}
SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def load_folder(folder):
    """{name: array of the tensor's bytes (unsigned ints of its width)}."""
    model = {}
    for p in sorted(Path(folder).glob("*.safetensors")):
        for name, (dtype, shape, data) in tensors(p.read_bytes()).items():
            model[name] = np.frombuffer(data, dtype=STORAGE[SIZES[dtype]]).reshape(shape).copy()
    return model


class Mock:
    """A loopback server: vLLM's /pause, /resume, /collective_rpc, or
    SGLang's /update_weights_from_disk. `fail` names calls to fail once."""

    def __init__(self, model):
        self.model, self.calls, self.paused, self.fail = model, [], False, set()
        self.lock = threading.Lock()
        mock = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                u = urlparse(self.path)
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n)) if n else None
                with mock.lock:
                    mock.calls.append((u.path, parse_qs(u.query), body))
                    code, answer = mock.answer(u.path, parse_qs(u.query), body)
                data = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def failing(self, what):
        if what in self.fail:
            self.fail.discard(what)
            return True
        return False

    def answer(self, path, query, body):
        if path == "/pause":
            self.paused = True
            return 200, {}
        if path == "/resume":
            self.paused = False
            return 200, {}
        if path == "/collective_rpc":
            method = body["method"]
            if not self.paused or self.failing(method):
                return 500, {"error": f"{method} refused"}
            if method == "reload_weights":
                self.model = load_folder(body["kwargs"]["weights_path"])
            elif method == "dwsfs_apply_patch":
                patch_path, step_dir = body["args"]
                patch = dwsfs_vllm.read_patch(patch_path)
                sparse, dense = dwsfs_vllm.plan(patch, step_dir)
                dwsfs_vllm.apply_to_arrays(dwsfs_vllm.Patch(patch.from_step, patch.to_step, sparse + dense),
                                           self.model)
            else:
                return 400, {"error": f"no method {method}"}
            return 200, {"results": [None]}
        if path == "/update_weights_from_disk":
            if self.failing("update"):
                return 400, {"success": False, "message": "Failed to update weights: boom"}
            self.model = load_folder(body["model_path"])
            return 200, {"success": True, "message": "Succeeded to update model weights."}
        return 404, {}


@pytest.fixture
def live(dwsctl, scenarios, tmp_path):
    """A bucket at its first step and a function publishing the next."""
    root, info = scenarios["gaps"]
    expected, s = root / "expected", info["steps"]
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, expected / str(s[0]), bucket, s[0], "anchor")

    def step(m, mock, i):
        publish(dwsctl, expected / str(s[i - 1]), expected / str(s[i]), bucket, s[i])
        m.wait_step(s[i], 10 * SLOW)
        wait_until(lambda: (lambda st: st["on_swap_last_step"] == s[i] and not st["on_swap_running"])(
            read_status(m.mnt)), 20 * SLOW, f"the hook's run for step {s[i]}")
        return read_status(m.mnt)["on_swap_last_exit"]
    return bucket, expected, s, step


def same_model(mock, expected, step):
    want = load_folder(expected / str(step))
    assert set(mock.model) == set(want)
    for name, a in want.items():
        assert mock.model[name].tobytes() == a.tobytes(), f"{name} differs from step {step}"


def calls_of(mock, start):
    return [(p, b["method"] if p == "/collective_rpc" else None) for p, _, b in mock.calls[start:]]


def test_vllm_patch_in_place(live, tmp_path):
    bucket, expected, s, step = live
    mock = Mock(load_folder(expected / str(s[0])))
    hook = f"on_swap={RECIPES}/vllm-patch.sh"
    try:
        with mounted(bucket, tmp_path / "mnt", *LIVE, hook, env={"VLLM_URL": mock.url},
                     allowed_errors=[r"on_swap \(step \d+\): .*"]) as m:
            mnt = os.path.realpath(m.mnt)
            for i in (1, 2):
                n = len(mock.calls)
                assert step(m, mock, i) == 0, m.log()
                assert calls_of(mock, n) == [("/pause", None), ("/collective_rpc", "dwsfs_apply_patch"),
                                             ("/resume", None)]
                path, query, body = mock.calls[n]
                assert query == {"mode": ["keep"], "clear_cache": ["true"]}, query
                assert mock.calls[n + 1][2]["args"] == [
                    f"{mnt}/.dwsfs/patches/{s[i - 1]:06d}-{s[i]:06d}.safetensors", f"{mnt}/steps/{s[i]:06d}"]
                same_model(mock, expected, s[i])
                assert not mock.paused
            # the patch fails on the server: the whole model is reloaded
            mock.fail = {"dwsfs_apply_patch"}
            n = len(mock.calls)
            assert step(m, mock, 3) == 0, m.log()
            assert calls_of(mock, n) == [("/pause", None), ("/collective_rpc", "dwsfs_apply_patch"),
                                         ("/collective_rpc", "reload_weights"), ("/resume", None)]
            assert mock.calls[n + 2][2]["kwargs"] == {"weights_path": f"{mnt}/steps/{s[3]:06d}"}
            same_model(mock, expected, s[3])
            assert "reloading the whole model" in m.log()
    finally:
        mock.close()


def test_vllm_reload_and_a_failed_reload(live, tmp_path):
    """A failed reload leaves the server paused (its weights are part old,
    part new) and the run failed; the next step's run loads it and resumes."""
    bucket, expected, s, step = live
    mock = Mock(load_folder(expected / str(s[0])))
    try:
        with mounted(bucket, tmp_path / "mnt", *LIVE, f"on_swap={RECIPES}/vllm-reload.sh",
                     env={"VLLM_URL": mock.url}, allowed_errors=[r"on_swap .*"]) as m:
            mnt = os.path.realpath(m.mnt)
            n = len(mock.calls)
            assert step(m, mock, 1) == 0, m.log()
            assert calls_of(mock, n) == [("/pause", None), ("/collective_rpc", "reload_weights"), ("/resume", None)]
            assert mock.calls[n + 1][2] == {"method": "reload_weights",
                                            "kwargs": {"weights_path": f"{mnt}/steps/{s[1]:06d}"}}
            same_model(mock, expected, s[1])
            mock.fail = {"reload_weights"}
            n = len(mock.calls)
            assert step(m, mock, 2) == 1
            assert calls_of(mock, n) == [("/pause", None), ("/collective_rpc", "reload_weights")]
            assert mock.paused and "stays paused" in m.log()
            assert step(m, mock, 3) == 0
            assert not mock.paused
            same_model(mock, expected, s[3])
    finally:
        mock.close()


def test_vllm_server_down(live, tmp_path):
    bucket, expected, s, step = live
    mock = Mock({})
    mock.close()           # nothing listens there now
    with mounted(bucket, tmp_path / "mnt", *LIVE, f"on_swap={RECIPES}/vllm-patch.sh",
                 env={"VLLM_URL": mock.url}, allowed_errors=[r"on_swap .*"]) as m:
        assert step(m, mock, 1) == 1
        assert "/pause?mode=keep&clear_cache=true: no answer: Failed to connect" in m.log()


def test_sglang_reload(live, tmp_path):
    bucket, expected, s, step = live
    mock = Mock(load_folder(expected / str(s[0])))
    try:
        with mounted(bucket, tmp_path / "mnt", *LIVE, f"on_swap={RECIPES}/sglang-reload.sh",
                     env={"SGLANG_URL": mock.url}, allowed_errors=[r"on_swap .*"]) as m:
            mnt = os.path.realpath(m.mnt)
            assert step(m, mock, 1) == 0, m.log()
            assert mock.calls == [("/update_weights_from_disk", {},
                                   {"model_path": f"{mnt}/steps/{s[1]:06d}", "weight_version": str(s[1])})]
            same_model(mock, expected, s[1])
            mock.fail = {"update"}
            assert step(m, mock, 2) == 1
            assert "HTTP 400" in m.log()
            assert step(m, mock, 3) == 0
            same_model(mock, expected, s[3])
    finally:
        mock.close()


def test_hooks_refuse_to_run_by_hand():
    env = {k: v for k, v in os.environ.items() if not k.startswith("DWSFS_")}
    for name in ("vllm-reload.sh", "vllm-patch.sh", "sglang-reload.sh"):
        p = subprocess.run([str(RECIPES / name)], env=env, capture_output=True, text=True, timeout=30)
        assert p.returncode == 2 and "on_swap hook" in p.stderr, (name, p.stderr)


# ---- the extension's numpy side ----

def write_st(path, entries, meta):
    """A safetensors file from [(name, dtype, shape, bytes)]."""
    head, off, data = {"__metadata__": meta}, 0, b""
    for name, dtype, shape, raw in entries:
        head[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        data += raw
    h = json.dumps(head).encode()
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + data)


def bf16(*vals):
    return (np.array(vals, dtype=np.float32).view(np.uint32) >> 16).astype("<u2")


def patch_meta(shapes):
    return {"format": "dwsfs_patch", "version": "1", "from_step": "1", "to_step": "2",
            "shapes": json.dumps(shapes)}


def test_plan_sends_what_vllm_cannot_take_sparse_dense(tmp_path):
    """vLLM reads NaN in a sparse patch as "unchanged", and takes sparse
    patches of floating tensors only: those go dense, read from the step."""
    step = tmp_path / "step"
    step.mkdir()
    a_new = bf16(1, float("nan"), 3, 4)
    b_new = np.array([7, 8, 9], dtype="<i8")
    c_new = bf16(0.5, 0.25, 2, 8, 1, 1).reshape(2, 3)
    write_st(step / "model.safetensors", [("a", "BF16", [4], a_new.tobytes()), ("b", "I64", [3], b_new.tobytes()),
                                          ("c", "BF16", [2, 3], c_new.tobytes())], {})
    ix = lambda *i: np.array(i, dtype="<i8").tobytes()  # noqa: E731
    write_st(tmp_path / "p.safetensors",
             [("a.indices", "I64", [1], ix(1)), ("a.values", "BF16", [1], bf16(float("nan")).tobytes()),
              ("b.indices", "I64", [1], ix(2)), ("b.values", "I64", [1], ix(9)),
              ("c.indices", "I64", [2], ix(0, 5)), ("c.values", "BF16", [2], bf16(0.5, 1).tobytes())],
             patch_meta({"a": [4], "b": [3], "c": [2, 3]}))
    p = dwsfs_vllm.read_patch(tmp_path / "p.safetensors")
    sparse, dense = dwsfs_vllm.plan(p, step)
    assert [e.name for e in sparse] == ["c"] and sorted(e.name for e in dense) == ["a", "b"]
    model = {"a": bf16(1, 2, 3, 4), "b": np.array([7, 8, 0], dtype="<i8"), "c": bf16(0, 0.25, 2, 8, 1, 0).reshape(2, 3)}
    dwsfs_vllm.apply_to_arrays(dwsfs_vllm.Patch(1, 2, sparse + dense), model)
    assert model["a"].tobytes() == a_new.tobytes() and model["b"].tolist() == [7, 8, 9]
    assert model["c"].tobytes() == c_new.tobytes()
    with pytest.raises(dwsfs_vllm.PatchError):
        dwsfs_vllm.plan(p, None)


@pytest.mark.parametrize("bad", ["truncated", "unsorted", "out_of_range", "no_shape", "wrong_model"])
def test_read_patch_refuses_bad_files(tmp_path, bad):
    ix = np.array([3, 1] if bad == "unsorted" else [1, 9 if bad == "out_of_range" else 3], dtype="<i8")
    shapes = {} if bad == "no_shape" else {"w": [4]}
    path = tmp_path / "p.safetensors"
    write_st(path, [("w.indices", "I64", [2], ix.tobytes()), ("w.values", "BF16", [2], bf16(1, 2).tobytes())],
             patch_meta(shapes))
    if bad == "truncated":
        path.write_bytes(path.read_bytes()[:-3])
    if bad == "wrong_model":
        p = dwsfs_vllm.read_patch(path)
        with pytest.raises(dwsfs_vllm.PatchError):
            dwsfs_vllm.apply_to_arrays(p, {"w": bf16(1, 2, 3, 4, 5)})
        return
    with pytest.raises(dwsfs_vllm.PatchError):
        dwsfs_vllm.read_patch(path)


def test_shell_recipes_pass_shellcheck():
    scripts = sorted(str(p) for p in RECIPES.glob("*.sh")) + [str(RECIPES.parent / "mount-helpers" / "mount.dwsfs")]
    p = subprocess.run(["shellcheck", "-x", "-s", "sh", *scripts], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_recipes_installed_run_where_they_land(tmp_path):
    """meson install puts them under share/dwsfs/recipes, each script
    finding its helpers next to itself."""
    build = Path(os.environ.get("DWSFS", "build/dwsfs")).resolve().parent
    dest = tmp_path / "dest"
    p = subprocess.run(["meson", "install", "-C", str(build), "--no-rebuild", "--destdir", str(dest)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    found = list(dest.rglob("share/dwsfs/recipes"))
    assert len(found) == 1, found
    d = found[0]
    assert {p.name for p in d.iterdir()} == {"vllm-reload.sh", "vllm-patch.sh", "sglang-reload.sh",
                                            "dwsfs-recipe-lib.sh", "vllm-common.sh", "dwsfs_vllm.py"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("DWSFS_")}
    r = subprocess.run([str(d / "vllm-patch.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "on_swap hook" in r.stderr, r.stderr
