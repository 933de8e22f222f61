"""The on_swap hook one can rely on (docs/inference.md): its environment
(DWSFS_STEP, DWSFS_PREV_STEP, DWSFS_STEP_DIR that stays that step while it
runs, DWSFS_PATCH from the step the server holds), one run at a time with
the newest step queued, a timeout that kills it, its output in the log and
its result in the status."""
import json
import os
import time
from pathlib import Path

from mountutil import SLOW, mounted, read_status, wait_until
from test_mount import publish, root_no_base
from test_patches import check

LIVE = ("poll=1", "swap_idle=0.1")


def test_environment_and_patch(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    expected, s = root / "expected", info["steps"]
    bucket, rec = tmp_path / "bucket", tmp_path / "runs"
    rec.mkdir()
    publish(dwsctl, None, expected / str(s[0]), bucket, s[0], "anchor")
    # the hook copies what it is given while it runs: the step folder's file
    # and the patch
    hook = (f'd={rec}/$DWSFS_STEP; mkdir $d; env | grep ^DWSFS_ > $d/env; '
            f'cp "$DWSFS_STEP_DIR/model.safetensors" $d/model; '
            f'[ -n "$DWSFS_PATCH" ] && cp "$DWSFS_PATCH" $d/patch; echo done')
    mnt = tmp_path / "mnt"
    with mounted(bucket, mnt, *LIVE, f"on_swap={hook}") as m:
        for prev, cur in zip(s, s[1:3]):
            publish(dwsctl, expected / str(prev), expected / str(cur), bucket, cur)
            m.wait_step(cur, 10 * SLOW)
            wait_until(lambda: (lambda st: st["on_swap_last_step"] == cur and not st["on_swap_running"])(read_status(m.mnt)),
                       10 * SLOW, f"the hook's run for step {cur}")
            st = read_status(m.mnt)
            assert st["on_swap_last_exit"] == 0 and st["on_swap_last_ms"] >= 0, st
            d = rec / str(cur)
            env = dict(line.split("=", 1) for line in (d / "env").read_text().splitlines())
            assert env["DWSFS_STEP"] == str(cur) and env["DWSFS_PREV_STEP"] == str(prev), env
            assert env["DWSFS_STEP_DIR"] == f"{os.path.realpath(mnt)}/steps/{cur:06d}", env
            assert env["DWSFS_PATCH"] == f"{os.path.realpath(mnt)}/.dwsfs/patches/{prev:06d}-{cur:06d}.safetensors"
            assert (d / "model").read_bytes() == root_no_base(bucket, expected, cur)
            check(d / "patch", expected, prev, cur)
        assert f"on_swap (step {s[2]}): done" in m.log()


def test_one_run_at_a_time_newest_queued(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    expected, s = root / "expected", info["steps"]
    bucket, rec = tmp_path / "bucket", tmp_path / "runs.txt"
    publish(dwsctl, None, expected / str(s[0]), bucket, s[0], "anchor")
    hook = f'echo start $DWSFS_STEP $(date +%s.%N) >> {rec}; sleep 2; echo end $DWSFS_STEP $(date +%s.%N) >> {rec}'
    with mounted(bucket, tmp_path / "mnt", *LIVE, f"on_swap={hook}") as m:
        for prev, cur in zip(s, s[1:5]):
            publish(dwsctl, expected / str(prev), expected / str(cur), bucket, cur)
            m.wait_step(cur, 10 * SLOW)
        wait_until(lambda: (lambda st: st["on_swap_last_step"] == s[4] and not st["on_swap_running"])(read_status(m.mnt)),
                   30 * SLOW, "the last run")
    events = [ln.split() for ln in rec.read_text().splitlines()]
    running = 0
    for kind, _step, _t in events:
        running += 1 if kind == "start" else -1
        assert running in (0, 1), events       # never two at once
    steps_run = [int(st) for kind, st, _ in events if kind == "start"]
    assert steps_run[0] == s[1] and steps_run[-1] == s[4], steps_run
    assert steps_run == sorted(steps_run) and len(steps_run) < 4, steps_run  # some were skipped
    assert "skipped" in m.log()


def test_timeout_kills_the_run(dwsctl, scenarios, tmp_path):
    root, info = scenarios["gaps"]
    expected, s = root / "expected", info["steps"]
    bucket = tmp_path / "bucket"
    publish(dwsctl, None, expected / str(s[0]), bucket, s[0], "anchor")
    with mounted(bucket, tmp_path / "mnt", *LIVE, "on_swap=echo hello; sleep 60 & sleep 60", "on_swap_timeout=1s",
                 allowed_errors=[r"on_swap .*"]) as m:
        publish(dwsctl, expected / str(s[0]), expected / str(s[1]), bucket, s[1])
        m.wait_step(s[1], 10 * SLOW)
        t0 = time.monotonic()
        wait_until(lambda: read_status(m.mnt)["on_swap_last_step"] == s[1], 10 * SLOW, "the killed run")
        st = read_status(m.mnt)
        assert st["on_swap_last_exit"] == 124 and 900 <= st["on_swap_last_ms"] < 5000 * SLOW, st
        assert time.monotonic() - t0 < 8 * SLOW
    assert f"on_swap (step {s[1]}): hello" in m.log() and "killed after its timeout" in m.log()


def test_secrets_kept_from_the_hook(dwsctl, scenarios, tmp_path):
    """on_swap gets none of the credentials in the daemon's environment (the
    container agent's token among them) unless on_swap_keep_secrets."""
    root, info = scenarios["gaps"]
    expected, s = root / "expected", info["steps"]
    bucket, rec = tmp_path / "bucket", tmp_path / "env.txt"
    publish(dwsctl, None, expected / str(s[0]), bucket, s[0], "anchor")
    secrets = {"HF_TOKEN": "hf_x", "AWS_SESSION_TOKEN": "st", "AWS_CONTAINER_AUTHORIZATION_TOKEN": "agent"}
    with mounted(bucket, tmp_path / "mnt", *LIVE, f"on_swap=env > {rec}", env=dict(secrets, HOOK_TEST_MARK="1")) as m:
        publish(dwsctl, expected / str(s[0]), expected / str(s[1]), bucket, s[1])
        m.wait_step(s[1], 10 * SLOW)
        wait_until(lambda: (lambda st: st["on_swap_last_step"] == s[1] and not st["on_swap_running"])(read_status(m.mnt)),
                   10 * SLOW, "the hook's run")
    names = {line.split("=", 1)[0] for line in rec.read_text().splitlines()}
    assert "HOOK_TEST_MARK" in names and not names & set(secrets), names
