"""Every process a run starts ends with it (docs/reliability.md): loader workers and their fork server
ignore the job's stop signals (the main process decides, saves, and ends them), and die with the
trainer, SIGKILL included; spawned ranks die with their launcher (utils.distributed). No import from
the rest of the project, so that utils.distributed, utils.lifecycle.preempt and the fork server can
all use it."""
import atexit
import signal
import threading
import time
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SLURM's preemption warning and time limit, scancel


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


# CPython releases whose fork can hang the child (gh-112275, below): (major, minor) -> first fixed micro.
# 3.12 re-creates the runtime's locks first thing in the child, so it never had the bug.
FORK_HANG_FIXED_IN = {(3, 8): 20, (3, 9): 20, (3, 10): 15, (3, 11): 10}


def fork_can_hang(version=None):
    """True on the CPython releases where a child forked while a native thread enters Python can hang."""
    import sys
    major, minor, micro = (version or sys.version_info)[:3]
    return (major, minor) < (3, 12) and micro < FORK_HANG_FIXED_IN.get((major, minor), 10 ** 6)


def worker_start_method(workers, process_group=None):
    """DataLoader's multiprocessing_context for `workers` workers: None (no workers, or the platform's
    method: fork on Linux before Python 3.14), or the "forkserver" context where a fork can hang the
    child for ever.

    Before 3.11.10 (3.10.15, 3.9.20, 3.8.20; 3.12 is not affected), a child forked while a native thread
    was entering Python (making itself a thread state, without the GIL) waits on a lock nobody will
    release (CPython gh-112275). DDP's gloo and nccl threads do so at any moment (a collective's
    completion): seen here as a torchrun rank whose validation worker never started, the other rank
    waiting in all_reduce. A single process has no such thread running beside the one that forks (its
    backward and copies are synchronous; the loader's threads are Python threads), so the fork server
    (a single-threaded process that forks the workers; Python 3.14's default) is used only under a
    process group (process_group: torch.distributed.is_initialized() unless given), where its cost
    (each worker unpickles the dataset, the server's start) buys safety. docs/reliability.md.
    A rank calls it first thing (utils.trainer.run_rank), so that the server's imports (seconds) run
    beside its set-up instead of delaying epoch 1; the loaders' later calls find the server running.
    """
    import sys
    if process_group is None:
        import torch.distributed as dist
        process_group = dist.is_available() and dist.is_initialized()
    if not workers or not process_group or not fork_can_hang() or not sys.platform.startswith("linux"):
        return None
    import multiprocessing
    context = multiprocessing.get_context("forkserver")
    # Imported once, in the server (not in every worker); fork_server makes it ignore stop signals.
    # "__main__": the script (main_imagenet.py ...), imported as the workers' __mp_main__ in the server
    # rather than again in each worker.
    context.set_forkserver_preload(["utils.lifecycle.fork_server", "torch", "torchvision", "utils.inputs.data",
                                    "__main__"])
    start_fork_server()
    return context


def start_fork_server():
    """Start the fork server now, from this (main) thread, with Ctrl-C and the stop signals blocked: the
    server inherits the mask, so a signal to the whole group in its first second (Python starting, the
    preloads importing) stays pending until utils.lifecycle.fork_server ignores it, instead of killing it.
    Here the signals are only held: the process's other threads take them meanwhile, or they wait for
    the unblock; none is lost. The server's parent is this thread (its PR_SET_PDEATHSIG, fork_server)."""
    from multiprocessing import forkserver, resource_tracker
    if threading.current_thread() is not threading.main_thread():
        return
    resource_tracker.ensure_running()  # first: starting it unblocks SIGINT and SIGTERM when done
    held = {signal.SIGINT, *STOP_SIGNALS}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def end_with_parent(expected_parent=None):
    """Have the kernel SIGKILL this process when its parent (the thread that started it) dies, SIGKILL
    included (prctl PR_SET_PDEATHSIG, Linux). expected_parent: the pid the parent must still have; if
    it died before the call, this process ends now. Elsewhere than Linux: nothing."""
    import os
    import sys
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


@contextmanager
def stop_signals_held():
    """Ctrl-C and the stop signals blocked in this thread while the block runs: what it forks (loader
    workers) starts with them held, until the worker ignores them (ignore_stop_signals_in_worker).
    Before that, torch's worker sets a SIGTERM handler of its own, under which a SIGTERM from anyone
    but its parent (scancel and `kill -- -PGID` signal the whole group) kills it, and the run would
    stop as if a worker had failed instead of saving. Here the signals wait: another thread of this
    process takes them, or they come when the block ends (deferred_signals holds them meanwhile)."""
    held = {signal.SIGINT, *STOP_SIGNALS}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_stop_signals_in_worker(_worker_id=None):
    """DataLoader workers: SLURM signals every process of the job, and a terminal's Ctrl-C every process
    of its foreground group; a worker that died of it would take the batches the main process still
    needs (torch's SIGCHLD handler would raise in the middle of the save) or print its own traceback
    (BrokenPipe, EOFError) under the main process's one line. The main process alone decides: it
    saves and stops, and ends its workers itself (`end_workers_at_exit`).

    And a worker never outlives the trainer, even one killed by SIGKILL: it dies with its parent (the
    trainer's thread that forked it, or the fork server, which dies with the trainer), and if the
    trainer is gone already it ends now (its sentinel: EOF, or an error on the fork server's pipe)."""
    import multiprocessing
    import os
    import sys
    for s in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)  # one held since the fork (stop_signals_held) is dropped here
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, *STOP_SIGNALS})
    threading.excepthook = _quiet_when_the_main_process_hangs_up
    sys.excepthook = _quiet_hang_up_in_sys_excepthook
    end_with_parent()
    trainer = multiprocessing.parent_process()
    if trainer is not None and os.getppid() != trainer.pid and not trainer.is_alive():
        os._exit(1)


def _quiet_when_the_main_process_hangs_up(args):
    """A worker's threads (multiprocessing's resource sharer, which hands batch tensors to the main
    process) meet a closed connection when the main process stops in the middle of a hand-over, e.g.
    on Ctrl-C: not worth a traceback under its one line. Were the main process still running, it
    would report the failed hand-over itself."""
    if issubclass(args.exc_type, (ConnectionError, EOFError)):
        return
    threading.__excepthook__(args)


def _quiet_hang_up_in_sys_excepthook(exc_type, value, tb):
    """The same for sys.excepthook, which the resource sharer's thread calls itself on an error in its
    accept loop (a hand-over cut during the authentication handshake: ConnectionResetError)."""
    import sys
    if issubclass(exc_type, (ConnectionError, EOFError)):
        return
    sys.__excepthook__(exc_type, value, tb)


def close_loaders(loaders):
    """End the persistent workers of these loaders (EpochLoader, CocoLoader: their DataLoader's
    iterator) now, with Ctrl-C and the stop signals deferred. Left to the iterator's __del__ when the
    run's objects are dropped, a Ctrl-C at that moment is raised inside __del__, where Python prints it
    as an ignored exception and goes on as if nothing had been pressed."""
    with deferred_signals():
        for loader in loaders:
            data_loader = getattr(loader, "loader", loader)
            it = getattr(data_loader, "_iterator", None)
            if it is not None:
                data_loader._iterator = None
                it._shutdown_workers()  # workers leave their loop; then joined
                del it


_reaper = []


def end_workers_at_exit():
    """multiprocessing's own exit handler stops daemon children with SIGTERM and waits for them, which
    workers ignoring SIGTERM would never answer: end them first, with SIGKILL (atexit runs LIFO)."""
    if not _reaper:
        _reaper.append(atexit.register(end_workers))


def end_workers():
    """SIGKILL this process's multiprocessing children (loader workers) and reap them. At exit (above),
    and by a spawned rank itself (utils.distributed): multiprocessing ends a Process's run with its own
    exit handler, before atexit's, which would wait for ever on workers that ignore SIGTERM."""
    import multiprocessing
    children = multiprocessing.active_children()
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would call this a worker failure
    for p in children:
        p.kill()
    for p in children:
        p.join(timeout=5)


# A wait for a batch looks at the workers (and, in training, at stop signals) this often.
POLL_SECONDS = 1.0
# A worker found stopped (SIGSTOP; not a debugger's trace stop) while a batch has been awaited this long
# is ended and stops the run.
STOPPED_GRACE_SECONDS = 5.0
# No batch for this long from workers that are alive and not stopped (a deadlock, a dead network mount)
# stops the run: far above the slowest start seen (a COCO-size dataset unpickled by each worker, minutes).
SILENT_LIMIT_SECONDS = 1800.0


class LoaderCut:
    """What watch_workers yields, instead of a batch, when the loader cannot give it and training can stop
    before it: the loop saves there, as on a stop signal (utils.engine). error: the one line."""

    def __init__(self, error):
        self.error = error


class watch_workers:
    """The batches of `loader` (a DataLoader: an epoch's iterable), with its worker processes watched.

    Without a watch, a worker killed mid-epoch (SIGKILL, the OOM killer) is a RuntimeError traceback
    from torch's SIGCHLD handler at any line of the step (a save included), and a worker stopped
    (SIGSTOP) is a wait without end in which no stop signal is honoured. Here the wait for a batch
    returns every POLL_SECONDS (DataLoader's timeout) to look: a dead worker, one stopped for
    STOPPED_GRACE_SECONDS, SILENT_LIMIT_SECONDS without a batch, or (flags given) a stop signal ends the
    wait. With `flags` (training in a single process) the iteration then yields a LoaderCut and ends:
    the loop saves the batches done, as on SIGTERM, and the run stops in one line (flags.fault says
    why; a signal stops as a signal does). Without (validation, DDP ranks, whose peers wait in a
    collective), the fault is a UserError: one line, the run folder keeps its last checkpoint.
    """

    def __init__(self, loader, flags=None):
        self.loader, self.flags = loader, flags
        self.waiting_since = self.reason = self.it = None

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # the loader's own attributes (the dataset)
        return getattr(self.loader, name)

    def __iter__(self):
        from torch.utils.data import DataLoader
        loader = self.loader
        if not isinstance(loader, DataLoader) or not loader.num_workers:
            yield from loader
            return
        done = threading.Event()
        threading.Thread(target=self._end_stopped_workers, args=(done,), daemon=True).start()
        try:
            self.waiting_since = time.monotonic()
            try:
                # A persistent loader's workers acknowledge the new epoch here: torch's own wait (it
                # finds a dead worker), the thread above a stopped one. A Ctrl-C while workers start
                # would leave one half started, and its traceback: held until they have.
                if getattr(loader, "_iterator", None) is not None:
                    loader._iterator._timeout = 0  # torch's wait without end (set below for the batches)
                with deferred_signals(), stop_signals_held():
                    self.it = iter(loader)
            except (RuntimeError, ConnectionError, EOFError) as e:
                yield from self._stop(e, check=True)
                return
            self.it._timeout = POLL_SECONDS  # the iterator's batch wait (DataLoader's timeout) from now on
            if threading.current_thread() is threading.main_thread():
                # torch's SIGCHLD handler raises a worker's death wherever the main thread is (mid-step,
                # mid-save); here it is found where the batch is awaited, between two steps.
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            while True:
                self.waiting_since = time.monotonic()
                try:
                    batch = next(self.it)
                except StopIteration:
                    return
                except (RuntimeError, ConnectionError, EOFError) as e:
                    problem = self._stop(e)
                    if problem is None:
                        continue
                    yield from problem
                    return
                self.waiting_since = None
                yield batch
        finally:
            self.waiting_since = None
            done.set()

    def _stop(self, e, check=False):
        """The LoaderCut to yield (or the UserError to raise) for exception `e` of the loader, or None to
        wait on. torch's own words for a dead worker or a wait that timed out; or a batch whose shared
        memory its worker, ended meanwhile, could not hand over."""
        from .. import UserError
        if isinstance(e, RuntimeError) and not str(e).startswith("DataLoader") or (
                not isinstance(e, RuntimeError) and not self.reason and not self._one_ended()):
            raise e
        problem = self._problem(str(e), time.monotonic() - self.waiting_since)
        if problem is None:
            if check:
                raise e
            return None
        error = UserError(f"{problem}; the run folder keeps its last checkpoint")
        if self.flags is None:
            raise error from None
        if not self.flags.signum:
            self.flags.fault = problem
        return iter([LoaderCut(error)])

    def _workers(self):
        it = self.it or getattr(self.loader, "_iterator", None)
        return list(getattr(it, "_workers", []))

    def _one_ended(self, wait=2.0):
        """Whether a worker has ended (within `wait` seconds: one just killed may not be reaped yet)."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if any(not w.is_alive() for w in self._workers()):
                return True
            time.sleep(0.05)
        return False

    def _problem(self, error, waited):
        """Why the wait must end, or None to wait on."""
        if self.reason:
            return self.reason
        workers = self._workers()
        dead = [w for w in workers if w.exitcode is not None]
        if dead or "timed out" not in error:
            w = dead[0] if dead else None
            how = (f"was killed by {signal.Signals(-w.exitcode).name}" if w is not None and w.exitcode < 0 else
                   f"ended with exit code {w.exitcode}" if w is not None else f"failed ({error})")
            return f"loader worker (pid {w.pid if w is not None else '?'}) {how}"
        if self.flags is not None and self.flags.signum:
            return f"{signal.Signals(self.flags.signum).name} while waiting for a batch"
        if waited >= SILENT_LIMIT_SECONDS:
            return f"the loader workers gave no batch for {waited / 60:.0f} minutes (hung?)"
        return None

    def _end_stopped_workers(self, done):
        """A thread: a worker stopped (SIGSTOP) while a batch is awaited for STOPPED_GRACE_SECONDS is
        ended (SIGKILL), so the wait ends (the main thread may be blocked without a timeout, receiving a
        batch's shared memory from that very worker) and the run stops with the reason."""
        import os
        while not done.wait(POLL_SECONDS):
            since = self.waiting_since
            if since is None or time.monotonic() - since < STOPPED_GRACE_SECONDS:
                continue
            for w in self._workers():
                if _state(w.pid) == "T":  # (not w.exitcode: the main thread may be reading that status)
                    self.reason = (f"loader worker (pid {w.pid}) was stopped (SIGSTOP?) and gave no batch for "
                                   f"{time.monotonic() - since:.0f} s; it was ended")
                    os.kill(w.pid, signal.SIGKILL)


def _state(pid):
    """A process's state letter (/proc/PID/stat: R, S, D, T stopped, t traced, Z), '' when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
