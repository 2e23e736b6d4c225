"""Writing exports safely: the target directory is checked before anything is computed, the disk's free
space before anything is written, and every file or directory is written under a temporary name beside
its final one, then renamed: a full disk or an interrupt leaves the previous files as they were and no
truncated file behind."""
from __future__ import annotations

import os
import shutil
import tempfile


class NotEnoughSpace(ValueError):
    pass


def check_target_directory(directory: str, overwrite: bool) -> None:
    """Refuses a path that is a file, or a directory with files in it unless ``overwrite``."""
    if os.path.isfile(directory):
        raise ValueError(f"{directory} is a file; give a directory to write the export into")
    if os.path.isdir(directory) and os.listdir(directory) and not overwrite:
        raise ValueError(f"{directory} exists and is not empty; pass overwrite=True (--overwrite on the command "
                         f"line) to write into it, or choose a new directory")


def check_free_space(directory: str, needed: int) -> None:
    """Refuses to start writing ``needed`` bytes into ``directory`` (or its nearest existing parent)
    when the disk has less free."""
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise NotEnoughSpace(f"not enough disk space for {directory}: the export needs {_gib(needed)}, "
                             f"{_gib(free)} is free there; free some space or choose another directory")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def write_directory(save_directory: str, write) -> None:
    """``write(tmp)`` fills a directory beside ``save_directory``, which then takes its place (an existing
    one is replaced only once the new one is complete)."""
    target = os.path.abspath(save_directory)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=os.path.dirname(target))
    try:
        write(tmp)
        if os.path.exists(target):
            old = tmp + "-replaced"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
