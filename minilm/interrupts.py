"""Stopping a run cleanly: the first Ctrl-C (or SIGTERM) asks for a checkpoint and a stop, a second one quits now."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Protocol

from minilm.report import print_line


class Stoppable(Protocol):
    _stop_reason: str | None

    def request_stop(self, reason: str) -> None: ...


def stop_on_signals(run: Stoppable, announce: bool = True, progress: bool = False) -> Callable[[], None]:
    """Route SIGINT/SIGTERM to ``run.request_stop``; returns a function that restores the old handlers.

    A second SIGINT raises KeyboardInterrupt at once. Outside the main thread (a notebook
    training in a thread) signals cannot be caught: nothing is installed. ``announce``: print a
    notice at the first signal (``progress``: a tqdm bar is live, print above it).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != pid:
            return  # a forked data-loader worker inherited this handler: it keeps serving the main process
        name = signal.Signals(signum).name
        if run._stop_reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        run.request_stop(f"received {name}")
        if announce:
            notice = f"{name}: saving a checkpoint after this step, then stopping (Ctrl-C again quits now)"
            print_line(notice, progress)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore
