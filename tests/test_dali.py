"""`--data-backend dali` (utils/inputs/dali.py) on the CPU: the same batches as the torch backend up to
decoder/resize rounding, mid-epoch starts, unreadable images, and a CLI run. Skipped without DALI."""
import json

import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (optional: pip install -r requirements-dali.txt)")

from conftest import TINY, make_tiny_data, run_cli, run_dir, seed  # noqa: E402
from utils.inputs.dali import DaliImageFolder, DaliLoader  # noqa: E402
from utils.inputs.data import UNREADABLE, EpochLoader, SafeImageFolder, TrainTransform, ValTransform, collate_skipping

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def close_to_torch_backend(dali_batches, torch_batches):
    assert len(dali_batches) == len(torch_batches)
    for (x, t, s), (y, u, r) in zip(dali_batches, torch_batches):
        assert x.dtype == torch.uint8 and x.shape == y.shape and x.device.type == "cpu"
        assert torch.equal(t, u) and list(s) == list(r)
        diff = (x.float() - y.float()).abs()
        assert diff.mean() < 1.0 and diff.max() <= 8  # same windows; decoder/resize rounding only


def test_dali_cpu_pipeline_matches_the_torch_backend_and_resumes_mid_epoch(tiny_data):
    tf = TrainTransform(32)
    dali = DaliLoader(DaliImageFolder(tiny_data / "train", tf), 5, 1, seed=3)
    full = list(dali(1))
    ref = list(EpochLoader(SafeImageFolder(tiny_data / "train", tf), 5, 0, seed=3, collate_fn=collate_skipping)(1))
    close_to_torch_backend(full, ref)
    assert len(dali) == len(full) == 4
    tail = list(DaliLoader(DaliImageFolder(tiny_data / "train", tf), 5, 2, seed=3)(1, start_batch=2))
    assert len(tail) == 2 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(tail, full[2:]))
    other = list(dali(2))  # another epoch: other windows
    assert (other[0][0].float() - full[0][0].float()).abs().mean() > 5


def test_dali_validation_skips_unreadable_files_once(tmp_path):
    data = make_tiny_data(tmp_path / "data", train_per_class=4, val_per_class=3)
    bad = sorted((data / "val").rglob("*.JPEG"))[4]
    bad.write_bytes(b"junk")
    tf = ValTransform(36, 32)
    got = list(DaliLoader(DaliImageFolder(data / "val", tf, evaluate_once=True), 4, 1, 0, train=False)(0))
    ref = list(EpochLoader(SafeImageFolder(data / "val", tf, evaluate_once=True), 4, 0, 0, train=False,
                           collate_fn=collate_skipping)(0))
    close_to_torch_backend(got, ref)
    assert [p for b in got for p in b[2]] == [str(bad)]
    assert (torch.cat([b[1] for b in got]) == UNREADABLE).sum() == 1


def test_dali_backend_trains_and_evaluates_from_the_command_line(tmp_path, tiny_data):
    argv = [tiny_data, *TINY, "--data-backend", "dali", "-b", "8", "-j", "1", "--seed", seed(0), "--epochs", "1",
            "--ckpt", tmp_path / "ck"]
    proc = run_cli(argv)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = run_dir(argv)
    assert json.loads((run / "args.json").read_text())["data_backend"] == "dali"
    assert (run / "checkpoint.pth.tar").is_file()
