"""SIGTERM handled as Ctrl-C while long work runs.

Job schedulers (SLURM, Kubernetes) and ``timeout`` stop a job with SIGTERM; what was finished must then be
kept as it is on Ctrl-C (``fastbench train`` saves the adapter, ``fastbench compare`` the measured processes
and stops its running worker). Inside :func:`sigterm_as_interrupt`, SIGTERM raises KeyboardInterrupt where
the work stands and marks the state it yields as terminated (exit code 143 instead of Ctrl-C's 130).
"""
from __future__ import annotations

import contextlib
import signal
import types


@contextlib.contextmanager
def sigterm_as_interrupt():
    state = types.SimpleNamespace(terminated=False)

    def handler(signum, frame):
        state.terminated = True
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals cannot be handled here, nothing changes
        yield state
        return
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(state) -> int:
    """The conventional exit status of a run stopped by SIGTERM (143) or Ctrl-C (130)."""
    return 143 if state.terminated else 130
