"""Processes in tensor-parallel tests: is a process alive, wait until some are gone (the
`no_process_left` fixture is in conftest.py)."""
from __future__ import annotations

import time



def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout: float = 15.0) -> list[int]:
    """Wait up to `timeout` s for the processes to end; returns those still alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]
