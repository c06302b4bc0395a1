"""Imported only by the loader workers' fork server, first of what it preloads
(`preempt.worker_start_method`): the server ignores Ctrl-C and the job's stop signals from the moment
it starts importing, as the workers it forks do, so a signal to the whole process group (a terminal's Ctrl-C,
scancel) leaves the loaders as they were and the main process alone decides. (Python's own forkserver
ignores Ctrl-C only once its preloads are imported, which takes seconds.) The server ends when the main
process does: multiprocessing closes its pipe."""
import signal

from .preempt import STOP_SIGNALS

for _s in (signal.SIGINT, *STOP_SIGNALS):
    signal.signal(_s, signal.SIG_IGN)
