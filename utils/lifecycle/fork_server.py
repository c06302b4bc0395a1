"""Imported only by the loader workers' fork server, first of what it preloads
(`processes.worker_start_method`): the server ignores Ctrl-C and the job's stop signals from the moment
it starts importing, as the workers it forks do, so a signal to the whole process group (a terminal's Ctrl-C,
scancel) leaves the loaders as they were and the main process alone decides. The main process starts the
server with these signals blocked (`processes.start_fork_server`): one sent before this import is pending,
and dropped here, where it is ignored. They stay blocked, so that each worker starts with them held until it
ignores them itself (`processes.stop_signals_held` says why). (Python's own forkserver ignores Ctrl-C only
once its preloads are imported, which takes seconds.)

The server dies with the main process, SIGKILL included (PR_SET_PDEATHSIG: its parent is the main thread
that started it); multiprocessing's own end of it (its pipe closing) never comes while a worker, which
holds a copy of that pipe, lives. The workers die with the server (`processes.ignore_stop_signals_in_worker`)."""
import signal

from .processes import STOP_SIGNALS, end_with_parent

for _s in (signal.SIGINT, *STOP_SIGNALS):
    signal.signal(_s, signal.SIG_IGN)
end_with_parent()
