"""Process-session helpers for the tests that start servers and clusters (Prefect, Ray nodes): every
child is started with start_new_session=True, and teardown must leave none of its processes behind."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`: the child and everything it started, whatever
    process groups they made."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, IndexError):
            continue
        if int(session) == sid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(sid: int, timeout: float = 10) -> None:
    """SIGKILL every process of session `sid` until none is left (or `timeout` passes)."""
    deadline = time.monotonic() + timeout
    while (pids := session_pids(sid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
