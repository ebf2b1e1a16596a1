"""Ctrl-C (SIGINT) and SIGTERM stop a driver the same way, once.

The first signal raises KeyboardInterrupt in the driver's main thread: the
job is recorded STOPPED with the epoch it reached and its workers are
released. Further signals while that happens are only acknowledged: a
second Ctrl-C must not cut the final record write or the workers' release
short. Ray Jobs' stop sends SIGTERM; `orchestra cancel` asks through the job
folder, and the driver's heartbeat thread then stops it the same way
(`stop_main_thread`).
"""

from __future__ import annotations

import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_on_signals() -> None:
    """Make SIGINT and SIGTERM stop the job, once. Call it after `ray.init`,
    which installs handlers of its own. A no-op outside the main thread,
    where Python cannot handle signals."""
    if threading.current_thread() is not threading.main_thread():
        return
    for number in STOP_SIGNALS:
        signal.signal(number, _first_signal)


def stop_main_thread() -> bool:
    """Stop the job from another thread as SIGTERM would, if this process's
    main thread handles it (`stop_on_signals`); False if it does not (a
    driver run from another thread, which must notice by itself)."""
    if signal.getsignal(signal.SIGTERM) not in (_first_signal, _later_signal):
        return False
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
    return True


def _first_signal(number: int, frame) -> None:
    for other in STOP_SIGNALS:
        signal.signal(other, _later_signal)
    raise KeyboardInterrupt(signal.Signals(number).name)


def _later_signal(number: int, frame) -> None:
    print(f"orchestra: {signal.Signals(number).name} received; already stopping the job, "
          "recording its state and releasing its workers", file=sys.stderr, flush=True)
