"""Stopping a training run on a signal without losing its steps.

SIGTERM (a preempted job, a scheduler's time limit, a pool worker whose parent died:
``nbcore.utils.pool_worker_init``) and SIGINT (Ctrl-C, a Jupyter interrupt) only set a flag while
``StopSignals`` is active; the training loop reads it after each step, writes a checkpoint at the
step reached and raises ``Stopped``: a ``SystemExit`` with the shell's code for the signal (128 +
signum: 143 for SIGTERM, 130 for SIGINT), so the command line ends with that code and one line,
no traceback. A second signal of the same kind while the first is being handled ends the process
the usual way. Handlers can only be installed from the main thread; elsewhere ``StopSignals`` does
nothing (the signal keeps its usual effect), and a signal the process ignores stays ignored.
"""
from __future__ import annotations

import signal
import threading

__all__ = ["StopSignals", "Stopped"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(SystemExit):
    """Training stopped on a signal after writing a checkpoint; exit code 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.signum, self.message = signum, message

    def __str__(self):
        return self.message


class StopSignals:
    """``with StopSignals() as stop:`` -> ``stop.signum`` is 0 until SIGTERM or SIGINT arrives, then
    that signal's number; the previous handlers come back on exit."""

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:   # e.g. SIGINT of a background job stays ignored
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame) -> None:
        if self.signum == signum:          # asked twice: stop now, the usual way
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signum = self.signum or signum
