"""Stopping metaqsm with SIGTERM/SIGINT, in-process: the stop is never raised inside code that holds a lock.

End to end (a run killed and stopped, its workers gone, the rerun complete): tests/test_bad_inputs.py.
"""
import logging
import os
import signal
import time

import pytest

from metaqsm_bids.cli import run


@pytest.fixture
def handlers():
    """metaqsm's SIGTERM handler installed as ``main`` installs it; everything restored afterwards."""
    previous = {name: signal.getsignal(name) for name in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
    run._stopped_by.clear()
    signal.signal(signal.SIGTERM, run._raise_stopped)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    run._stopped_by.clear()
    for name, handler in previous.items():
        signal.signal(name, handler)


def test_a_stop_waits_until_logging_has_released_its_lock(handlers):
    """The signal arrives while a log record is being handled (as when logging's lock is released after a worker
    is forked): Stopped comes once logging has returned, and its locks are free."""
    class SignalWhileHandling(logging.Handler):
        def emit(self, record):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)  # the handler runs, and its retries, inside logging's code

    logger = logging.getLogger("metaqsm-test-stop")
    handler = SignalWhileHandling()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("a record")  # not interrupted
        with pytest.raises(run.Stopped) as stop:
            time.sleep(2)
    finally:
        logger.removeHandler(handler)
    assert stop.value.signum == signal.SIGTERM
    assert handler.lock.acquire(blocking=False)
    handler.lock.release()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # a second signal does not interrupt the stopping


def test_a_stop_is_raised_at_once_elsewhere(handlers):
    started = time.monotonic()
    with pytest.raises(run.Stopped):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2)
    assert time.monotonic() - started < 1


def test_a_stop_waits_until_a_destructor_has_returned(handlers, capsys):
    """The signal arrives while an object's ``__del__`` runs (as during garbage collection in nibabel's
    OrderedSet): what a destructor raises Python ignores, printing a traceback; the stop comes once it has
    returned, with nothing printed."""
    class SignalWhileDeleting:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)

    with pytest.raises(run.Stopped):
        SignalWhileDeleting()  # deleted at once: its __del__ runs here
        time.sleep(2)
    assert "Traceback" not in capsys.readouterr().err
