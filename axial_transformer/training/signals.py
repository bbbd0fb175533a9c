"""SIGTERM and SIGINT from start-up to exit.

Schedulers (Slurm, Kubernetes) send SIGTERM some seconds before they kill a job. While the run
holds steps that no checkpoint has yet (the training loop, the checkpoint being written), a
signal waits for the next step boundary, where the run checkpoints and stops; at any other time
(start-up, the final evaluation, samples, baselines) nothing is unsaved and the run stops at
once. Either way the process exits with code 0 and `resume=auto` continues.
"""

from __future__ import annotations

import os
import signal
import threading


class Preempted(BaseException):
    """The run was asked to stop. A BaseException, like KeyboardInterrupt, so that no handler
    of ordinary errors (a tracker's, a data loader's) takes it for a failure."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class Preemption:
    """Handles SIGTERM and SIGINT while in its `with` block; a second signal ends the process
    at once (the default action)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self.deferred = False  # True while a signal must wait for the next step boundary
        self.previous: dict = {}

    def __enter__(self) -> Preemption:
        return self.install()

    def install(self) -> Preemption:
        """Handle the signals from now on (`with` restores the previous handlers at its end)."""
        if threading.current_thread() is threading.main_thread():  # signals go to the main one
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum: int, frame) -> None:
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.received = signal.Signals(signum).name
        if not self.deferred:
            raise Preempted(self.received)

    def defer(self) -> None:
        """From now on a signal is only noted, for the loop to act on at a step boundary."""
        self.deferred = True

    def stop_at_once(self) -> None:
        """From now on a signal stops the run where it is; one noted meanwhile stops it now."""
        self.deferred = False
        if self.received is not None:
            raise Preempted(self.received)

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
