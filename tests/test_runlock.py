"""harness.runlock: one launch per run directory, stale locks of dead holders taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness.errors import SpecError
from harness.runlock import RunLock, read_holder


def lock_path(tmp_path):
    return tmp_path / "runs" / "demo" / "launch" / "run.lock"


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    path = lock_path(tmp_path)
    with RunLock(path):
        holder = read_holder(path)
        assert holder["pid"] == os.getpid() and holder["host"]
        with pytest.raises(SpecError) as err:
            RunLock(path).acquire()
        msg = err.value.message
        assert msg.startswith("run.name = 'demo': another launch holds this run directory")
        assert f"pid {os.getpid()}" in msg and holder["started"] in msg and str(path) in msg
    assert not path.exists()  # released on exit
    with RunLock(path):  # and can be taken again
        pass


def test_release_on_an_exception(tmp_path):
    path = lock_path(tmp_path)
    with pytest.raises(RuntimeError), RunLock(path):
        raise RuntimeError("boom")
    assert not path.exists()


def test_a_killed_holder_on_this_host_leaves_a_stale_lock_that_is_taken_over(tmp_path):
    path = lock_path(tmp_path)
    code = f"from harness.runlock import RunLock; import time; RunLock({str(path)!r}).acquire(); print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(SpecError, match=f"pid {proc.pid} "):
            RunLock(path).acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert path.exists()  # SIGKILL released nothing
        with RunLock(path):
            assert read_holder(path)["pid"] == os.getpid()
    finally:
        proc.kill()
        proc.wait()


def test_another_hosts_lock_is_stale_only_without_heartbeat(tmp_path):
    path = lock_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(SpecError, match="pid 1 on node-elsewhere since 2026-01-01"):
        RunLock(path, stale_after_s=60).acquire()
    old = time.time() - 120
    os.utime(path, (old, old))
    with RunLock(path, stale_after_s=60):
        assert read_holder(path)["host"] != "node-elsewhere"


def test_the_holder_heartbeats(tmp_path):
    path = lock_path(tmp_path)
    with RunLock(path, heartbeat_s=0.05):
        old = time.time() - 100
        os.utime(path, (old, old))
        deadline = time.monotonic() + 10
        while path.stat().st_mtime < old + 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.stat().st_mtime > old + 50
