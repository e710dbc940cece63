"""`jaxdl.preemption.catch_signals` and `Preempted` on their own (no training). fit's use of them
with real signals: tests/test_trainer.py (SIGTERM to a process, SIGINT in process) and
tests/test_cli.py (SIGTERM to ``jaxdl train``)."""

import os
import signal
import threading
import time

import pytest

import jaxdl as dl
from jaxdl.preemption import Preempted, catch_signals


def wait_for(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_first_signal_is_a_request_second_raises_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Preempted) as stop:
        with catch_signals() as signals:
            os.kill(os.getpid(), signal.SIGTERM)
            wait_for(lambda: signals.signum is not None)
            assert signals.signum == signal.SIGTERM  # a request: the code goes on
            os.kill(os.getpid(), signal.SIGINT)
            wait_for(lambda: False)
    assert (stop.value.code, stop.value.signum, stop.value.step) == (130, signal.SIGINT, None)
    assert isinstance(stop.value, SystemExit) and not isinstance(stop.value, Exception)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert dl.Preempted is Preempted and Preempted(signal.SIGTERM).code == 143


def test_outside_the_main_thread_nothing_is_installed():
    seen = []

    def enter():
        with catch_signals() as signals:
            seen.append((signals.signum, signal.getsignal(signal.SIGTERM)))

    before = signal.getsignal(signal.SIGTERM)
    worker = threading.Thread(target=enter)
    worker.start()
    worker.join()
    assert seen == [(None, before)]
