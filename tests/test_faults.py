"""Faults that reach a whole job or a whole disk, and files torn by a crash (issue 17): each test makes
the fault itself and checks the one line it ends with and the files left on disk.

- signals to every process of the job (SLURM's scancel / time limit, a terminal's Ctrl-C) with loader workers;
- a disk that fills up during the checkpoint write, the model_best copy and at the start (the lock);
- a torn args.json, a run named twice, a binary --config.
"""
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import main_imagenet
from conftest import ROOT, THREADS, TINY, make_tiny_data, run_cli, seed
from utils import UserError
from utils.lifecycle import runfolder
from utils.lifecycle.checkpoint import save_atomic

RUN = f"imagenet-resnet18-seed{seed(0)}"


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def temporaries(run_dir):
    return sorted(p.name for p in run_dir.glob("*.tmp")) + sorted(p.name for p in run_dir.glob(".*.tmp"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 8 images per class at -b 2: 12 steps an epoch.
    return make_tiny_data(tmp_path_factory.mktemp("faults") / "data", train_per_class=8, val_per_class=2)


def args(data, ckpt, epochs, *extra):
    return [data, *TINY, "-b", "2", "--lr", "0.01", "-j", "0", "--seed", seed(0), "--epochs", epochs,
            "--ckpt", ckpt, *extra]


# ---------------------------------------------------------------- signals to the whole process group

def signal_group(cmd, marker, sigs, gap=0.05, timeout=240):
    """Start `cmd` in a session of its own; once a stdout line holds `marker`, send each of `sigs` to
    the whole process group (`gap` seconds apart), as scancel or a terminal's Ctrl-C do. Returns
    (returncode, stdout, stderr) once every process of the group has ended."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=THREADS)  # as run_cli: the runs compared must agree
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines, sent = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                for i, s in enumerate(sigs):
                    time.sleep(gap if i else 0)
                    os.killpg(proc.pid, s)
                sent = True
                break
        out, err = proc.communicate(timeout=timeout)
        deadline = time.time() + 10  # workers are ended by the main process: none may outlive it
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("a process of the group outlived the main process (a loader worker left running)")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert sent, ("".join(lines) + out)[-3000:] + err[-3000:]
    return proc.returncode, "".join(lines) + out, err


def test_sigterm_to_the_group_with_coco_loader_workers_saves_and_resumes(tmp_path):
    """The COCO loader's workers (-j 2) live on through scancel's SIGTERM; the main process saves
    mid-epoch and the resumed run finishes with every epoch once."""
    from test_coco_train import MODEL_KW, TINY as COCO_TINY
    from utils.inputs.coco import make_coco_demo
    coco = make_coco_demo(tmp_path / "data", train_images=8, val_images=2)
    flags = [*COCO_TINY, "-b", "2", "-j", "2", "--seed", seed(0), "--epochs", "1", "--ckpt", tmp_path / "ck", *MODEL_KW]
    cmd = [sys.executable, ROOT / "main_coco.py", coco, *flags, "-p", "1"]
    code, out, err = signal_group(cmd, "Epoch: [1][1/", [signal.SIGTERM])
    assert code == 128 + signal.SIGTERM, out[-2000:] + err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM at epoch 1, iteration" in out, err[-3000:]
    run = tmp_path / "ck" / f"coco-faster_rcnn-resnet18-seed{seed(0)}"
    ck = load(run / "checkpoint.pth.tar")
    assert ck["epoch"] == 0 and ck["iteration"] >= 1 and ck["epoch_sums"]["images"] == 2 * ck["iteration"]
    assert temporaries(run) == []

    resumed = run_cli([coco, *flags, "--resume", run / "checkpoint.pth.tar"], script="main_coco.py", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"=> resumed from {run / 'checkpoint.pth.tar'} (epoch 0/1 + {ck['iteration']} iterations" in resumed.stdout
    assert [r["epoch"] for r in rows(run)] == [1] and load(run / "checkpoint.pth.tar")["epoch"] == 1


def test_sigterm_to_the_group_of_a_cifar_run_saves(tmp_path):
    """CIFAR serves batches from the device in the main process (no loader workers): a signal to the
    group reaches that process alone, which saves mid-epoch."""
    from test_cifar_train import write_cifar
    write_cifar(tmp_path / "data", "cifar10", n_train=64, n_test=16)
    cmd = [sys.executable, ROOT / "main_cifar.py", "--dataset", "cifar10", "--dataset_dir", tmp_path / "data",
           "-a", "resnet20", "--epochs", "1", "-b", "8", "-p", "1", "-j", "2", "--seed", seed(0), "--ckpt", tmp_path / "ck"]
    code, out, err = signal_group(cmd, "Epoch: [1][2/", [signal.SIGTERM])
    assert code == 128 + signal.SIGTERM and "Traceback" not in err, out[-2000:] + err[-3000:]
    ck = load(tmp_path / "ck" / f"cifar10-resnet20-seed{seed(0)}" / "checkpoint.pth.tar")
    assert ck["epoch"] == 0 and ck["iteration"] >= 2
    assert f"stopped by SIGTERM at epoch 1, iteration {ck['iteration']}/8" in out


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_to_the_group_with_loader_workers_is_one_line(data, tmp_path, presses):
    """A terminal's Ctrl-C reaches the workers too; once, or twice 50 ms apart: one line, no traceback
    (a worker's BrokenPipe/EOFError, an atexit KeyboardInterrupt), exit 130, no file half written."""
    cmd = [sys.executable, ROOT / "main_imagenet.py", *args(data, tmp_path, 2, "-p", "1", "-j", "2")]
    code, out, err = signal_group(cmd, "Epoch: [1][ 3/", [signal.SIGINT] * presses)
    assert code == 130, out[-2000:] + err[-3000:]
    assert [line for line in err.splitlines() if line.strip()] == [
        "error: interrupted (Ctrl-C); files already written are complete"], err[-3000:]
    assert temporaries(tmp_path / RUN) == []


# ---------------------------------------------------------------- a full disk

class FullDisk:
    """A disk with `left` bytes of room: writes take what fits (a short write), then fail with ENOSPC,
    as the kernel's write(2) does; `left=None`: room enough."""

    def __init__(self, left=None):
        self.left = left

    def open(self, file, mode="r", *a, **kw):
        if not any(c in mode for c in "wax+"):
            return open(file, mode, *a, **kw)
        disk = self

        class Raw(io.FileIO):
            def write(self, b):
                if disk.left is None:
                    return super().write(b)
                if disk.left <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                n = super().write(bytes(memoryview(b)[:disk.left]))
                disk.left -= n
                return n

        raw = Raw(file, mode.replace("b", "").replace("t", ""))
        buf = io.BufferedRandom(raw) if "+" in mode else io.BufferedWriter(raw)
        return buf if "b" in mode else io.TextIOWrapper(buf, encoding=kw.get("encoding") or "utf-8")


@pytest.mark.parametrize("room", [0, 100, 5000, 300_000])
def test_checkpoint_write_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch, room):
    """torch.save raises RuntimeError ("unexpected pos") from its zip writer when a write comes up
    short, the disk's OSError lost: the line still says the disk is full, names the folder's free
    space, and the previous checkpoint is intact, with no temporary file left."""
    from utils.lifecycle import checkpoint
    path = tmp_path / "checkpoint.pth.tar"
    save_atomic({"w": torch.zeros(3)}, path)
    before = path.read_bytes()
    disk = FullDisk(room)
    monkeypatch.setattr(checkpoint, "open", disk.open, raising=False)
    with pytest.raises(UserError) as e:
        save_atomic({"w": torch.ones(200_000)}, path)
    assert str(e.value).startswith(f"cannot write {path}: no space left on device (")
    assert f"free in {tmp_path}); the previous checkpoint.pth.tar is intact" in str(e.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth.tar"]
    disk.left = None  # space freed: the same call works
    save_atomic({"w": torch.ones(200_000)}, path)
    assert torch.equal(load(path)["w"], torch.ones(200_000))


def cli(argv, capsys):
    """main_imagenet.main in this process: (exit code, stdout, stderr). The run folder's lock is
    released afterwards, as the end of a process releases it."""
    code, real_lock, locks = 0, runfolder.lock, []
    runfolder.lock = lambda run_dir: locks.append(real_lock(run_dir)) or locks[-1]
    try:
        main_imagenet.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    finally:
        runfolder.lock = real_lock
        for f in locks:
            f.close()
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_disk_full_at_the_second_checkpoint_then_resumed(data, tmp_path, monkeypatch, capsys, one_thread):
    from utils.lifecycle import checkpoint
    disk = FullDisk()
    monkeypatch.setattr(checkpoint, "open", disk.open, raising=False)
    real_append = runfolder.append_row

    def append_then_fill_the_disk(path, row):  # epoch 1's last write, then the disk is full
        real_append(path, row)
        disk.left = 4096
    monkeypatch.setattr(runfolder, "append_row", append_then_fill_the_disk)
    code, out, err = cli(args(data, tmp_path, 2), capsys)
    run = tmp_path / RUN
    assert code == 1
    line = one_error_line(err)
    assert line.startswith(f"error: cannot write {run / 'checkpoint.pth.tar'}: no space left on device (")
    assert f"free in {run}); the previous checkpoint.pth.tar is intact" in line
    assert load(run / "checkpoint.pth.tar")["epoch"] == 1 and [r["epoch"] for r in rows(run)] == [1]
    assert temporaries(run) == []

    disk.left = None  # space freed: the run goes on from its checkpoint
    monkeypatch.setattr(runfolder, "append_row", real_append)
    code, out, err = cli(args(data, tmp_path, 2, "--resume", run / "checkpoint.pth.tar"), capsys)
    assert code == 0, err
    assert load(run / "checkpoint.pth.tar")["epoch"] == 2 and [r["epoch"] for r in rows(run)] == [1, 2]


def test_disk_full_while_copying_model_best(data, tmp_path, monkeypatch, capsys, one_thread):
    """The copy stops half way (68 MB of a ResNet-50's temporary file in the report): no temporary file
    is left, the checkpoint is kept, and the resume restores model_best from it."""
    import shutil
    real_copy = shutil.copyfile

    def copy_half_then_fail(src, dst, **kw):
        with open(src, "rb") as s, open(dst, "wb") as d:
            d.write(s.read(os.path.getsize(src) // 2))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
    monkeypatch.setattr(shutil, "copyfile", copy_half_then_fail)
    code, out, err = cli(args(data, tmp_path, 1), capsys)  # a fresh run's first epoch is its best
    run = tmp_path / RUN
    assert code == 1
    line = one_error_line(err)
    assert line.startswith(f"error: cannot write {run / 'model_best.pth.tar'}: no space left on device (")
    assert f"free in {run})" in line
    assert temporaries(run) == [] and not (run / "model_best.pth.tar").exists()
    assert load(run / "checkpoint.pth.tar")["epoch"] == 1

    monkeypatch.setattr(shutil, "copyfile", real_copy)
    code, out, err = cli(args(data, tmp_path, 1, "--resume", run / "checkpoint.pth.tar"), capsys)
    assert code == 0, err
    assert "model_best.pth.tar was behind the checkpoint" in out
    assert load(run / "model_best.pth.tar")["epoch"] == 1 and [r["epoch"] for r in rows(run)] == [1]


def test_disk_full_at_the_start_is_one_line_naming_the_folder(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runfolder, "open", FullDisk(0).open, raising=False)
    code, out, err = cli(args(data, tmp_path, 1), capsys)
    assert code == 1
    line = one_error_line(err)
    assert line.startswith(f"error: cannot write {tmp_path / RUN / '.lock'}: no space left on device (")
    assert f"free in {tmp_path / RUN})" in line
    assert not (tmp_path / RUN / "checkpoint.pth.tar").exists()


# ---------------------------------------------------------------- torn files, runs named twice, bad configs

def fake_runs(root):
    """Three seeds of one CIFAR setting as main_cifar.py leaves them (args.json, metrics.jsonl); best
    top-1 69.5, 70.25 and 68.0."""
    runs = []
    for n, best in ((0, 69.5), (1, 70.25), (2, 68.0)):
        run = root / f"cifar100-resnet20-simam-param0.0001-seed{n}"
        run.mkdir(parents=True)
        (run / "args.json").write_text(json.dumps(dict(
            dataset="cifar100", arch="resnet20", attention_type="simam", attention_param=1e-4, epochs=2, seed=n,
            seed_used=n, classes=100)))
        (run / "metrics.jsonl").write_text("".join(json.dumps(dict(
            epoch=e, lr=0.1, train_loss=2.0, train_acc1=acc - 5, val_loss=1.5, val_acc1=acc, val_acc5=acc + 20)) + "\n"
            for e, acc in ((1, best - 3), (2, best))))
        runs.append(run)
    return runs


def script(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_torn_args_json_is_named_and_the_other_runs_are_read(tmp_path, capsys):
    import csv
    runs = fake_runs(tmp_path)
    torn = runs[1] / "args.json"
    torn.write_text(torn.read_text()[:30])  # a crash mid-write (before the writes were atomic)
    want = f"warning: skipped {runs[1]}: {torn} is torn or not JSON"

    script("make_table").main([str(tmp_path), "--csv", "--per-seed"])
    out, err = capsys.readouterr()
    assert [line[:len(want)] for line in err.splitlines()] == [want]
    assert sorted(float(r["top1"]) for r in csv.DictReader(out.splitlines())) == [68.0, 69.5]

    script("plot_curves").main([str(tmp_path), "-o", str(tmp_path / "c.png")])
    out, err = capsys.readouterr()
    assert [line[:len(want)] for line in err.splitlines()] == [want] and (tmp_path / "c.png").is_file()

    script("plot_sweep").main([str(tmp_path), "-o", str(tmp_path / "s.png"), "--csv"])
    out, err = capsys.readouterr()
    assert err.splitlines()[0].startswith(want) and "Traceback" not in err and (tmp_path / "s.png").is_file()

    # Every run torn: one error line, exit 1.
    for r in runs:
        (r / "args.json").write_bytes(b"\x00" * 8)
    with pytest.raises(SystemExit) as e:
        script("make_table").main([str(tmp_path)])
    err = capsys.readouterr().err.splitlines()
    assert "none of the 3 run folders could be read" in e.value.code and len(err) == 3


def test_plots_leave_out_coco_and_unfinished_runs_naming_them(tmp_path, capsys):
    """plot_sweep.py beside a COCO run (no top-1) and both plots beside a run with no finished epoch yet:
    the others are drawn, each run left out is named in one warning line."""
    import csv
    runs = fake_runs(tmp_path)
    coco = tmp_path / "coco-faster_rcnn-resnet50"
    coco.mkdir()
    (coco / "args.json").write_text(json.dumps(dict(detector="faster_rcnn", arch="resnet50", attention_type="none",
                                                    epochs=2, classes=91)))
    (coco / "metrics.jsonl").write_text(json.dumps(dict(epoch=1, lr=0.02, train_loss=1.0, bbox_AP=20.0)) + "\n")
    fresh = tmp_path / "cifar100-resnet20-simam-param0.001-seed0"
    fresh.mkdir()
    (fresh / "args.json").write_text((runs[0] / "args.json").read_text().replace("0.0001", "0.001"))
    (fresh / "metrics.jsonl").write_text("")

    script("plot_sweep").main([str(tmp_path), "-o", str(tmp_path / "s.png"), "--csv"])
    out, err = capsys.readouterr()
    assert sorted(err.splitlines()) == sorted([
        f"warning: skipped {coco}: a COCO run (box AP, no top-1 against lambda): left out; plot it with plot_curves.py",
        f"warning: skipped {fresh}: no finished epoch yet (metrics.jsonl has no row): left out", f"wrote {tmp_path / 's.png'}"])
    rows = list(csv.DictReader(out.splitlines()))
    assert [(r["param"], r["seeds"]) for r in rows] == [("0.0001", "3")] and (tmp_path / "s.png").is_file()

    script("plot_curves").main([*map(str, runs), str(fresh), "-o", str(tmp_path / "c.png")])
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"warning: skipped {fresh}: no finished epoch yet (metrics.jsonl has no row): left out"]
    assert (tmp_path / "c.png").is_file()
    with pytest.raises(SystemExit) as e:  # nothing left to draw: one error line
        script("plot_curves").main([str(fresh), "-o", str(tmp_path / "none.png")])
    assert e.value.code.startswith("error: none of the 1 run folders could be read")


def test_args_json_is_written_atomically(monkeypatch, tmp_path):
    """A full disk (or a kill) while args.json is written leaves the previous file, never a torn one."""
    path = tmp_path / "args.json"
    runfolder.write_text_atomic(path, '{"arch": "resnet18"}\n')
    monkeypatch.setattr(runfolder, "open", FullDisk(10).open, raising=False)
    with pytest.raises(UserError, match="no space left on device"):
        runfolder.write_text_atomic(path, json.dumps({"arch": "resnet50", "x": "y" * 10_000}))
    assert json.loads(path.read_text()) == {"arch": "resnet18"} and [p.name for p in tmp_path.iterdir()] == ["args.json"]


def test_a_run_named_twice_is_counted_once(tmp_path, capsys):
    import csv
    runs = fake_runs(tmp_path)
    script("make_table").main([str(runs[0]), str(runs[0]), str(tmp_path / "." / runs[0].name), "--csv"])
    (row,) = csv.DictReader(capsys.readouterr().out.splitlines())
    assert (row["seeds"], row["top1"], row["top1_std"]) == ("1", "69.5", "")
    script("make_table").main([str(tmp_path), str(runs[1]), "--csv"])  # a folder and one of its runs
    (row,) = csv.DictReader(capsys.readouterr().out.splitlines())
    assert row["seeds"] == "3"


def test_a_binary_config_is_one_line(tmp_path, capsys):
    binary = tmp_path / "model.pth.tar"
    save_atomic({"w": torch.zeros(4)}, binary)
    code, out, err = cli(["--config", binary, "--ckpt", tmp_path], capsys)
    assert code == 1 and one_error_line(err).startswith(f"error: config file {binary} is not a text (UTF-8 TOML) file")
    plan = subprocess.run([sys.executable, "scripts/launch_plan.py", str(tmp_path), "--config", str(binary)],
                          cwd=ROOT, capture_output=True, text=True)
    assert plan.returncode == 1 and one_error_line(plan.stderr).startswith(f"error: config file {binary} is not a text")


def test_a_negative_lambda_in_the_sweep_is_refused_by_the_trainer(tmp_path):
    """LAMBDAS="-1e-1": passed as --attention_param=-1e-1 (not read as a flag), refused in one line."""
    from test_cifar_train import FAST, write_cifar
    write_cifar(tmp_path / "data", "cifar10", n_train=16, n_test=8)
    proc = subprocess.run([str(ROOT / "scripts" / "lambda_sweep.sh"), "cifar", "0", "--dataset", "cifar10",
                           "--dataset_dir", str(tmp_path / "data"), "-a", "resnet20", "--epochs", "1",
                           "--ckpt", str(tmp_path / "ck")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=sys.executable, LAMBDAS="-1e-1", **FAST))
    assert proc.returncode == 1 and "expected one argument" not in proc.stderr
    assert one_error_line(proc.stderr).startswith("error: --attention_param: "), proc.stderr
    assert "-0.1" in proc.stderr
