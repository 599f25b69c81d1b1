"""Watchdog of a stage command: once the command's process is gone (also by kill -9, which runs no
cleanup), kill every process it had started: process-pool workers, the temporary Prefect server,
Ray's processes. Started by `flows.common.stage_command`; not meant to be run by hand.

    python -m flows.reaper PID
"""
from __future__ import annotations

import sys
import time

import psutil


def watch(pid: int, every: float = 0.5) -> list[int]:
    """Track `pid`'s descendants until it exits, then kill those still alive; returns their pids."""
    try:
        main = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    me, known = psutil.Process().pid, {}
    while True:
        try:
            if main.status() == psutil.STATUS_ZOMBIE:
                break
            now = {p.pid: p for p in main.children(recursive=True) if p.pid != me}
        except psutil.NoSuchProcess:
            break
        known = {pid: p for pid, p in known.items() if p.is_running()} | now  # is_running: pid not reused
        time.sleep(every)
    alive = [p for p in known.values() if p.is_running()]
    for p in alive:  # their own children first would leave orphans for a moment: kill all, then wait
        try:
            alive += [c for c in p.children(recursive=True) if c not in alive]
        except psutil.NoSuchProcess:
            pass
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in alive]


if __name__ == "__main__":
    watch(int(sys.argv[1]))
