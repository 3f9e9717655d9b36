"""Imported first by the post-processing fork server: Ctrl-C is the run's to handle.

The terminal sends SIGINT to the whole process group. The fork server ignores it only once its
preload imports are done, and its workers restore the handler it had before; a Ctrl-C during
those imports, or in a worker, printed a KeyboardInterrupt traceback from a child process
beside the run's own "Interrupted" message. The run stops its pool itself.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
