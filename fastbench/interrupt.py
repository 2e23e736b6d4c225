"""SIGTERM handled as Ctrl-C while long work runs.

Job schedulers (SLURM, Kubernetes) and ``timeout`` stop a job with SIGTERM; what was finished must then be
kept as it is on Ctrl-C (``fastbench train`` saves the adapter, ``fastbench compare`` the measured processes
and stops its running worker, ``fastbench tune`` keeps the results cached so far, ``fastbench export`` the files
it finished, and no half-written one). Inside :func:`sigterm_as_interrupt`, SIGTERM raises KeyboardInterrupt where
the work stands and marks the state it yields as terminated (exit code 143 instead of Ctrl-C's 130).
"""
from __future__ import annotations

import contextlib
import signal
import types


@contextlib.contextmanager
def sigterm_as_interrupt(once: bool = False):
    """Yields the state: ``terminated`` (SIGTERM came), ``stopped`` (a handled signal came) and ``held()``, a
    context in which a handled signal is only recorded (what it stops, e.g. saving the adapter, finishes;
    the caller reads ``stopped`` after it). ``once``: SIGINT is handled too, and only the first SIGINT or
    SIGTERM raises KeyboardInterrupt, later ones are ignored: for a process of a launched job, which gets a
    Ctrl-C both from the terminal and from its launcher."""
    state = types.SimpleNamespace(terminated=False, stopped=False, holding=False)

    def handler(signum, frame):
        if once and state.stopped:
            return
        state.stopped = True
        state.terminated = state.terminated or signum == signal.SIGTERM
        if not state.holding:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held():
        holding, state.holding = state.holding, True
        try:
            yield
        finally:
            state.holding = holding

    state.held = held
    signals = (signal.SIGTERM, signal.SIGINT) if once else (signal.SIGTERM,)
    try:
        previous = {s: signal.signal(s, handler) for s in signals}
    except ValueError:  # not the main thread: signals cannot be handled here, nothing changes
        yield state
        return
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def exit_code(state) -> int:
    """The conventional exit status of a run stopped by SIGTERM (143) or Ctrl-C (130)."""
    return 143 if state.terminated else 130
