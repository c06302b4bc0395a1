"""main_imagenet.py end to end on tiny generated data (CPU): run folder, resume exactness, torchrun,
reference checkpoints, refused pickles, corrupt images, NaN stop."""
import json
import re
import sys

import pytest
import torch

from conftest import TINY, assert_same_weights, make_tiny_data, run_cli, run_dir, run_in_process, seed

METRIC_KEYS = {"epoch", "lr", "train_loss", "train_acc1", "val_loss", "val_acc1", "val_acc5",
               "epoch_time", "images_per_sec"}
SIMAM = ["--attention_type", "simam", "--attention_param", "0.1"]


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def one_line_error(proc):
    """The run failed with one `error:` line and no traceback (other stderr lines may be library
    warnings, e.g. torch's compiler notes)."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def acc_line(proc):
    m = re.search(r"Acc@1 (\d+\.\d{3}) Acc@\d (\d+\.\d{3}) Loss (\d+\.\d+) \((\d+) images", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr[-2000:]
    return m.group(1), m.group(2), float(m.group(3)), int(m.group(4))


def test_train_run_folder_nan_stop_and_resume_is_bit_exact(tiny_data, tmp_path):
    args = [tiny_data, *TINY, *SIMAM, "-b", "8", "--lr", "0.01", "-j", "1", "--seed", seed(0)]

    # Two uninterrupted epochs.
    a = ok(run_in_process(args + ["--epochs", "2", "--ckpt", tmp_path / "a"]))
    run_a = run_dir(args + ["--epochs", "2", "--ckpt", tmp_path / "a"])
    assert f"run folder: {run_a}" in a.stdout
    for name in ("checkpoint.pth.tar", "model_best.pth.tar", "metrics.jsonl", "log.txt", "args.json"):
        assert (run_a / name).is_file(), name
    rows = metrics(run_a)
    assert [r["epoch"] for r in rows] == [1, 2] and all(METRIC_KEYS <= set(r) for r in rows)
    assert "Epoch 2/2" in (run_a / "log.txt").read_text()
    settings = json.loads((run_a / "args.json").read_text())
    assert settings["batch_size"] == 8 and settings["attention_param"] == 0.1 and settings["seed"] == seed(0)
    ck = load(run_a / "checkpoint.pth.tar")
    assert ck["epoch"] == 2 and ck["arch"] == "resnet18" and ck["attention_type"] == "simam"
    assert ck["attention_param"] == 0.1 and ck["best_acc1"] == max(r["val_acc1"] for r in rows)
    assert not any(k.startswith("module.") for k in ck["state_dict"])
    assert {"optimizer", "rng", "scaler"} <= set(ck)

    # One epoch, then a resumed second one.
    ok(run_in_process(args + ["--epochs", "1", "--ckpt", tmp_path / "b"]))
    run_b = run_dir(args + ["--epochs", "1", "--ckpt", tmp_path / "b"])
    first = (run_b / "checkpoint.pth.tar").read_bytes()

    # A diverging continuation (a copy of the checkpoint whose classifier weights are 3e38, finite, so the
    # logits overflow: another --lr would be another run) stops with one line and leaves the last good
    # checkpoint untouched.
    broken = load(run_b / "checkpoint.pth.tar")
    broken["state_dict"]["fc.weight"].fill_(3e38)
    torch.save(broken, tmp_path / "diverging.pth.tar")
    err = one_line_error(run_in_process(args + ["--epochs", "2", "-p", "1", "--ckpt", tmp_path / "b",
                                         "--resume", tmp_path / "diverging.pth.tar"]))
    assert re.search(r"loss is (nan|inf)", err) and "last good checkpoint kept" in err
    assert (run_b / "checkpoint.pth.tar").read_bytes() == first

    ok(run_in_process(args + ["--epochs", "2", "--ckpt", tmp_path / "b", "--resume", run_b / "checkpoint.pth.tar"]))
    cb = load(run_b / "checkpoint.pth.tar")
    assert cb["epoch"] == 2
    assert_same_weights(ck, cb, momentum=True)
    rows_b = metrics(run_b)
    assert [r["epoch"] for r in rows_b] == [1, 2]
    for key in ("train_loss", "val_loss", "val_acc1"):
        assert rows_b[1][key] == rows[1][key], key


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """A 2-process gloo torchrun of one epoch on data with an odd number (7) of val images."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = make_tiny_data(tmp / "data")
    for f in sorted((data / "val" / "disc").iterdir())[:2]:
        f.unlink()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    proc = run_cli([data, *TINY, "-b", "8", "--lr", "0.01", "-j", "1", "--seed", seed(1), "--epochs", "1",
                    "--ckpt", tmp / "ck"], launcher=launcher, timeout=300)
    return data, run_dir([data, *TINY, "-b", "8", "--lr", "0.01", "--seed", seed(1), "--epochs", "1",
                          "--ckpt", tmp / "ck"]), ok(proc)


def test_torchrun_ddp_validation_equals_single_process(ddp_run):
    data, run_dir, proc = ddp_run
    assert proc.stdout.count("Epoch 1/1:") == 1 and proc.stdout.count("data:") == 1  # only rank 0 prints
    row = metrics(run_dir)[0]
    ck = load(run_dir / "checkpoint.pth.tar")
    assert ck["epoch"] == 1 and not any(k.startswith("module.") for k in ck["state_dict"])
    single = ok(run_in_process([data, *TINY, "-b", "8", "-j", "0", "-e", "--resume", run_dir / "checkpoint.pth.tar"]))
    top1, top5, loss, count = acc_line(single)
    assert count == 7  # every image once, no padding duplicates
    assert top1 == f"{row['val_acc1']:.3f}" and top5 == f"{row['val_acc5']:.3f}"
    assert loss == pytest.approx(row["val_loss"], rel=1e-4)


def test_nproc_equals_torchrun_bit_for_bit(ddp_run, tmp_path):
    """`--nproc 2` starts its two gloo ranks itself (torch.multiprocessing); the run equals torchrun's
    with two processes: weights, momentum buffers and every recorded figure but the clock."""
    data, run_dir, _ = ddp_run
    proc = ok(run_cli([data, *TINY, "-b", "8", "--lr", "0.01", "-j", "1", "--seed", seed(1), "--epochs", "1",
                       "--nproc", "2", "--ckpt", tmp_path], timeout=300))
    mine = tmp_path / run_dir.name
    assert proc.stdout.count("Epoch 1/1:") == 1 and proc.stdout.count("data:") == 1  # only rank 0 prints
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr
    assert json.loads((mine / "args.json").read_text())["world_size"] == 2
    assert_same_weights(load(run_dir / "checkpoint.pth.tar"), load(mine / "checkpoint.pth.tar"), momentum=True)
    clock = {"epoch_time", "images_per_sec"}
    want, got = metrics(run_dir), metrics(mine)
    assert [{k: v for k, v in r.items() if k not in clock} for r in got] == \
        [{k: v for k, v in r.items() if k not in clock} for r in want]


def reference_format(ck, path):
    """The reference code's checkpoint layout (DataParallel keys, tensor best_acc), plain torch.save."""
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": {"module." + k: v for k, v in ck["state_dict"].items()},
                "best_acc": torch.tensor(12.5), "optimizer": ck["optimizer"]}, path)
    return path


def test_reference_checkpoint_evaluates_and_mismatches_are_named(ddp_run, tmp_path):
    data, run_dir, _ = ddp_run
    ck = load(run_dir / "checkpoint.pth.tar")
    ref = reference_format(ck, tmp_path / "ref.pth.tar")
    ours = acc_line(ok(run_in_process([data, *TINY, "-b", "8", "-j", "0", "-e", "--resume", run_dir / "checkpoint.pth.tar"])))
    theirs = acc_line(ok(run_in_process([data, *TINY, "-b", "8", "-j", "0", "-e", "--resume", ref])))
    assert theirs == ours

    err = one_line_error(run_in_process([data, *TINY, *SIMAM, "-e", "--resume", run_dir / "checkpoint.pth.tar"]))
    assert "attention_type='none'" in err and "attention_type='simam'" in err
    err = one_line_error(run_in_process([data, *TINY, *SIMAM, "-e", "--resume", ref]))  # no attention field: keys tell
    assert "does not fit" in err and "missing keys" in err and "conv2.0.weight" in err

    weights = tmp_path / "backbone.pth"
    ok(run_in_process(["-a", "resnet18", "--resume", ref, "--save_weights", weights]))
    sd = load(weights)
    assert set(sd) == set(ck["state_dict"]) and all(torch.equal(sd[k], ck["state_dict"][k]) for k in sd)


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if unpickled with code


def test_code_carrying_pickle_is_refused_and_never_runs(tiny_data, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "payload": _Evil(marker)}, evil)
    err = one_line_error(run_in_process([tiny_data, *TINY, "-e", "--resume", evil]))
    assert "refusing to load" in err and str(evil) in err
    assert not marker.exists()


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    data = make_tiny_data(tmp_path / "data")
    bad_train = sorted((data / "train" / "disc").iterdir())[0]
    bad_val = sorted((data / "val" / "h_stripes").iterdir())[1]
    bad_train.write_bytes(b"not a jpeg at all")
    bad_val.write_bytes(bad_val.read_bytes()[:100])  # truncated
    cmd = [data, *TINY, "-b", "8", "-j", "1", "--seed", seed(0), "--epochs", "1", "--ckpt", tmp_path / "ck"]
    proc = ok(run_in_process(cmd))
    assert f"skipped unreadable image: {bad_train}" in proc.stdout
    assert f"skipped unreadable image: {bad_val}" in proc.stdout
    assert metrics(run_dir(cmd))[0]["skipped_images"] == 2

    for f in (data / "val").rglob("*.JPEG"):  # nothing readable left: a clear stop, not a hang
        f.write_bytes(b"junk")
    err = one_line_error(run_in_process([data, *TINY, "-b", "8", "-j", "1", "-e", "--resume",
                                  run_dir(cmd) / "checkpoint.pth.tar"]))
    assert "unreadable images in a row" in err


def test_missing_data_is_one_line_error(tmp_path):
    err = one_line_error(run_in_process([tmp_path / "nowhere", *TINY]))
    assert err == f"error: data folder not found: {tmp_path / 'nowhere'}"
