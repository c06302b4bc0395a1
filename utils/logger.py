"""Rank-0 output: console lines, a human-readable log.txt and tqdm progress bars."""
import sys
from pathlib import Path

from tqdm import tqdm


def printable(text):
    """`text` as valid UTF-8: the bytes of a file name that is not valid UTF-8 (which Python holds as
    surrogates, os.fsdecode's surrogateescape) become backslash escapes (\\xff), so printing it or writing
    it to log.txt cannot fail: one bad file name must not cost an epoch."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class RunLogger:
    """Prints and writes only when `enabled` (rank 0). folder=None: console only (e.g. evaluation).

    Progress bars are drawn only on a terminal; elsewhere (CI, SLURM logs) the loop prints plain
    lines every --print-freq iterations instead.
    """

    def __init__(self, folder=None, enabled=True):
        self.enabled = enabled
        self.folder = Path(folder) if folder is not None else None
        self.tty = enabled and sys.stderr.isatty()
        self._bar = None

    def info(self, msg):
        if not self.enabled:
            return
        msg = printable(msg)
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)
        self.file(msg)

    def file(self, msg):
        if self.enabled and self.folder is not None:
            with open(self.folder / "log.txt", "a", encoding="utf-8") as f:
                f.write(printable(msg) + "\n")

    def progress(self, total, desc, initial=0):
        """A tqdm bar on a terminal, else None. Close it with end_progress()."""
        if self.tty:
            self._bar = tqdm(total=total, desc=desc, initial=initial, leave=False, dynamic_ncols=True)
        return self._bar

    def end_progress(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
