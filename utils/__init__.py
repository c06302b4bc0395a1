"""Training infrastructure shared by main_imagenet.py, main_cifar.py and main_coco.py (see utils/trainer.py)."""


class UserError(Exception):
    """Bad input (arguments, data, checkpoint): the scripts print it as one line and exit non-zero."""


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
    Ctrl-C is one line and exit 130 (saves are never cut: utils.checkpoint defers the signal)."""
    import sys
    from .preempt import Preempted
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
