"""Stopping cleanly: SIGTERM / SIGUSR1 (SLURM's warning before preemption or the time limit) and a
save timer, turned into decisions every rank takes at the same iteration boundary.

The handler only sets a flag. The training loop asks `poll(done)` after every step; under DDP the
ranks compare flags every `agree_every` steps (one tiny all-reduce, where the loop already syncs
for its progress line), so they stop or save at the same iteration. Saving blocks these signals and
SIGINT (`deferred_signals`), so a checkpoint is never left half-written by our own handlers or Ctrl-C.
"""
import atexit
import signal
import threading
import time
from contextlib import contextmanager

from ..distributed import all_reduce_sum

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlags:
    def __init__(self, device, distributed=False, agree_every=1, save_every_minutes=None, is_main=True):
        self.device, self.distributed = device, distributed
        self.agree_every = max(1, agree_every) if distributed else 1
        self.save_every = save_every_minutes * 60 if save_every_minutes else None
        self.is_main = is_main
        self.signum = 0
        self.last_save = time.monotonic()
        self._previous = {}

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum

    def saved(self):
        self.last_save = time.monotonic()

    def poll(self, done, force=False):
        """(stop, save) after `done` steps of the epoch: the same answer on every rank.

        force: agree now whatever `done` is (epoch ends); otherwise ranks only talk every agree_every steps.
        """
        due = self.save_every is not None and self.is_main and time.monotonic() - self.last_save >= self.save_every
        if not self.distributed:
            return bool(self.signum), due
        if not force and done % self.agree_every:
            return False, False
        # Any rank's signal stops all; rank 0's clock alone decides timed saves. A rank that saw no
        # signal itself reports the sum of the others' (SIGTERM when that is not one signal's number).
        sig, save = all_reduce_sum([self.signum, 1 if due else 0], self.device)
        if sig and not self.signum:
            self.signum = int(sig) if int(sig) in map(int, STOP_SIGNALS) else int(signal.SIGTERM)
        return bool(sig), bool(save)


@contextmanager
def deferred_signals():
    """Hold SIGINT/SIGTERM/SIGUSR1 until the block ends (a save): they are delivered right after.

    Done with Python handlers that only record the signal, not with a thread signal mask: a signal
    sent to the process may be taken by any thread (torch and loader threads included), and only
    Python-level handlers are sure to run in the main thread, after the C call in progress.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {}
    for s in (signal.SIGINT, *STOP_SIGNALS):
        old = signal.getsignal(s)
        if old is None or old == signal.SIG_IGN:  # set outside Python, or ignored: leave it alone
            continue
        previous[s] = old
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
        for s in dict.fromkeys(caught):
            # A Python handler is called here, so its KeyboardInterrupt is raised at this line: a
            # re-raised signal's handler may run later inside a finalizer, whose exception is dropped.
            if callable(previous[s]):
                previous[s](s, None)
            else:
                signal.raise_signal(s)


def worker_start_method(workers):
    """DataLoader's multiprocessing_context for `workers` workers: None (no workers, or the platform's
    method: fork on Linux before Python 3.14), or the "forkserver" context on the CPython releases where
    a fork can hang the child for ever.

    Before 3.11.10 (3.10.15, 3.9.20), a child forked while a native thread was entering Python (making
    itself a thread state) waits on a lock nobody will release (CPython gh-112275). DDP's gloo and nccl
    threads enter Python: seen here as a torchrun rank whose validation worker never started, the other
    rank waiting in all_reduce. A fork
    server (a single-threaded process that forks the workers) has no other thread; it is what Python
    3.14 uses by default. The cost: each worker unpickles the dataset, once a run (persistent workers).
    """
    import sys
    v = sys.version_info[:3]
    fixed = v >= (3, 11, 10) or (3, 10, 15) <= v < (3, 11) or (3, 9, 20) <= v < (3, 10)
    if not workers or fixed or not sys.platform.startswith("linux"):
        return None
    import multiprocessing
    context = multiprocessing.get_context("forkserver")
    # Imported once, in the server (not in every worker); fork_server makes it ignore stop signals.
    context.set_forkserver_preload(["utils.lifecycle.fork_server", "torch", "torchvision", "utils.inputs.data"])
    return context


def ignore_stop_signals_in_worker(_worker_id=None):
    """DataLoader workers: SLURM signals every process of the job, and a terminal's Ctrl-C every process
    of its foreground group; a worker that died of it would take the batches the main process still
    needs (torch's SIGCHLD handler would raise in the middle of the save) or print its own traceback
    (BrokenPipe, EOFError) under the main process's one line. The main process alone decides: it
    saves and stops, and ends its workers itself (`end_workers_at_exit`)."""
    for s in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    threading.excepthook = _quiet_when_the_main_process_hangs_up


def _quiet_when_the_main_process_hangs_up(args):
    """A worker's threads (multiprocessing's resource sharer, which hands batch tensors to the main
    process) meet a closed connection when the main process stops in the middle of a hand-over, e.g.
    on Ctrl-C: not worth a traceback under its one line. Were the main process still running, it
    would report the failed hand-over itself."""
    if issubclass(args.exc_type, (ConnectionError, EOFError)):
        return
    threading.__excepthook__(args)


_reaper = []


def end_workers_at_exit():
    """multiprocessing's own exit handler stops daemon children with SIGTERM and waits for them, which
    workers ignoring SIGTERM would never answer: end them first, with SIGKILL (atexit runs LIFO)."""
    if not _reaper:
        _reaper.append(atexit.register(_kill_children))


def _kill_children():
    import multiprocessing
    children = multiprocessing.active_children()
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would call this a worker failure
    for p in children:
        p.kill()
    for p in children:
        p.join(timeout=5)
