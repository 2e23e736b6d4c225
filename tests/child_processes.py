"""Child processes of a process under test, read from /proc (Linux): which of them holds a GPU, and whether
one still runs."""
from __future__ import annotations

import os
import re


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
