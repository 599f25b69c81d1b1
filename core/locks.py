"""Exclusive use of output folders by one process at a time (fcntl.flock, released by the kernel
when the holder exits, even by kill -9), so two runs of a stage cannot interleave their writes."""
from __future__ import annotations

import fcntl
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from core.errors import InputError


class Busy(InputError):
    """Another process holds a folder this run would write; names the folder, its params key and the holder."""


def lock_file(folder: Path) -> Path:
    """The lock beside `folder` (not inside: stages swap their output folders into place)."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def _hold(key: str, folder: Path) -> Iterator[None]:
    path = lock_file(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise Busy(f"{key}: {folder} is in use by {holder}; wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({' '.join(sys.argv)}, since {time.strftime('%H:%M:%S')})".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a waiting run)


@contextmanager
def exclusive(folders: dict[str, Path]) -> Iterator[None]:
    """Hold every folder of {params key: folder} for this process, or raise Busy naming the one in use."""
    held = {}
    for key, folder in folders.items():  # two keys may name one folder: lock it once
        held.setdefault(lock_file(Path(folder)), (key, Path(folder)))
    with ExitStack() as stack:
        for key, folder in held.values():
            stack.enter_context(_hold(key, folder))
        yield
