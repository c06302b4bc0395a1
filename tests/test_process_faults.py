"""Process-level faults (issue 24, issue 25's "no orphans"): a loader worker killed or stopped mid-epoch,
a signal while the fork server starts, the trainer killed by SIGKILL, a torchrun environment left
half set, and the signal cases repeated under load. The --nproc cases (a stop, an error, a killed
rank, with loader workers) are in test_spawn.py. docs/reliability.md says what each must end in."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (ROOT, TINY, assert_same_weights, descendants, finish, make_tiny_data, read_until, run_cli,
                      run_dir, seed, start_cli, started, still_running)



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 8 images per class at -b 2: 12 steps an epoch.
    return make_tiny_data(tmp_path_factory.mktemp("procfaults") / "data", train_per_class=8, val_per_class=2)


def argv(data, ckpt, *extra):
    return [sys.executable, str(ROOT / "main_imagenet.py"), str(data), *TINY, "-b", "2", "--lr", "0.01", "-p", "1",
            "--seed", str(seed(0)), "--epochs", "2", "--ckpt", str(ckpt), *map(str, extra)]


def workers_of(pid):
    """The loader workers of a single-process run: its children other than multiprocessing's helpers."""
    kids = [int(k) for t in Path(f"/proc/{pid}/task").iterdir() for k in (t / "children").read_text().split()]
    return [k for k in kids if b"resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes()]


def errors(err):
    return [line for line in err.splitlines() if line.strip()]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_a_killed_loader_worker_saves_and_the_run_resumes_exactly(data, tmp_path):
    """SIGKILL to a loader worker mid-epoch (the OOM killer's choice): one line, exit 1, the steps done
    saved as on SIGTERM (or, when no step of the epoch was done yet, the last checkpoint kept); the
    resume ends with the weights, momentum and figures of a run never interrupted."""
    reference = run_cli(argv(data, tmp_path / "whole", "-j", "0")[2:], timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    proc = start_cli(argv(data, tmp_path / "cut", "-j", "2"))
    read_until(proc, "Epoch: [1][ 3/")
    os.kill(workers_of(proc.pid)[0], signal.SIGKILL)
    out, err = finish(proc)
    assert proc.returncode == 1 and len(errors(err)) == 1 and "Traceback" not in err, (out[-2000:], err[-3000:])
    line = errors(err)[0]
    assert line.startswith("error: loader worker (pid ") and "was killed by SIGKILL" in line, line
    run = run_dir(argv(data, tmp_path / "cut")[2:])
    ck = load(run / "checkpoint.pth.tar")
    assert ("checkpoint saved" in line and f"iteration {ck['iteration']}/12" in line) or (
        "keeps its last checkpoint" in line and ck["iteration"] == 0), (line, ck["epoch"], ck["iteration"])
    resumed = run_cli(argv(data, tmp_path / "cut", "-j", "2", "--resume", run / "checkpoint.pth.tar")[2:], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = run_dir(argv(data, tmp_path / "whole")[2:])
    assert_same_weights(load(ref / "checkpoint.pth.tar"), load(run / "checkpoint.pth.tar"), momentum=True)
    rows = [(run / "metrics.jsonl").read_text(), (ref / "metrics.jsonl").read_text()]
    keys = ("epoch", "train_loss", "train_acc1", "val_loss", "val_acc1")
    import json
    assert [[json.loads(r)[k] for k in keys] for r in rows[0].splitlines()] == [
        [json.loads(r)[k] for k in keys] for r in rows[1].splitlines()]


@pytest.mark.parametrize("then", [None, signal.SIGTERM], ids=["alone", "then-sigterm"])
def test_a_stopped_loader_worker_is_detected_and_a_stop_signal_honoured(data, tmp_path, then):
    """SIGSTOP to a loader worker: the batch it owes never comes. Detected (stopped 5 s while awaited:
    the worker is ended), the run stops in one line, exit 1, with a checkpoint to resume from; a
    SIGTERM to the run meanwhile is honoured: saved, exit 143."""
    proc = start_cli(argv(data, tmp_path, "-j", "2"))
    read_until(proc, "Epoch: [1][ 3/")
    os.kill(workers_of(proc.pid)[0], signal.SIGSTOP)
    if then:
        time.sleep(1)
        os.kill(proc.pid, then)
    out, err = finish(proc, timeout=120)
    ck = load(run_dir(argv(data, tmp_path)[2:]) / "checkpoint.pth.tar")
    if then:
        assert proc.returncode == 143 and err.strip() == "", (out[-2000:], err[-3000:])
        assert f"stopped by SIGTERM at epoch {ck['epoch'] + 1}, iteration {ck['iteration']}/12" in out, out[-2000:]
    else:
        line = errors(err)
        assert proc.returncode == 1 and len(line) == 1 and "Traceback" not in err, (out[-2000:], err[-3000:])
        assert "was stopped (SIGSTOP?) and gave no batch for" in line[0], line
        assert "checkpoint saved; continue with --resume" in line[0] or "keeps its last checkpoint" in line[0], line


def test_a_signal_to_the_fork_server_as_it_starts_leaves_it_serving(tiny_data, monkeypatch):
    """The fork server (DDP ranks on Pythons where a fork can hang) is started with Ctrl-C and the stop
    signals blocked: sent to it in its first second (a terminal's Ctrl-C or scancel reach the whole
    group), before it ignores them, they wait and are dropped, instead of killing it (the next worker
    start was an EOFError traceback). Sent here the moment it was started."""
    import multiprocessing.forkserver as fs

    import torch.distributed as dist

    from utils.inputs.data import EpochLoader, SafeImageFolder, TrainTransform, collate_skipping
    from utils.lifecycle import processes
    monkeypatch.setattr(processes, "fork_can_hang", lambda version=None: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # as in a DDP rank
    if fs._forkserver._forkserver_pid is not None:  # one from an earlier test: start a fresh one
        os.kill(fs._forkserver._forkserver_pid, signal.SIGKILL)
        fs._forkserver._stop()
    ds = SafeImageFolder(tiny_data / "train", TrainTransform(16))
    loader = EpochLoader(ds, 5, 1, seed=7, collate_fn=collate_skipping)
    server = fs._forkserver._forkserver_pid
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        os.kill(server, s)
    monkeypatch.undo()
    assert loader.loader.multiprocessing_context.get_start_method() == "forkserver"
    images = next(iter(loader(0)))[0]  # a worker from that server
    assert torch.equal(images, next(iter(EpochLoader(ds, 5, 0, seed=7, collate_fn=collate_skipping)(0)))[0])
    assert started(server) is not None


@pytest.mark.parametrize("env, says", [
    ({"RANK": "1"}, "the environment has RANK=1 but no WORLD_SIZE"),
    ({"WORLD_SIZE": "2"}, "the environment has WORLD_SIZE=2 but no RANK"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "but no MASTER_ADDR or MASTER_PORT"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "name no rank of a process group"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "are not all integers")])
def test_a_torchrun_environment_left_half_set_is_one_line(data, tmp_path, env, says, monkeypatch, capsys):
    """RANK or WORLD_SIZE without the rest (a shell opened inside a torchrun job): one line naming them,
    before anything runs (RANK=1 alone used to run silently as a rank that writes nothing)."""
    import main_imagenet
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        main_imagenet.main(argv(data, tmp_path, "-j", "0")[2:])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(errors(err)) == 1, err[-3000:]
    assert says in err and "start the command with torchrun" in err, err
    assert not run_dir(argv(data, tmp_path)[2:]).exists()


@pytest.mark.parametrize("nproc", [1, 2])
def test_no_process_outlives_a_trainer_killed_by_sigkill(data, tmp_path, nproc):
    """The trainer killed by SIGKILL (the OOM killer, a scheduler's hard kill) runs no exit handler:
    every process it started (loader workers; with --nproc 2 the ranks, their fork servers and workers)
    ends within 10 s by itself (PR_SET_PDEATHSIG)."""
    proc = start_cli(argv(data, tmp_path, "-j", "2", *(["--nproc", nproc, "-b", "4"] if nproc > 1 else [])))
    read_until(proc, "Epoch: [1][")
    family = {p: started(p) for p in descendants(proc.pid)[1:]}
    assert len(family) >= (2 if nproc == 1 else 6), family  # workers; ranks + fork servers + workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    left = still_running(family, within=10)
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, {p: Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left}


def stress_repeats():
    return int(os.environ.get("SIMAM_STRESS_REPEATS", "1"))


def test_signals_under_load_end_in_one_line(data, tmp_path):
    """The signal cases, repeated under load (a CPU hog beside them) at random moments of the run's
    life once its folder is open (the model's build, the workers' start, training, the epoch's end): Ctrl-C to the group, once or
    twice; SIGTERM to the group; SIGTERM to the trainer alone. Each must end in its one line or stop
    message, with no traceback and no process left. SIMAM_STRESS_REPEATS=N repeats it N times (1 in
    the suite; docs/testing.md)."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    rng = random.Random(seed(5))
    cases = [("group", [signal.SIGINT]), ("group", [signal.SIGINT, signal.SIGINT]),
             ("group", [signal.SIGTERM]), ("main", [signal.SIGTERM])]
    try:
        for i in range(stress_repeats()):
            target, sigs = cases[i % len(cases)] if stress_repeats() > 1 else rng.choice(cases)
            ckpt = tmp_path / str(i)
            proc = start_cli(argv(data, ckpt, "-j", "2"))  # 2 epochs: a second start of the workers too
            read_until(proc, "run folder:")  # Python's start-up and imports are behind (Ctrl-C there: Python's own)
            time.sleep(rng.uniform(0.0, 4.0))
            for k, s in enumerate(sigs):
                time.sleep(0.05 if k else 0)
                if proc.poll() is None:
                    os.killpg(proc.pid, s) if target == "group" else os.kill(proc.pid, s)
            out, err = finish(proc)
            where = f"repeat {i}: {target} {[signal.Signals(s).name for s in sigs]}"
            assert "Traceback" not in err and "Exception" not in err, f"{where}\n{err[-3000:]}"
            if "done: best Acc@1" in out:  # the run had ended: the signal came as it exited, or after
                assert proc.returncode in (0, 128 + sigs[0], -sigs[0]), f"{where}\n{err[-3000:]}"
                continue
            if sigs[0] == signal.SIGINT:
                assert proc.returncode == 130 and errors(err) == [
                    "error: interrupted (Ctrl-C); files already written are complete"], f"{where}\n{err[-3000:]}"
            else:  # saved and stopped (143), or killed before the handlers were set (-15): nothing to save
                assert proc.returncode in (143, -15) and errors(err) == [], f"{where}\n{err[-3000:]}"
                assert proc.returncode == -15 or "stopped by SIGTERM" in out, f"{where}\n{out[-2000:]}"
    finally:
        hog.kill()
        hog.wait()


def test_a_hand_over_cut_by_the_main_process_prints_nothing_in_a_worker():
    """A worker hands batch tensors over through multiprocessing's resource sharer (a thread that
    serves file descriptors); a main process stopping mid-hand-over (Ctrl-C) cuts the connection, and
    the sharer's thread reported it through sys.excepthook: a traceback under the run's one line (seen
    in test_faults' Ctrl-C test). A worker (ignore_stop_signals_in_worker) stays quiet; any other error
    is still printed. Here the cut is a connection reset during the sharer's handshake."""
    script = """
import os, socket, struct, sys, time
from multiprocessing import resource_sharer
from utils.lifecycle.processes import ignore_stop_signals_in_worker
if sys.argv[1] == "worker":
    ignore_stop_signals_in_worker()
r, w = os.pipe()
resource_sharer.DupFd(r)  # starts the sharer's thread, as a worker's first tensor does
s = socket.socket(socket.AF_UNIX)
s.connect(resource_sharer._resource_sharer._address)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()  # a reset in the middle of the handshake
time.sleep(1)
sys.excepthook(ValueError, ValueError("another error"), None)
"""
    for role in ("worker", "plain"):
        proc = subprocess.run([sys.executable, "-c", script, role], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "ValueError: another error" in proc.stderr  # other errors are still printed
        cut = "resource_sharer.py" in proc.stderr  # its traceback (ConnectionReset or BrokenPipe, as timing goes)
        assert cut == (role == "plain"), (role, proc.stderr)


def _sigterm_before_ignoring(worker_id):
    """A worker_init_fn: a SIGTERM (not from the parent) reaches the worker before it ignores the stop
    signals, as a group's SIGTERM can while workers start; torch's own SIGTERM handler is set by then."""
    from utils.lifecycle.processes import ignore_stop_signals_in_worker
    os.kill(os.getpid(), signal.SIGTERM)
    ignore_stop_signals_in_worker(worker_id)


@pytest.mark.parametrize("fork_server", [False, True], ids=["forked", "fork-server"])
def test_a_stop_signal_to_a_starting_worker_waits_until_it_is_ignored(monkeypatch, fork_server):
    """A worker takes the stop signals held from its fork (stop_signals_held around the loader's start;
    the fork server keeps them blocked) and drops them when it ignores them: a group's SIGTERM while the
    workers start (a validation loader's, every epoch) no longer kills one under torch's SIGTERM handler,
    which made the run stop as on a worker failure, exit 1, instead of saving (seen under load)."""
    from torch.utils.data import DataLoader

    from utils.lifecycle import processes
    context = None
    if fork_server:  # as in a DDP rank on a Python where a fork can hang
        monkeypatch.setattr(processes, "fork_can_hang", lambda version=None: True)
        context = processes.worker_start_method(2, process_group=True)
        assert context is not None and context.get_start_method() == "forkserver"
    loader = DataLoader(range(6), batch_size=2, num_workers=2, worker_init_fn=_sigterm_before_ignoring,
                        multiprocessing_context=context)
    assert [b.tolist() for b in processes.watch_workers(loader)] == [[0, 1], [2, 3], [4, 5]]
