"""Preemption: SIGTERM and SIGINT end a `jaxdl.fit` run with a checkpoint it can resume from.

A cluster preempts a job by sending SIGTERM and, after a grace period, SIGKILL (Slurm's
``--signal``/``KillWait``, Kubernetes' ``terminationGracePeriodSeconds``); Ctrl-C sends SIGINT.
While `fit` runs (and only in the main thread, where Python delivers signals), `catch_signals`
replaces the handlers of both: the first signal only sets a flag. `fit` finishes the block of
steps in flight, saves a checkpoint of that step (with ``out_dir``), prints one line saying the
run was interrupted and how to continue, and raises `Preempted`, a `SystemExit` whose ``code``
is the shell's status for the signal: 143 (128 + SIGTERM's 15) or 130 (128 + SIGINT's 2). A
script that does not catch it exits with that status and no traceback, so a scheduler sees a
job that was terminated by the signal and can requeue it; ``fit(..., resume=True)`` (or
``jaxdl train ... --resume``) then continues to bitwise the state and history of an
uninterrupted run. A signal during the run's last block lets the run finish as usual (there is
nothing left to resume).

A second signal raises `Preempted` at once, wherever the run is: during the checkpoint's save it
abandons that save. The newest *complete* checkpoint stays the older one: orbax writes a step
into a temporary folder and renames it, and `jaxdl.checkpoint` writes its manifest last, so a
step without its manifest is skipped on resume (and replaced when saved again). The previous
handlers are restored when `fit` returns or raises.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["Preempted", "catch_signals", "SIGNALS"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
    """Raised by `jaxdl.fit` after a SIGTERM or SIGINT, once its checkpoint is saved.

    A `SystemExit`: ``except Exception`` does not catch it, and a script that lets it through
    exits with status ``code``, 128 + the signal's number (143 for SIGTERM, 130 for SIGINT; the
    shell's convention for a process ended by a signal), without a traceback. Attributes:
    ``signum``, the signal; ``step``, the step of the checkpoint saved (None when nothing was
    saved: no ``out_dir``, or a second signal abandoned the save); ``message``, the line fit
    printed.

    Args:
      signum: the signal's number.
      step: the step of the checkpoint saved, or None.
      message: the line `fit` printed.

    >>> Preempted(15).code, Preempted(2).code
    (143, 130)
    """

    def __init__(self, signum: int, step: int | None = None, message: str = ""):
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.step = step
        self.message = message

    def __str__(self) -> str:
        return self.message or f"interrupted by {signal.Signals(self.signum).name}"


class catch_signals:
    """A context manager that turns SIGTERM and SIGINT into a request `fit` polls.

    In the main thread it installs its handler for both on entry and restores the previous ones
    on exit; elsewhere (where Python cannot set handlers) it does nothing and ``signum`` stays
    None. The first signal sets ``signum``; a second one raises `Preempted` at once.

    >>> with catch_signals() as guard:
    ...     guard.signum is None
    True
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "catch_signals":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():  # None: a handler not set from Python
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        del frame
        if self.signum is not None:
            raise Preempted(signum)
        self.signum = signum
