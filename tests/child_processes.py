"""Child processes of a process under test, read from /proc (Linux): which of them holds a GPU, whether one still
runs; and stopping a process under test once it has reached a given point."""
from __future__ import annotations

import os
import re
import subprocess
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name: state, parent id, ..."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2:].split()


def gpu_child(parent: int, *words: str) -> int | None:
    """The id of a child of ``parent`` whose command line holds every one of ``words``, once it has opened a GPU
    (a /dev/nvidiaN device: its CUDA context); None while there is none."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(_stat(pid)[1]) != parent:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().decode(errors="replace").replace("\0", " ")
            if not all(w in command for w in words):
                continue
            opened = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except (OSError, ValueError, IndexError):  # it ended meanwhile
            continue
        if any(re.fullmatch(r"/dev/nvidia\d+", path) for path in opened):
            return int(pid)
    return None


def running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return _stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def stopped_when(proc: subprocess.Popen, ready: Callable[[], T | None], stop: Callable[[T], None],
                 wait_s: float = 300.0) -> tuple[str, T]:
    """Waits (at most ``wait_s``, while ``proc`` runs) until ``ready()`` gives something, calls ``stop`` with it (a
    signal to proc or to one of its children), and returns (proc's output once it ended, that something). proc is
    killed if anything here fails."""
    try:
        deadline = time.monotonic() + wait_s
        while (found := ready()) is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.02)
        stop(found)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return output, found


def assert_ends(pid: int, what: str, wait_s: float = 30.0) -> None:
    """Process ``pid`` (``what`` names it) ends within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while running(pid):
        assert time.monotonic() < deadline, f"{what} {pid} outlived its parent"
        time.sleep(0.1)
