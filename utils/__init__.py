"""Training infrastructure shared by main_imagenet.py, main_cifar.py and main_coco.py (see utils/trainer.py)."""


class UserError(Exception):
    """Bad input (arguments, data, checkpoint): the scripts print it as one line and exit non-zero."""


class Preempted(Exception):
    """A stop by signal, raised after the checkpoint is on disk; the script exits with 128 + the signal number.
    (Here beside UserError, not in utils.lifecycle.preempt, so that cli_main imports no submodule.)"""

    def __init__(self, signum, message):
        super().__init__(message)
        self.exit_code = 128 + signum


def error_line(e):
    """The one line to print for a UserError, also when a DataLoader worker re-raised it (the
    wrapper's message carries the worker's whole traceback; its last line is the original)."""
    msg = str(e).strip()
    if "Original Traceback" in msg:
        msg = msg.splitlines()[-1].split(": ", 1)[-1]
    return msg.splitlines()[0] if msg else type(e).__name__


def cli_main(main):
    """Run a script's `main()` the way every entry point reports: bad input is one `error:` line and
    exit 1; a stop by SIGTERM/SIGUSR1 (checkpoint saved, line already printed) exits 128 + signal;
    Ctrl-C is one line and exit 130 (saves are never cut: utils.lifecycle.checkpoint defers the signal)."""
    import signal
    import sys
    import threading
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _interrupt) if main_thread else None
    try:
        return main()
    except UserError as e:
        print(f"error: {error_line(e)}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Preempted as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); files already written are complete", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        # The caller's handler back (a test calling main()), unless a Ctrl-C was taken: then the
        # process is exiting, and a second one must stay ignored through the atexit handlers.
        if previous is not None and signal.getsignal(signal.SIGINT) is _interrupt:
            signal.signal(signal.SIGINT, previous)


def _interrupt(signum, frame):
    """Ctrl-C: KeyboardInterrupt, once. Further Ctrl-Cs while the process unwinds and exits (loader
    workers ending, atexit handlers) are ignored: they would print a traceback after the one line."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt
