"""Writing files so that nothing half-written is ever seen: :func:`atomic_path`, and :func:`out_of_disk_space`
to tell a full disk from other write errors."""
from __future__ import annotations

import contextlib
import errno
import os
import uuid


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """A temporary name beside ``path`` to write to; renamed to ``path`` when the block ends, removed if it fails
    (a reader never sees half a file, and an earlier version stays whole). The directory is made if missing. The
    name is this writer's alone (process and a random part: threads and processes writing one path do not
    meet); the writer makes the file, with the usual permissions."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def out_of_disk_space(error: BaseException) -> bool:
    """Whether ``error`` is a write that failed on a full disk or quota: an OSError, or an error of a writer
    (safetensors) that carries its text."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, OSError) and error.errno in codes:
        return True
    return any(os.strerror(code) in str(error) for code in codes)
