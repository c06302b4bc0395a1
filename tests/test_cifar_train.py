"""main_cifar.py on generated CIFAR-format folders (CPU): training run, resume, evaluation, damaged
archives, the restricted unpickler, and the on-device augmentation against torchvision."""
import json
import os
import pickle
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.transforms import functional as TF

import main_cifar
from conftest import ROOT, THREADS, assert_same_weights, run_dir, run_in_process, seed
from utils.inputs.cifar import CIFAR_MEAN, CIFAR_STD, DeviceLoader, Split, epoch_draws, read_classes, read_split

FAST = {"SIMAM_IMPL": "eager", "OMP_NUM_THREADS": THREADS}  # no kernel compilation for 2 tiny epochs


@pytest.fixture
def one_thread(one_thread, monkeypatch):
    """conftest's, with SimAM eager whatever the environment says."""
    monkeypatch.setenv("SIMAM_IMPL", "eager")
    yield


# ---- CIFAR-format folders ---------------------------------------------------------------------

def _bin(b):  # SHORT_BINSTRING / BINSTRING: Python 2's str, read back as bytes
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b

def _int(i):
    return b"J" + struct.pack("<i", i)

def py2_pickle(entry):
    """A dict pickled as the official archives were (Python 2 cPickle, protocol 2): str keys are
    Python 2 strs, the uint8 array goes through numpy.core.multiarray._reconstruct + BUILD."""
    out = [b"\x80\x02}("]
    for key, value in entry.items():
        out.append(_bin(key))
        if isinstance(value, np.ndarray):
            out += [b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n", _int(0), b"\x85", _bin(b"b"),
                    b"\x87R(", _int(1), b"(", *[_int(s) for s in value.shape], b"t",
                    b"cnumpy\ndtype\n", _bin(b"u1"), _int(0), _int(1), b"\x87R(", _int(3), _bin(b"|"),
                    b"NNN", _int(-1), _int(-1), _int(0), b"tb\x89", _bin(value.tobytes()), b"tb"]
        elif isinstance(value, list):
            out += [b"](", *[_bin(v) if isinstance(v, bytes) else _int(v) for v in value], b"e"]
        else:
            out.append(_bin(value))
    out.append(b"u.")
    return b"".join(out)


def write_cifar(root, dataset, n_train=64, n_test=40, seed=0):
    """Tiny archive folders in the official layout. Files alternate between the Python 2 format
    and Python 3's protocols 4 and 5, so every path of the reader is used."""
    rng = np.random.default_rng(seed)
    n_cls, key = (10, b"labels") if dataset == "cifar10" else (100, b"fine_labels")
    if dataset == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = [(f"data_batch_{i}", n_train // 5 + (n_train % 5 if i == 5 else 0)) for i in range(1, 6)]
        files += [("test_batch", n_test)]
        meta = ("batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072})
    else:
        folder = root / "cifar-100-python"
        files = [("train", n_train), ("test", n_test)]
        meta = ("meta", {b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                         b"coarse_label_names": [b"coarse"] * 20})
    folder.mkdir(parents=True, exist_ok=True)
    for k, (name, n) in enumerate(files):
        entry = {b"batch_label": name.encode(), key: [int(v) for v in rng.integers(0, n_cls, n)],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        blob = py2_pickle(entry) if k % 3 == 0 else pickle.dumps(entry, protocol=4 + k % 3 - 1)
        (folder / name).write_bytes(blob)
    (folder / meta[0]).write_bytes(pickle.dumps(meta[1], protocol=2))
    return folder


def test_reader_gets_the_archives_arrays_and_labels(tmp_path):
    folder = write_cifar(tmp_path, "cifar10", n_train=23, n_test=7)
    first = py2_pickle({b"data": np.arange(3072 * 2, dtype=np.uint64).astype(np.uint8).reshape(2, 3072),
                        b"labels": [3, 9]})
    (folder / "data_batch_1").write_bytes(first)
    train = read_split(tmp_path, "cifar10", True)
    assert train.images.shape == (2 + 3 * 4 + 7, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels[:2].tolist() == [3, 9]
    # rows are the R, G, B planes of 32x32, row-major: image 1's green pixel (0, 1) is byte 3072 + 1024 + 1
    assert train.images[1, 1, 0, 1].item() == (3072 + 1024 + 1) % 256
    rest = [pickle.loads((folder / f"data_batch_{i}").read_bytes(), encoding="bytes")[b"data"] for i in range(2, 6)]
    assert torch.equal(train.images[2:].reshape(19, -1), torch.from_numpy(np.concatenate(rest)))
    assert read_classes(folder, "cifar10")[9] == "class9"  # DIR may also be the archive folder itself
    assert len(read_split(tmp_path, "cifar10", False)) == 7


# ---- training, resume, evaluation -------------------------------------------------------------

def train_args(data, ckpt, *extra, epochs=2):
    return ["--dataset", "cifar100", "--dataset_dir", str(data), "-a", "resnet20", "--attention_type", "simam",
            "--attention_param", "1e-4", "-b", "16", "--seed", str(seed(0)), "--epochs", str(epochs), "--ckpt", str(ckpt),
            "--test_batch_size", "16", *extra]


def train(data, ckpt, *extra, epochs=2):
    return main_cifar.main(train_args(data, ckpt, *extra, epochs=epochs))


def test_train_resume_exact_and_evaluate(tmp_path, one_thread, capsys):
    write_cifar(tmp_path / "data", "cifar100")
    train(tmp_path / "data", tmp_path / "a")
    a = run_dir(train_args(tmp_path / "data", tmp_path / "a"), script="main_cifar.py")
    for name in ("checkpoint.pth.tar", "metrics.jsonl", "log.txt", "args.json"):
        assert (a / name).is_file(), name
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["images_per_sec"] > 0 for r in rows)
    settings = json.loads((a / "args.json").read_text())
    assert (settings["dataset"], settings["seed"], settings["classes"]) == ("cifar100", seed(0), 100)
    assert settings["epochs"] == 2 and settings["weight_decay"] == 5e-4 and settings["milestones"] == [81, 122]
    log = capsys.readouterr().out
    assert "params" in log and "Epoch 2/2" in log  # the start-up summary and the epoch lines

    ck = torch.load(a / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 2 and ck["attention_param"] == 1e-4 and ck["num_classes"] == 100
    assert ck["state_dict"]["linear.weight"].shape[0] == 100  # the reference CIFAR nets name it linear
    best = torch.load(a / "model_best.pth.tar", map_location="cpu", weights_only=True)  # even at 0% (random labels)
    assert best["epoch"] == ck["best_epoch"] and best["best_acc1"] == ck["best_acc1"] == max(r["val_acc1"] for r in rows)

    # One epoch, then resumed: the same weights and metrics as the uninterrupted run.
    train(tmp_path / "data", tmp_path / "b", epochs=1)
    b = run_dir(train_args(tmp_path / "data", tmp_path / "b", epochs=1), script="main_cifar.py")
    train(tmp_path / "data", tmp_path / "b", "--resume", str(b / "checkpoint.pth.tar"))
    cb = torch.load(b / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert all(torch.equal(v, cb["state_dict"][k]) for k, v in ck["state_dict"].items())
    rows_b = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in rows_b] == [r["val_loss"] for r in rows]

    # The command line, evaluating the last checkpoint: the last validation, every one of the 40 images once.
    proc = run_in_process(["--dataset", "cifar100", "--dataset_dir", tmp_path / "data", "-a", "resnet20",
                           "--attention_type", "simam", "--attention_param", "1e-4", "-e", "--resume",
                           a / "checkpoint.pth.tar"], script="main_cifar.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"Acc@1 (\d+\.\d+) .*Loss (\d+\.\d+) \((\d+) images", proc.stdout)
    assert m and m.group(1) == f"{rows[-1]['val_acc1']:.3f}" and int(m.group(3)) == 40, proc.stdout[-2000:]
    assert float(m.group(2)) == pytest.approx(rows[-1]["val_loss"], abs=1e-4)


# ---- damaged folders --------------------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if unpickled with code


def _damage(folder, how, marker):
    train = folder / "train"
    if how == "no folder":
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    elif how == "missing file":
        (folder / "test").unlink()
    elif how == "truncated":
        train.write_bytes(train.read_bytes()[:5000])
    elif how == "wrong shape":
        train.write_bytes(pickle.dumps({b"data": np.zeros((64, 1024), np.uint8), b"fine_labels": [0] * 64}))
    elif how == "bad labels":
        train.write_bytes(pickle.dumps({b"data": np.zeros((64, 3072), np.uint8), b"fine_labels": [100] * 64}))
    elif how == "code":
        train.write_bytes(pickle.dumps({b"data": _Evil(marker), b"fine_labels": [0] * 64}))


DAMAGE = {
    "no folder": r"CIFAR-100 not found: put the extracted cifar-100-python/ folder \(train, test, meta\) in .*data",
    "missing file": r"CIFAR-100 archive incomplete: .*cifar-100-python/test is missing",
    "truncated": r"CIFAR-100 file .*/train is damaged \(truncated\); re-extract the archive",
    "wrong shape": r"CIFAR-100 file .*/train is damaged: 'data' is uint8 \(64, 1024\), expected uint8 \(N, 3072\)",
    "bad labels": r"CIFAR-100 file .*/train is damaged: 'fine_labels' must be 64 labels in 0\.\.99",
    "code": r"refusing to read .*/train: it asks for \S+open, which a CIFAR archive never contains",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_folder_is_one_line_error(how, tmp_path, capsys):
    folder = write_cifar(tmp_path / "data", "cifar100")
    marker = tmp_path / "pwned"
    _damage(folder, how, marker)
    with pytest.raises(SystemExit) as e:
        main_cifar.main(["--dataset", "cifar100", "--dataset_dir", str(tmp_path / "data"), "--ckpt", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "\n" not in err and re.fullmatch("error: " + DAMAGE[how] + ".*", err), err
    assert not marker.exists()


def test_cli_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "main_cifar.py"), "--dataset", "cifar10",
                           "--dataset_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: CIFAR-10 not found: put the extracted cifar-10-batches-py/ folder")


# ---- augmentation and sharding on the device --------------------------------------------------

def _images(n=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.randint(0, 100, (n,), generator=g))


def _torchvision(img, top, left, flip):
    """Pad(4) -> crop at (top, left) -> flip -> ToTensor -> Normalize, by hand on a PIL image."""
    pil = TF.to_pil_image(img)
    pil = TF.crop(TF.pad(pil, 4), top, left, 32, 32)
    if flip:
        pil = TF.hflip(pil)
    return TF.normalize(TF.to_tensor(pil), CIFAR_MEAN, CIFAR_STD)


def test_device_augmentation_equals_torchvision_and_depends_only_on_seed_and_epoch():
    split = _images()
    loader = DeviceLoader(split, 8, seed=3, train=True)
    order, offsets, flips = epoch_draws(len(split), 3, 5)
    assert 0 < flips.sum() < len(split) and offsets.min() == 0 and offsets.max() == 8  # both ways, full range
    idx = loader.indices(5)
    assert torch.equal(idx, order)  # one process: the whole shuffled set, the last batch of 5 kept
    batches = list(loader(5))
    assert len(batches) == len(loader) == 5
    got = torch.cat([x for x, _ in batches])
    assert torch.equal(torch.cat([y for _, y in batches]), split.labels[idx])
    want = torch.stack([_torchvision(split.images[i], *offsets[i].tolist(), flips[i].item()) for i in idx])
    assert torch.equal(got, want)

    again = torch.cat([x for x, _ in DeviceLoader(split, 8, seed=3, train=True)(5)])
    assert torch.equal(again, got)  # a resumed run redraws the same epoch
    assert not torch.equal(torch.cat([x for x, _ in loader(6)]), got)
    assert not torch.equal(torch.cat([x for x, _ in DeviceLoader(split, 8, seed=4, train=True)(5)]), got)

    # A mid-epoch resume: batches from 3 on are the full epoch's batches from 3 on.
    rest = DeviceLoader(split, 8, seed=3, train=True)(5, start_batch=3)
    assert len(rest) == 2 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                  for a, b in zip(rest, batches[3:]))


def test_ranks_take_disjoint_shares_and_evaluation_counts_every_image_once():
    split = _images(37)
    world = 3
    shares = [DeviceLoader(split, 4, seed=0, rank=r, world_size=world).indices(2) for r in range(world)]
    assert all(len(s) == 37 // world for s in shares) and len(set(torch.cat(shares).tolist())) == 36
    assert len({len(DeviceLoader(split, 4, seed=0, rank=r, world_size=world)) for r in range(world)}) == 1
    # an image gets the same augmentation whichever rank serves it
    single = DeviceLoader(split, 37, seed=0)
    whole = dict(zip(single.indices(2).tolist(), next(iter(single(2)))[0]))
    x1, _ = next(iter(DeviceLoader(split, 12, seed=0, rank=1, world_size=world)(2)))
    assert all(torch.equal(x1[k], whole[i]) for k, i in enumerate(shares[1].tolist()))

    evals = [DeviceLoader(split, 5, seed=0, rank=r, world_size=world, train=False) for r in range(world)]
    batches = [b for loader in evals for b in loader(0)]
    assert torch.equal(torch.cat([y for _, y in batches]), split.labels)  # all 37, once, in order, unaugmented
    assert torch.equal(torch.cat([x for x, _ in batches]), TF.normalize(split.images / 255, CIFAR_MEAN, CIFAR_STD))


def test_recipe_schedule_and_reference_flags():
    args = main_cifar.parse_args(main_cifar.get_args_parser(), ["--num_epoch", "164", "--base_lr", "0.1", "--warmup"])
    assert (args.epochs, args.batch_size, args.weight_decay, args.test_batch_size) == (164, 128, 5e-4, 100)
    lr = main_cifar.schedule(args, 391)
    assert [lr(e, 0) for e in (0, 1, 81, 82, 122, 123, 163)] == pytest.approx([0.01, 0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3])


def test_torchrun_two_ranks_validate_like_one_process_and_equal_nproc_2(tmp_path, monkeypatch):
    """2 gloo ranks, total batch 16: each rank trains on its own 32 of the 64 images (4 steps), and the
    sharded validation (40 images, test batch 7 -> 4 per rank) equals a single-process evaluation.
    `--nproc 2` (ranks spawned by the script) gives the same run bit for bit."""
    write_cifar(tmp_path / "data", "cifar100")
    common = [str(ROOT / "main_cifar.py"), "--dataset", "cifar100", "--dataset_dir", str(tmp_path / "data"),
              "-a", "resnet20", "--seed", str(seed(1))]
    env = dict(os.environ, **FAST)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *common, "-b", "16", "--epochs", "1", "--test-batch-size", "7", "-p", "1",
                          "--ckpt", str(tmp_path / "ck")], cwd=ROOT, capture_output=True, text=True, timeout=240,
                         env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("Epoch 1/1:") == 1 and "[1][3/4]" in ddp.stdout  # rank 0 prints; 4 steps a rank
    run = run_dir([*common[1:], "-b", "16", "--epochs", "1", "--ckpt", tmp_path / "ck"], script="main_cifar.py")
    row = json.loads((run / "metrics.jsonl").read_text())
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    one = run_in_process([*common[1:], "-e", "--resume", run / "checkpoint.pth.tar"], script="main_cifar.py")
    m = re.search(r"Acc@1 (\d+\.\d+) Acc@5 (\d+\.\d+) Loss (\d+\.\d+) \((\d+) images", one.stdout)
    assert m, one.stdout[-2000:] + one.stderr[-2000:]
    assert (m.group(1), m.group(2), int(m.group(4))) == (f"{row['val_acc1']:.3f}", f"{row['val_acc5']:.3f}", 40)
    assert float(m.group(3)) == pytest.approx(row["val_loss"], abs=1e-4)

    # --nproc 2: the script starts the same two gloo ranks itself; the run equals torchrun's bit for bit.
    spawned = subprocess.run([sys.executable, *common, "-b", "16", "--epochs", "1", "--test-batch-size", "7", "-p", "1",
                              "--nproc", "2", "--ckpt", str(tmp_path / "spawned")], cwd=ROOT, capture_output=True,
                             text=True, timeout=240, env=env)
    assert spawned.returncode == 0 and "Traceback" not in spawned.stderr, spawned.stderr[-3000:]
    assert spawned.stdout.count("Epoch 1/1:") == 1  # rank 0 alone prints
    mine = tmp_path / "spawned" / run.name
    assert json.loads((mine / "args.json").read_text())["world_size"] == 2
    assert_same_weights(torch.load(run / "checkpoint.pth.tar", weights_only=True),
                        torch.load(mine / "checkpoint.pth.tar", weights_only=True), momentum=True)
    clock = {"epoch_time", "images_per_sec"}
    assert {k: v for k, v in json.loads((mine / "metrics.jsonl").read_text()).items() if k not in clock} == \
        {k: v for k, v in row.items() if k not in clock}


def test_seeds_script_runs_each_seed_and_summarises(tmp_path):
    write_cifar(tmp_path / "data", "cifar10")
    # One seed three times (once with a leading 0): one run, counted once; the folders' names hold spaces.
    proc = subprocess.run([str(ROOT / "scripts" / "cifar_seeds.sh"), f"{seed(3)} {seed(4)} {seed(3)} 0{seed(3)}",
                           "--dataset", "cifar10", "--dataset_dir",
                           str(tmp_path / "data"), "-a", "resnet20", "--epochs", "1", "-b", "16", "--ckpt",
                           str(tmp_path / "seed runs ü")], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, PYTHON=sys.executable, **FAST))
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = []
    for s in (seed(3), seed(4)):
        run = run_dir(["--dataset", "cifar10", "--dataset_dir", tmp_path / "data", "-a", "resnet20", "--epochs", "1",
                       "-b", "16", "--ckpt", tmp_path / "seed runs ü", "--seed", s], script="main_cifar.py")
        assert json.loads((run / "args.json").read_text())["seed"] == s
        best.append(json.loads((run / "metrics.jsonl").read_text())["val_acc1"])
        assert f"seed {s}: {best[-1]:.3f}" in proc.stdout
    assert f"mean {np.mean(best):.2f} +- {np.std(best, ddof=1):.2f} (std over 2 seeds)" in proc.stdout
    assert proc.stdout.count(f"=== seed {seed(3)} ===") == 1 and proc.stdout.count(f"seed {seed(3)}: ") == 1
