"""Stopping a training run on a signal without losing its steps.

SIGTERM (a preempted job, a scheduler's time limit, a pool worker whose parent died:
``pool_worker_init``) and SIGINT (Ctrl-C, a Jupyter interrupt) only set a flag while
``StopSignals`` is active; the training loop reads it after each step, writes a checkpoint at the
step reached and raises ``Stopped``: a ``SystemExit`` with the shell's code for the signal (128 +
signum: 143 for SIGTERM, 130 for SIGINT), so the command line ends with that code and one line,
no traceback. A second signal of the same kind while the first is being handled ends the process
the usual way. Handlers can only be installed from the main thread; elsewhere ``StopSignals`` does
nothing (the signal keeps its usual effect), and a signal the process ignores stays ignored.

``pool_worker_init`` makes a worker process end with its parent (a notebook kernel killed with its
runner): SIGTERM to itself, so a training run in it stops as above, then a hard exit once no
training is running (or after a grace period).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import torch

__all__ = ["StopSignals", "Stopped", "pool_worker_init"]

_active = 0   # StopSignals contexts open in this process (a training run in progress)

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
        global _active
        _active += 1
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:   # e.g. SIGINT of a background job stays ignored
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active -= 1
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame) -> None:
        if self.signum == signum:          # asked twice: stop now, the usual way
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = {}
            signal.raise_signal(signum)
            return
        self.signum = self.signum or signum


def pool_worker_init(threads: int = 1, grace_s: float = 120.0) -> None:
    """Initialiser of a worker process: ``threads`` torch threads, and a daemon thread that ends the
    worker when its parent dies: SIGTERM to itself (a training run writes a checkpoint at the step
    reached and stops; an idle worker ends at once), then ``os._exit`` as soon as no training runs,
    at the latest after ``grace_s`` seconds. Without it a killed parent leaves its workers training
    on as orphans."""
    torch.set_num_threads(threads)
    spawner = multiprocessing.parent_process()    # recorded at spawn: the parent may be gone already
    parent = spawner.pid if spawner is not None else os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        end = time.time() + grace_s
        time.sleep(0.5)
        while _active and time.time() < end:
            time.sleep(0.1)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()
