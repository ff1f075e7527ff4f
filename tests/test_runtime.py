"""core.runtime: whether a process that left files behind still runs."""

import os
import subprocess
import sys
import time

import psutil

from napari_medclipsam.core.runtime import process_create_time, process_matches


def test_a_running_process_matches_only_with_its_own_start_time():
    started = process_create_time()
    assert started == psutil.Process().create_time()
    assert process_matches(os.getpid()) is True
    assert process_matches(os.getpid(), started) is True
    assert process_matches(os.getpid(), started - 3600) is False  # the pid, reused


def test_gone_zombie_and_invalid_pids_do_not_match():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    proc = psutil.Process(child.pid)
    deadline = time.monotonic() + 30
    while proc.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)  # exited, not reaped yet
    assert proc.status() == psutil.STATUS_ZOMBIE
    assert process_matches(child.pid) is False  # a zombie runs nothing
    child.wait()
    assert process_matches(child.pid) is False and process_create_time(child.pid) is None
    assert process_matches("not a pid") is False
