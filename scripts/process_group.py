"""Process groups the launcher owns: stop them (SIGTERM, then SIGKILL) and prove by pid that nothing is left.

Processes are found by process group id and by parentage, never by name. A snapshot records (pid, start time)
pairs, so a pid the kernel reuses later is never mistaken for ours.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable

import psutil

ProcessKey = tuple[int, float]  # (pid, create_time): unique across pid reuse


def group_members(pgids: Iterable[int]) -> list[psutil.Process]:
    wanted = set(pgids)
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) in wanted:
                found.append(proc)
        except (ProcessLookupError, PermissionError):
            continue
    return found


def snapshot(pgids: Iterable[int], leader_pids: Iterable[int]) -> set[ProcessKey]:
    """Every live process in `pgids` plus every descendant of `leader_pids` (some servers call setsid)."""
    procs = group_members(pgids)
    for pid in leader_pids:
        try:
            leader = psutil.Process(pid)
            procs += [leader, *leader.children(recursive=True)]
        except psutil.Error:
            continue
    keys = set()
    for proc in procs:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                keys.add((proc.pid, proc.create_time()))
        except psutil.Error:
            continue
    return keys


def alive(keys: Iterable[ProcessKey]) -> list[psutil.Process]:
    """The processes of a snapshot that still run (zombies count as gone: they hold nothing but a pid)."""
    left = []
    for pid, created in keys:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.Error:
            continue
    return left


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_groups(pgids: list[int], keys: set[ProcessKey], timeout: float) -> list[psutil.Process]:
    """SIGTERM the groups, wait up to `timeout` for the snapshot to go, SIGKILL the rest; list survivors."""
    for pgid in pgids:
        signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(keys) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive(keys)
    if left:
        for pgid in pgids:
            signal_group(pgid, signal.SIGKILL)
        for proc in left:
            try:
                proc.kill()  # descendants that left the group
            except psutil.Error:
                continue
        psutil.wait_procs(left, timeout=5)
    return alive(keys)
