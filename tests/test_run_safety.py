"""A run is never lost: re-runs, older resumes, two writers, kills between writes, SIGTERM mid-epoch.

Every case runs the real CLI on tiny data and asserts the files on disk afterwards."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, THREADS, TINY, assert_same_weights, make_tiny_data, run_cli, run_dir, run_in_process, seed


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def one_line_error(proc, code=1):
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def snapshot(run_dir):
    """The bytes of every file that holds results."""
    return {n: (run_dir / n).read_bytes() for n in ("checkpoint.pth.tar", "model_best.pth.tar", "metrics.jsonl")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 20 images per class at -b 2: 30 steps an epoch, so a signal lands inside an epoch.
    return make_tiny_data(tmp_path_factory.mktemp("safety") / "data", train_per_class=20, val_per_class=3)


def args(data, ckpt, epochs, *extra):
    return [data, *TINY, "-b", "2", "--lr", "0.01", "-j", "0", "--seed", seed(0), "--epochs", epochs,
            "--ckpt", ckpt, *extra]


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 2-epoch run, uninterrupted: the reference for the other tests."""
    ckpt = tmp_path_factory.mktemp("finished")
    ok(run_in_process(args(data, ckpt, 2)))
    return run_dir(args(data, ckpt, 2))


def test_rerun_of_a_finished_run_is_a_noop_and_an_unfinished_one_is_refused(data, finished, tmp_path):
    before = snapshot(finished)
    again = ok(run_in_process(args(data, finished.parent, 2)))
    assert "already finished" in again.stdout and "nothing to do" in again.stdout
    assert again.stdout.rstrip().splitlines()[-1].startswith("done: best Acc@1 ")  # what sweeps and seed scripts read
    assert snapshot(finished) == before

    # A run of 3 epochs is another recipe: another folder (tests/test_run_identity.py), this one untouched.
    assert run_dir(args(data, finished.parent, 3)) != finished


def test_an_unfinished_run_is_never_started_over_by_the_same_command(data, finished, tmp_path):
    """A folder holding a checkpoint at epoch 1 of 2 (a copy): the same command is refused, naming the
    folder, its epoch and the ways on."""
    run = run_dir(args(data, tmp_path, 2))
    shutil.copytree(finished, run)
    ck = load(run / "checkpoint.pth.tar")
    ck["epoch"] = 1
    torch.save(ck, run / "checkpoint.pth.tar")
    before = snapshot(run)
    err = one_line_error(run_in_process(args(data, tmp_path, 2)))
    assert str(run) in err and "epoch 1/2" in err
    assert f"--resume {run / 'checkpoint.pth.tar'}" in err and "--ckpt" in err
    assert snapshot(run) == before


@pytest.fixture(scope="module")
def after_one_epoch(data, tmp_path_factory):
    """The same run stopped after its first epoch (a fresh run's first epoch is always its best)."""
    ckpt = tmp_path_factory.mktemp("one_epoch")
    ok(run_in_process(args(data, ckpt, 1)))
    return run_dir(args(data, ckpt, 1))


def test_an_older_checkpoint_is_never_resumed_over_a_newer_run(data, finished, after_one_epoch, tmp_path):
    older = after_one_epoch / "checkpoint.pth.tar"
    before = snapshot(finished)
    err = one_line_error(run_in_process(args(data, finished.parent, 2, "--resume", older)))
    assert "older than" in err and "epoch 1/2" in err and "epoch 2/2" in err
    assert snapshot(finished) == before
    # The same checkpoint into a folder of its own is a branch, and is allowed.
    ok(run_in_process(args(data, tmp_path / "branch", 2, "--resume", older)))
    assert [r["epoch"] for r in rows(run_dir(args(data, tmp_path / "branch", 2)))] == [1, 2]


def test_two_runs_into_one_folder_the_second_stops_at_once(data, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=THREADS)
    cmd = [sys.executable, str(ROOT / "main_imagenet.py")] + [str(a) for a in args(data, tmp_path, 3)]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:  # the folder is locked before this line is printed
            if line.startswith("run folder:"):
                break
        second = run_in_process(args(data, tmp_path, 3))
        err = one_line_error(second)
        assert "in use by pid" in err and str(run_dir(args(data, tmp_path, 3))) in err
        out, _ = first.communicate(timeout=180)
    finally:
        first.kill()
    assert first.returncode == 0
    run = run_dir(args(data, tmp_path, 3))
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3]
    assert load(run / "checkpoint.pth.tar")["epoch"] == 3
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))


def test_kill_between_checkpoint_and_metrics_loses_nothing(data, finished, after_one_epoch, tmp_path):
    """The state a kill right after the epoch-2 checkpoint leaves: model_best still the epoch-1 file
    (whichever epoch is best: the copy of a better epoch 2 had not happened yet), the epoch-2 row half
    written, a temporary file of the save. A resume makes it whole, whatever epoch is best."""
    run = tmp_path / finished.name
    shutil.copytree(finished, run)
    full = rows(finished)
    ck = load(run / "checkpoint.pth.tar")
    shutil.copyfile(after_one_epoch / "checkpoint.pth.tar", run / "model_best.pth.tar")
    (run / "metrics.jsonl").write_text(json.dumps(full[0]) + "\n" + json.dumps(full[1])[:25])
    (run / ".checkpoint.pth.tar.12345.tmp").write_bytes(b"half a checkpoint")
    proc = ok(run_in_process(args(data, tmp_path, 3, "--resume", run / "checkpoint.pth.tar")))
    assert "removed a stale temporary file" in proc.stdout
    assert not (run / ".checkpoint.pth.tar.12345.tmp").exists()
    restored = "model_best.pth.tar was behind the checkpoint" in proc.stdout
    assert restored == (ck["best_epoch"] == 2), proc.stdout[-2000:]  # only a better epoch 2 needs the copy
    got = rows(run)
    assert [r["epoch"] for r in got] == [1, 2, 3] and got[:2] == full
    final = load(run / "checkpoint.pth.tar")
    best = load(run / "model_best.pth.tar")
    assert best["epoch"] == final["best_epoch"] and best["best_acc1"] == max(r["val_acc1"] for r in got)
    assert got[best["epoch"] - 1]["val_acc1"] == best["best_acc1"]
    assert_same_weights({1: load(after_one_epoch / "checkpoint.pth.tar"), 2: ck, 3: final}[best["epoch"]], best)


@pytest.mark.parametrize("best_epoch", [1, 2])
def test_a_missing_model_best_is_restored_from_the_checkpoint_or_said_to_be_lost(tmp_path, best_epoch):
    """repair(): model_best gone after epoch 2. When epoch 2 is best the checkpoint holds its weights
    and is copied; when epoch 1 was, they are in no file: one line says so and nothing is made up."""
    from utils.lifecycle import runfolder
    ckpt = {"epoch": 2, "iteration": 0, "best_epoch": best_epoch, "best_acc1": 50.0,
            "metrics": [{"epoch": 1}, {"epoch": 2}], "state_dict": {"w": torch.ones(2)}}
    torch.save(ckpt, tmp_path / "checkpoint.pth.tar")
    runfolder.write_rows(tmp_path / "metrics.jsonl", ckpt["metrics"])  # the rows are whole: only model_best is off
    said = []
    runfolder.repair(tmp_path, ckpt, True, said.append)
    assert [r["epoch"] for r in rows(tmp_path)] == [1, 2]
    if best_epoch == 2:
        assert load(tmp_path / "model_best.pth.tar")["epoch"] == 2
        assert said == ["model_best.pth.tar was behind the checkpoint (a kill or a full disk between the two writes): copied epoch 2"]
    else:
        assert not (tmp_path / "model_best.pth.tar").exists()
        assert len(said) == 1 and said[0].startswith("warning: ") and "cannot be restored" in said[0]
        assert "best epoch 1" in said[0] and str(tmp_path / "model_best.pth.tar") in said[0]
    said.clear()
    runfolder.repair(tmp_path, ckpt, True, said.append)  # the next resume: restored stays restored
    assert len(said) == (0 if best_epoch == 2 else 1)


def run_until(cmd, marker, sig, timeout=180):
    """Start `cmd`, send `sig` once a stdout line contains `marker`; returns (returncode, stdout, stderr)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=THREADS)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, deadline = [], time.time() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                proc.send_signal(sig)
                break
            assert time.time() < deadline, "".join(lines)
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, "".join(lines) + out, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_mid_epoch_saves_and_the_resume_is_bit_exact(data, finished, tmp_path, sig):
    cmd = [sys.executable, str(ROOT / "main_imagenet.py")] + [str(a) for a in args(data, tmp_path, 2, "-p", "1")]
    code, out, err = run_until(cmd, "Epoch: [2][ 3/30]", sig)
    assert code == 128 + sig, (out[-2000:], err[-2000:])
    run = run_dir(args(data, tmp_path, 2))
    stop = [line for line in out.splitlines() if line.startswith("stopped by")]
    assert len(stop) == 1 and signal.Signals(sig).name in stop[0], out[-2000:]
    ck = load(run / "checkpoint.pth.tar")
    assert ck["epoch"] == 1 and 3 <= ck["iteration"] < 30, (ck["epoch"], ck["iteration"])
    assert f"epoch 2, iteration {ck['iteration']}/30" in stop[0]
    assert [r["epoch"] for r in rows(run)] == [1]

    ok(run_in_process(args(data, tmp_path, 2, "--resume", run / "checkpoint.pth.tar")))
    ref, got = load(finished / "checkpoint.pth.tar"), load(run / "checkpoint.pth.tar")
    assert got["epoch"] == 2 and got["iteration"] == 0
    assert_same_weights(ref, got, momentum=True)
    want, have = rows(finished), rows(run)
    assert [r["epoch"] for r in have] == [1, 2]  # every epoch exactly once
    for key in ("train_loss", "train_acc1", "val_loss", "val_acc1", "val_acc5"):
        assert [r[key] for r in have] == [r[key] for r in want], key


def test_timed_saves_inside_an_epoch(data, tmp_path):
    proc = ok(run_in_process(args(data, tmp_path, 1, "--save-every-minutes", "0.0001")))
    saves = [line for line in proc.stdout.splitlines() if "(--save-every-minutes)" in line]
    assert saves and all("at epoch 1, iteration" in s for s in saves)
    ck = load(run_dir(args(data, tmp_path, 1)) / "checkpoint.pth.tar")
    assert ck["epoch"] == 1 and ck["iteration"] == 0


def test_sigterm_to_every_process_of_the_job_with_loader_workers(data, finished, tmp_path):
    """SLURM signals every process of a job, loader workers included: they must live on while the
    main process finishes its step and saves. Augmentation is seeded per sample, so the resumed run
    with 2 workers ends with the weights of the uninterrupted run with none."""
    cmd = [sys.executable, str(ROOT / "main_imagenet.py")] + [
        str(a) for a in args(data, tmp_path, 2, "-p", "1", "-j", "2")]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=THREADS)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if "Epoch: [2][ 3/30]" in line:
                os.killpg(proc.pid, signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM at epoch 2, iteration" in out
    run = run_dir(args(data, tmp_path, 2))
    ck = load(run / "checkpoint.pth.tar")
    assert ck["epoch"] == 1 and ck["iteration"] >= 3

    ok(run_cli(args(data, tmp_path, 2, "-j", "2", "--resume", run / "checkpoint.pth.tar")))
    assert_same_weights(load(finished / "checkpoint.pth.tar"), load(run / "checkpoint.pth.tar"))
    assert [r["val_acc1"] for r in rows(run)] == [r["val_acc1"] for r in rows(finished)]


def test_slurm_script_saves_and_requeues_before_the_time_limit(data, finished, tmp_path):
    """scripts/slurm_train.sh under a stand-in SLURM: `srun` runs its command here, `scontrol`
    answers the host list and records requeues. SIGUSR1 to the batch script (what --signal=B:USR1
    sends) must reach the training process through torchrun, save mid-epoch and requeue; the
    requeued job resumes and ends with the uninterrupted run's weights."""
    import socket
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nshift\nexec "$@"\n')  # drop --kill-on-bad-exit=1
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\n[ "$1" = show ] && echo localhost && exit 0\n'
                                      f'echo "$@" >> {tmp_path / "scontrol.log"}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", GPUS_PER_NODE="1", WORKERS="0",
               PORT=str(port), PYTHON=sys.executable, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=THREADS)
    ckpt = tmp_path / "my runs ü"  # a path with a space and a non-ASCII letter, whole through every step
    cmd = ["bash", str(ROOT / "scripts" / "slurm_train.sh"), "none", str(data), *TINY[:-2], "-p", "1", "-b", "2",
           "--lr", "0.01", "--seed", str(seed(0)), "--epochs", "2", "--ckpt", str(ckpt)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if "Epoch: [2][ 3/30]" in line:
                proc.send_signal(signal.SIGUSR1)
                break
        out, err = proc.communicate(timeout=180)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert "SIGUSR1: asking the run to save" in out and "stopped by SIGTERM at epoch 2, iteration" in out, err[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    run = run_dir(args(data, ckpt, 2))
    assert load(run / "checkpoint.pth.tar")["iteration"] >= 3

    # The requeued job: the same command, which now resumes.
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"resuming from {run / 'checkpoint.pth.tar'}\n" in again.stdout, again.stderr[-3000:]
    assert_same_weights(load(finished / "checkpoint.pth.tar"), load(run / "checkpoint.pth.tar"))
    assert [r["epoch"] for r in rows(run)] == [1, 2]
