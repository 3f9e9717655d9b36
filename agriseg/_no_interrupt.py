"""Imported first by the post-processing fork server: Ctrl-C is the run's to handle.

The terminal sends SIGINT to the whole process group. The fork server ignores it only once its
preload imports are done, and its workers restore the handler it had before; a Ctrl-C during
those imports, or in a worker, printed a KeyboardInterrupt traceback from a child process
beside the run's own "Interrupted" message. The run stops its pool itself.

A worker still starting when the interrupted run stops its pool finds the pool's semaphore
gone (``SemLock._rebuild``: FileNotFoundError); the fork server reports that through
``sys.excepthook``, which here stays silent about that one case.
"""

import signal
import sys
import traceback
from types import TracebackType

signal.signal(signal.SIGINT, signal.SIG_IGN)

_report = sys.excepthook


def _quiet_when_the_pool_is_gone(kind: type[BaseException], exc: BaseException,
                                 tb: TracebackType | None) -> None:
    if isinstance(exc, FileNotFoundError) and any(
            frame.name == "__setstate__" and frame.filename.endswith("synchronize.py")
            for frame in traceback.extract_tb(tb)):
        return
    _report(kind, exc, tb)


sys.excepthook = _quiet_when_the_pool_is_gone
