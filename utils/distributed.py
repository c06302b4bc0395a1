"""torchrun-style process groups: one process per device, environment variables set by the launcher
(torchrun, or `spawn` below when the command starts its ranks itself: --nproc N, --gpu 0,1,2,3)."""
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(gpu_ids=None, store=None):
    """Join the process group when launched by torchrun or `spawn` (WORLD_SIZE > 1) and pick this
    rank's device.

    gpu_ids: the --gpu list; local rank i uses gpu_ids[i] when given, else cuda:i.
    store: the rendezvous store `spawn` hands its ranks; None: torchrun's environment (env://).
    CUDA ranks talk over nccl, CPU ranks over gloo.
    """
    env = launcher_env(rendezvous=store is None)
    world_size, local_rank = env["WORLD_SIZE"], env["LOCAL_RANK"]
    info = DistInfo(rank=env["RANK"], world_size=world_size, local_rank=local_rank,
                    local_world_size=env["LOCAL_WORLD_SIZE"])
    if torch.cuda.is_available() and gpu_ids != []:
        ids = gpu_ids or list(range(torch.cuda.device_count()))
        info.device = torch.device("cuda", ids[local_rank % len(ids)])
        torch.cuda.set_device(info.device)
    if info.distributed:
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        given = dict(store=store, rank=info.rank, world_size=info.world_size) if store is not None else {}
        dist.init_process_group(backend, device_id=info.device if backend == "nccl" else None, **given)
    return info


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def launcher_env(rendezvous=True):
    """torchrun's variables as integers (a single process when none is set). Some of them without the
    rest (a shell opened inside a torchrun job, a script that exported RANK) is one line: run alone, this
    process would take a rank it does not have (RANK=1: no output, no file), or fail deep in torch.
    rendezvous: also MASTER_ADDR / MASTER_PORT for more than one process (env://; spawn gives a store)."""
    from . import UserError
    given = {k: os.environ[k] for k in LAUNCH_VARS if k in os.environ}
    shown = " ".join(f"{k}={v}" for k, v in given.items())
    hint = f"unset {' '.join(given)} to run one process, or start the command with torchrun"
    for k in ("RANK", "WORLD_SIZE"):  # LOCAL_RANK alone only picks this process's GPU
        if k not in given and ("RANK" in given or "WORLD_SIZE" in given):
            raise UserError(f"the environment has {shown} but no {k} (left over from torchrun?): {hint}")
    try:
        env = {k: int(given.get(k, default)) for k, default in
               (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", 1))}
    except ValueError:
        raise UserError(f"the environment's {shown} are not all integers: {hint}") from None
    if not (env["WORLD_SIZE"] >= 1 and 0 <= env["RANK"] < env["WORLD_SIZE"]
            and 0 <= env["LOCAL_RANK"] and ("LOCAL_WORLD_SIZE" not in given or env["LOCAL_RANK"] < env["LOCAL_WORLD_SIZE"])):
        raise UserError(f"the environment's {shown} name no rank of a process group: {hint}")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if rendezvous and env["WORLD_SIZE"] > 1 and missing:
        raise UserError(f"the environment has {shown} but no {' or '.join(missing)} (left over from torchrun?): "
                        f"{hint}")
    return env


def processes_to_start(nproc, gpu_ids):
    """How many ranks this command starts itself: --nproc N, else one per GPU of `--gpu 0,1,2,3`
    (the reference's multi-GPU commands); 1 under torchrun, which started them already."""
    from . import UserError
    launched = launcher_env()["WORLD_SIZE"] > 1
    cuda = torch.cuda.is_available() and gpu_ids != []
    if nproc is None:
        return len(gpu_ids) if gpu_ids and cuda and not launched else 1
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if launched:
        raise UserError(f"--nproc {nproc}: torchrun started this process as one of {os.environ['WORLD_SIZE']}; "
                        f"give one of the two")
    if cuda and nproc > len(gpu_ids or range(torch.cuda.device_count())):
        raise UserError(f"--nproc {nproc}: only {len(gpu_ids or range(torch.cuda.device_count()))} GPUs to use "
                        f"(--gpu {','.join(map(str, gpu_ids)) if gpu_ids else 'all'})")
    return nproc


STOP_CODES = {128 + s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}  # utils.lifecycle.preempt's clean stops


def spawn(nproc, fn, *args):
    """Run fn(*args, store=...) as ranks 0..nproc-1 of one process group on this machine, one process
    each (torch.multiprocessing, as PyTorch's ImageNet example does), with torchrun's environment.

    The rendezvous store is served from here on a port the OS picks and that stays bound for the
    whole run, so two runs never clash. SIGINT/SIGTERM/SIGUSR1 to this process reach every rank (which
    saves and stops as utils.lifecycle.preempt says); the exit then raises Preempted (128 + signal). A rank that
    fails ends the others: one UserError line naming the rank (a rank's own error line when it has one).
    """
    import torch.multiprocessing as mp
    from multiprocessing.connection import wait

    from . import Preempted, UserError
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"  # torchrun's default for more than one process per node
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    errors = mp.get_context("spawn").SimpleQueue()
    got = []

    def forward(signum, frame):
        got.append(signum)
        for p in procs:
            if p.exitcode is None:
                os.kill(p.pid, signum)

    procs = []
    stops = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}
    previous = {s: signal.signal(s, forward) for s in stops}
    try:
        # The ranks start with the stop signals blocked (a child inherits the mask): one sent to the group
        # while they import (seconds) waits until _rank_main has its handlers, instead of a traceback.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            procs += mp.start_processes(_rank_main, args=(nproc, store.port, errors, fn, args), nprocs=nproc,
                                        join=False, start_method="spawn").processes
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for signum in dict.fromkeys(got):  # taken while the ranks were starting: theirs too
            forward(signum, None)
        running, stop = dict((p.sentinel, r) for r, p in enumerate(procs)), 0
        while running:
            for sentinel in wait(list(running)):
                rank = running.pop(sentinel)
                procs[rank].join()
                code = procs[rank].exitcode
                if code == 0:
                    continue
                # saved and stopped, or killed at start-up (before its handlers: a Ctrl-C becomes SIGTERM there)
                if code in STOP_CODES or (got and code < 0 and 128 - code in STOP_CODES):
                    stop = stop or code
                    continue
                ended = {rank: code}
                deadline = time.monotonic() + 5  # the others fail too (the same error, a lost peer): let them say so
                while running and time.monotonic() < deadline:
                    for done in wait(list(running), timeout=max(0.0, deadline - time.monotonic())):
                        r = running.pop(done)
                        procs[r].join()
                        ended[r] = procs[r].exitcode
                for p in procs:
                    if p.exitcode is None:
                        p.kill()
                    p.join()
                raise UserError(_failure(ended, errors))
        if stop:  # 128 + the signal this process got (Ctrl-C: 130), else the one the ranks got
            raise Preempted(got[0] if got else stop - 128, "stopped")
    finally:
        for p in procs:
            p.join()
        for s, h in previous.items():
            signal.signal(s, h)


def _failure(ended, errors):
    """The one line for a failed run: a rank killed by a signal (the others only lost their peer),
    else the lowest rank's error line, else the lowest rank's traceback (printed) and its number."""
    said, tracebacks = {}, {}
    while not errors.empty():
        r, kind, text = errors.get()
        (said if kind == "error" else tracebacks).setdefault(r, text)
    killed = sorted(r for r, code in ended.items() if code is not None and code < 0)
    if killed:
        r = killed[0]
        return (f"rank {r} ended (killed by {signal.Signals(-ended[r]).name}); the other ranks were stopped; the "
                f"run folder keeps its last checkpoint")
    if said:
        r = min(said)
        return said[r] if r == 0 else f"rank {r}: {said[r]}"
    if tracebacks:
        r = min(tracebacks)
        print(tracebacks[r], file=sys.stderr, end="", flush=True)
        return f"rank {r} failed (traceback above); the other ranks were stopped"
    r = min(ended)
    return f"rank {r} ended with exit code {ended[r]}; the other ranks were stopped"


def _rank_main(rank, nproc, port, errors, fn, args):
    """One spawned rank: torchrun's variables, the parent's store, and the scripts' exit conventions."""
    import traceback

    import multiprocessing

    from . import Preempted, UserError, error_line
    from .lifecycle.processes import end_with_parent, end_workers
    end_with_parent(multiprocessing.parent_process().pid)  # a launcher killed by SIGKILL takes its ranks along
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # Ctrl-C in a terminal reaches every rank (and the parent forwards it): each stops as on SIGTERM,
    # at the same iteration and with a checkpoint, instead of dying mid-collective.
    signal.signal(signal.SIGINT, lambda signum, frame: signal.raise_signal(signal.SIGTERM))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1})  # spawn blocked them
    try:
        fn(*args, store=dist.TCPStore("127.0.0.1", port, is_master=False))
    except UserError as e:  # the launcher prints one line for all ranks
        errors.put((rank, "error", error_line(e)))
        sys.exit(1)
    except Preempted as e:
        sys.exit(e.exit_code)
    except Exception:  # a bug, or the loss of a peer: the launcher tells which and prints what matters
        errors.put((rank, "traceback", traceback.format_exc()))
        sys.exit(1)
    finally:
        # multiprocessing ends this process with its own exit handler, before atexit's, which waits
        # for ever on loader workers that ignore SIGTERM: end them here.
        end_workers()


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values, device):
    """Sum a list of numbers over all ranks, in float64 so counts and sums stay exact."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj):
    """Rank 0's picklable `obj` on every rank (a decision rank 0 took alone)."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def broadcast_buffers(model):
    """Give every rank rank 0's buffers (BatchNorm statistics). DDP broadcasts them at the start of
    each forward, so after the last training step every rank has updated its own copy once."""
    if dist.is_available() and dist.is_initialized():
        for b in model.buffers():
            dist.broadcast(b, src=0)


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
