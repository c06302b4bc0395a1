"""Training infrastructure shared by main_imagenet.py and main_cifar.py (see utils/engine.py)."""


class UserError(Exception):
    """Bad input (arguments, data, checkpoint): the scripts print it as one line and exit non-zero."""


def error_line(e):
    """The one line to print for a UserError, also when a DataLoader worker re-raised it (the
    wrapper's message carries the worker's whole traceback; its last line is the original)."""
    msg = str(e).strip()
    if "Original Traceback" in msg:
        msg = msg.splitlines()[-1].split(": ", 1)[-1]
    return msg.splitlines()[0] if msg else type(e).__name__
