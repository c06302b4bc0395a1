"""Runs that start their own DDP ranks (--nproc N, or --gpu 0,1,.. on a GPU machine; torch.multiprocessing):
two at once, a stop by signal to the launching process and the resume, a rank that dies. The equality
with torchrun is in test_train.py (test_nproc_equals_torchrun_bit_for_bit)."""
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from conftest import (ROOT, TINY, assert_same_weights, descendants, finish, make_tiny_data, read_until, run_cli,
                      run_dir, seed, start_cli, started, still_running)



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("spawn") / "data")  # 24 images: 6 steps of 2 per rank at -b 4


def cmd(data, ckpt, *extra):
    return [sys.executable, str(ROOT / "main_imagenet.py"), str(data), *TINY, "-b", "4", "--lr", "0.01", "-j", "0",
            "--seed", str(seed(2)), "--epochs", "2", "--nproc", "2", "-p", "1", "--ckpt", str(ckpt),
            *map(str, extra)]


def ranks_of(pid):
    """The rank processes a launcher started (its spawn children, not multiprocessing's resource tracker)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(k) for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_at_once_and_sigterm_to_the_launcher_saves_every_rank_and_resumes_exactly(data, tmp_path):
    """Two --nproc 2 runs at the same time (each picks its own free port). SIGTERM to one launcher (-j 2)
    reaches both of its ranks, which save mid-epoch and stop: the command returns 143 and leaves no
    process (ranks, their fork servers and workers); the resume ends with the uninterrupted run's
    weights and figures."""
    whole = start_cli(cmd(data, tmp_path / "whole"))
    stopped = start_cli(cmd(data, tmp_path / "stopped", "-j", "2"))  # with loader workers (each rank's fork server)
    read_until(stopped, "Epoch: [2][1/6]")
    os.kill(stopped.pid, signal.SIGTERM)  # the launcher alone, as a scheduler or `kill` would
    out, err = finish(stopped)
    assert stopped.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert out.count("stopped by SIGTERM at epoch 2, iteration") == 1 and "Traceback" not in err, (out, err)
    run = run_dir(cmd(data, tmp_path / "stopped")[2:])
    ck = load(run / "checkpoint.pth.tar")
    assert ck["epoch"] == 1 and 1 <= ck["iteration"] < 6 and [r["epoch"] for r in rows(run)] == [1]

    out_w, err_w = finish(whole)
    assert whole.returncode == 0, err_w[-3000:]
    proc = run_cli(cmd(data, tmp_path / "stopped", "--resume", run / "checkpoint.pth.tar")[2:], timeout=300)
    assert proc.returncode == 0 and "=> resumed from" in proc.stdout, proc.stderr[-3000:]
    ref = run_dir(cmd(data, tmp_path / "whole")[2:])
    assert_same_weights(load(ref / "checkpoint.pth.tar"), load(run / "checkpoint.pth.tar"), momentum=True)
    for key in ("train_loss", "train_acc1", "val_loss", "val_acc1", "val_acc5"):
        assert [r[key] for r in rows(run)] == [r[key] for r in rows(ref)], key


def test_ctrl_c_in_a_terminal_stops_every_rank_with_a_checkpoint(data, tmp_path):
    """A terminal's Ctrl-C goes to the whole foreground group, launcher, ranks and loader workers (-j 2):
    the ranks stop at one iteration as on SIGTERM, rank 0 saves, and the command exits 130, leaving no
    process."""
    proc = start_cli(cmd(data, tmp_path, "--epochs", "1", "-j", "2"))
    read_until(proc, "Epoch: [1][1/6]")
    os.killpg(proc.pid, signal.SIGINT)
    out, err = finish(proc)
    assert proc.returncode == 128 + signal.SIGINT, (out[-2000:], err[-3000:])
    assert out.count("stopped by SIGTERM at epoch 1, iteration") == 1 and "Traceback" not in err, err[-3000:]
    ck = load(run_dir(cmd(data, tmp_path, "--epochs", "1")[2:]) / "checkpoint.pth.tar")
    assert ck["epoch"] == 0 and 1 <= ck["iteration"] < 6


def test_a_rank_that_dies_ends_the_others_with_one_line(data, tmp_path):
    """A rank killed by SIGKILL (the OOM killer): one line, exit 1, and its own fork server and loader
    workers (-j 2), which no exit handler of the dead rank can end, end too."""
    proc = start_cli(cmd(data, tmp_path, "--epochs", "1", "-j", "2"))
    read_until(proc, "Epoch: [1][1/6]")
    ranks = ranks_of(proc.pid)
    assert len(ranks) == 2
    below = {p: started(p) for p in descendants(ranks[-1])[1:]}
    assert len(below) >= 2, below  # its fork server and its loader worker (-j 2 over 2 ranks: one each)
    os.kill(ranks[-1], signal.SIGKILL)
    assert still_running(below) == {}
    out, err = finish(proc)
    assert proc.returncode == 1, (out[-2000:], err[-3000:])
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("error: rank ") and "ended (killed by SIGKILL); the other ranks were stopped" in lines[0]
    for pid in ranks:  # none left behind
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_an_error_in_the_ranks_with_loader_workers_is_one_line(data, tmp_path):
    """A UserError inside both ranks while their loader workers run (every training image unreadable:
    the workers raise "16 unreadable images in a row"): the command returns 1 with that one line and
    leaves no process."""
    import shutil
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    for f in (broken / "train").rglob("*.*"):
        f.write_bytes(b"not an image")
    proc = start_cli(cmd(broken, tmp_path / "ck", "--epochs", "1", "-j", "2"))
    out, err = finish(proc)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, (out[-2000:], err[-3000:])
    assert lines[0].startswith("error: ") and "unreadable images in a row" in lines[0], lines


def test_nproc_is_refused_under_torchrun_and_checked(monkeypatch):
    from utils import UserError
    from utils.distributed import processes_to_start
    with pytest.raises(UserError, match="--nproc must be at least 1, got 0"):
        processes_to_start(0, [])
    assert processes_to_start(None, []) == processes_to_start(None, None) == 1
    assert processes_to_start(3, []) == 3  # --gpu -1: gloo ranks on the CPU
    for k, v in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():  # torchrun's
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match="torchrun started this process as one of 2"):
        processes_to_start(2, [])


def test_every_scripts_task_travels_to_spawned_ranks():
    """spawn pickles the Task for its processes: no closures or lambdas in any script's."""
    import pickle

    import main_cifar
    import main_coco
    import main_imagenet
    from utils.args import parse_args
    cifar = parse_args(main_cifar.get_args_parser(), ["--dataset", "cifar10", "--nproc", "2"])
    coco = main_coco.resolve_defaults(parse_args(main_coco.get_args_parser(), ["DATA", "--nproc", "2"]))
    for task in (main_imagenet.TASK, main_cifar.make_task(cifar), main_coco.make_task(coco)):
        again = pickle.loads(pickle.dumps(task))
        assert again.name == task.name and again.loader.__module__ == task.loader.__module__
    assert (cifar.nproc, coco.nproc) == (2, 2)


def test_the_references_gpu_list_starts_one_rank_per_gpu(monkeypatch):
    """`--gpu 0,1,2,3` without torchrun (the reference README's commands) starts 4 ranks, local rank i on
    the i-th listed GPU; under torchrun, which started the ranks, the list only maps them. CUDA is
    faked: the counting and the mapping need no GPU (the ranks' training is the CPU's, tested above)."""
    from utils import UserError
    from utils.distributed import init_distributed, processes_to_start
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert processes_to_start(None, [0, 1, 2, 3]) == 4
    assert processes_to_start(None, [2]) == processes_to_start(None, None) == 1
    assert processes_to_start(2, [0, 1, 2, 3]) == 2 and processes_to_start(4, None) == 4  # None: every GPU
    with pytest.raises(UserError, match=r"--nproc 3: only 2 GPUs to use \(--gpu 2,3\)"):
        processes_to_start(3, [2, 3])
    for local_rank, want in ((0, 2), (1, 3)):  # --gpu 2,3: rank 0 on cuda:2, rank 1 on cuda:3
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        assert init_distributed([2, 3]).device == torch.device("cuda", want)
    assert chosen == [torch.device("cuda", 2), torch.device("cuda", 3)]
    for k, v in dict(RANK="0", WORLD_SIZE="4", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():  # torchrun's
        monkeypatch.setenv(k, v)
    assert processes_to_start(None, [0, 1, 2, 3]) == 1
