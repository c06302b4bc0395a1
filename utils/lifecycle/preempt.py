"""Stopping cleanly: SIGTERM / SIGUSR1 (SLURM's warning before preemption or the time limit) and a
save timer, turned into decisions every rank takes at the same iteration boundary.

The handler only sets a flag. The training loop asks `poll(done)` after every step; under DDP the
ranks compare flags every `agree_every` steps (one tiny all-reduce, where the loop already syncs
for its progress line), so they stop or save at the same iteration. Saving blocks these signals and
SIGINT (`processes.deferred_signals`), so a checkpoint is never left half-written by our own handlers or Ctrl-C.
"""
import signal
import threading
import time

from ..distributed import all_reduce_sum
from .processes import STOP_SIGNALS


class StopFlags:
    def __init__(self, device, distributed=False, agree_every=1, save_every_minutes=None, is_main=True):
        self.device, self.distributed = device, distributed
        self.agree_every = max(1, agree_every) if distributed else 1
        self.save_every = save_every_minutes * 60 if save_every_minutes else None
        self.is_main = is_main
        self.signum = 0
        self.fault = None  # why the loader cannot go on (utils.lifecycle.processes.watch_workers): stop and save
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
            return bool(self.signum or self.fault), due
        if not force and done % self.agree_every:
            return False, False
        # Any rank's signal stops all; rank 0's clock alone decides timed saves. A rank that saw no
        # signal itself reports the sum of the others' (SIGTERM when that is not one signal's number).
        sig, save = all_reduce_sum([self.signum, 1 if due else 0], self.device)
        if sig and not self.signum:
            self.signum = int(sig) if int(sig) in map(int, STOP_SIGNALS) else int(signal.SIGTERM)
        return bool(sig), bool(save)
