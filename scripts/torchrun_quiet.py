"""torchrun, minus its failure report: what scripts/train.sh starts the ranks with.

    python scripts/torchrun_quiet.py --standalone --nproc_per_node=4 main_imagenet.py DATA ...

The same launcher (torch.distributed.run's own parser and run()), but when a rank fails torchrun adds
a ~30-line ChildFailedError traceback after the rank's own `error:` line. Here the rank's line is the
last word: the command exits with the rank's code (1 after an error, 143 after a SIGTERM stop), and
says one line only when a rank died without a word of its own (killed by a signal). A signal to the
launcher itself ends it with 128 + the signal, without a traceback.
"""
import signal
import sys


def exit_code(code):
    """A rank's exit code as a shell reports it: a negative one (killed by signal N) is 128 + N."""
    return 128 - code if code < 0 else code


def main(argv):
    import logging
    # The agent's own "failed (exitcode: 1) local_rank: 0 ..." line repeats what the rank said.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        lambda record: "failed (exitcode" not in str(record.msg))
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:  # killed: the rank printed nothing
            try:
                name = signal.Signals(-failure.exitcode).name
            except ValueError:
                name = f"signal {-failure.exitcode}"
            print(f"error: rank {rank} was killed by {name}", file=sys.stderr)
        return exit_code(failure.exitcode)
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
