"""main_coco.py end to end on tiny generated COCO data (CPU): training, AP lines, exact resume,
torchrun evaluation against a single process, bare state_dict evaluation."""
import json
import math
import re
import signal
import sys

import pytest
import torch

from conftest import ROOT, assert_same_weights, run_cli, run_dir, run_in_process, seed
from utils.inputs.coco import make_coco_demo

# Small images, a frozen backbone and few proposals/samples keep a ResNet-18 detector step short on a CPU;
# score threshold 0 so that an untrained model still has detections to evaluate.
TINY = ["-a", "resnet18", "--min-size", "48", "--max-size", "64", "--trainable-layers", "0", "-b", "4",
        "-j", "0", "-p", "100", "--warmup-iters", "2"]
MODEL_KW = ["--model-kw", "box_batch_size_per_image=32", "rpn_pre_nms_top_n_train=200",
            "rpn_post_nms_top_n_train=100", "rpn_pre_nms_top_n_test=200", "rpn_post_nms_top_n_test=100",
            "box_detections_per_img=20", "box_score_thresh=0.0"]  # last: --model-kw takes the rest
KEYS = [f"{t}_{k}" for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]


def run_coco(data, args, launcher=None, timeout=300):
    """main_coco.py's stdout: under `launcher` (torchrun) or with --nproc in processes of its own, else in
    this one."""
    own = launcher or "--nproc" in map(str, args)
    proc = (run_cli([data, *args], timeout=timeout, launcher=launcher, script="main_coco.py") if own else
            run_in_process([data, *args], script="main_coco.py"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def eval_line(out):
    m = re.search(r"^ \* (bbox: .*) \((\d+) images, (\d+) detections, ", out, re.M)
    assert m, out[-3000:]
    return m.group(1), int(m.group(2)), int(m.group(3))


def row_line(row, types):
    return " | ".join(f"{t}: " + " ".join(f"{k} {row[f'{t}_{k}']:.3f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
                      for t in types)


def test_training_records_epochs_resumes_bit_exact_and_evaluates(tmp_path):
    data = make_coco_demo(tmp_path / "data", train_images=8, val_images=4)
    args = TINY + ["-b", "2", "--seed", str(seed(0))] + MODEL_KW  # 4 steps an epoch: room for a stop inside one
    out = run_coco(data, ["--epochs", "2", "--ckpt", tmp_path / "a"] + args)
    run_a = run_dir([data, "--epochs", "2", "--ckpt", tmp_path / "a"] + args, script="main_coco.py")
    assert f"run folder: {run_a}" in out and out.count("IoU metric: bbox") == 2
    assert re.search(r"^resnet18 \+ none: [\d.]+ M params, [\d.]+ G FLOPs \(faster_rcnn, one 48x64 image", out, re.M)
    assert re.search(r"^bbox: AP \d+\.\d{3} AP50 \d+\.\d{3} AP75 \d+\.\d{3} APs -?\d+\.\d{3} APm", out, re.M)
    rows = metrics(run_a)
    assert [r["epoch"] for r in rows] == [1, 2] and all(set(KEYS[:6]) <= set(r) for r in rows)
    assert all(r["train_loss"] > 0 and math.isfinite(r["train_loss"]) for r in rows)  # whichever way it went
    ck = load(run_a / "checkpoint.pth.tar")
    assert ck["epoch"] == 2 and ck["arch"] == "resnet18" and ck["num_classes"] == 4

    # The curves: box AP per epoch in the top panel, the summed detector loss below.
    import importlib.util
    spec = importlib.util.spec_from_file_location("plot_curves", ROOT / "scripts" / "plot_curves.py")
    plot_curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_curves)
    from utils.reporting.runs import read_run
    fig = plot_curves.make_figure([read_run(run_a)])
    ap, loss, _ = fig.axes
    assert list(ap.lines[0].get_ydata()) == [r["bbox_AP"] for r in rows] and "box AP" in ap.lines[0].get_label()
    assert list(loss.lines[0].get_ydata()) == [r["train_loss"] for r in rows]
    assert ap.lines[0].get_label().startswith("Faster R-CNN ResNet-18")

    # The classification tools (eval_checkpoints.py, gradcam.py) name the right tool for it.
    from utils import UserError
    from utils.reporting.models import load_model
    with pytest.raises(UserError, match="is a COCO detector's checkpoint.*main_coco.py DATA -e --resume"):
        load_model(run_a)

    # SIGTERM in the middle of epoch 2, then a resume: the same weights, optimizer state and metrics.
    from test_run_safety import run_until
    cmd = [sys.executable, str(ROOT / "main_coco.py"), str(data), "--epochs", "2", "--ckpt", str(tmp_path / "b"),
           *map(str, args), "-p", "1"]
    code, out_stop, err = run_until(cmd, "Epoch: [2][0/", signal.SIGTERM)
    run_b = run_dir([data, "--epochs", "2", "--ckpt", tmp_path / "b"] + args, script="main_coco.py")
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM at epoch 2, iteration" in out_stop, err[-3000:]
    stopped = load(run_b / "checkpoint.pth.tar")
    assert stopped["epoch"] == 1 and stopped["iteration"] >= 1 and stopped["epoch_sums"]["images"] > 0
    out_b = run_coco(data, ["--epochs", "2", "--ckpt", tmp_path / "b", "--resume", run_b / "checkpoint.pth.tar"] + args)
    assert "=> resumed from" in out_b and "best bbox AP" in out_b
    cb = load(run_b / "checkpoint.pth.tar")
    assert cb["epoch"] == 2 and cb["state_dict"].keys() == ck["state_dict"].keys()
    assert_same_weights(ck, cb, momentum=True)
    rows_b = metrics(run_b)
    assert [r["epoch"] for r in rows_b] == [1, 2]
    for key in ["train_loss", "val_detections"] + KEYS[:6]:
        assert rows_b[1][key] == rows[1][key], key

    # --save_weights writes the bare state_dict (as torchvision's published weights come); -e on it
    # prints the epoch's figures.
    bare = tmp_path / "bare.pth"
    run_coco(data, ["--save_weights", bare, "--resume", run_a / "checkpoint.pth.tar"] + args)
    sd = load(bare)
    assert sd.keys() == ck["state_dict"].keys() and all(torch.equal(sd[k], v) for k, v in ck["state_dict"].items())
    line, count, dets = eval_line(run_coco(data, ["-e", "--resume", bare] + args))
    assert count == 4 and dets == rows[1]["val_detections"] and line == row_line(rows[1], ("bbox",))


def test_torchrun_mask_rcnn_evaluation_equals_single_process_and_nproc_2(tmp_path):
    data = make_coco_demo(tmp_path / "data", train_images=8, val_images=5)  # odd: uneven shards
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    args = TINY + ["--detector", "mask_rcnn", "--seed", str(seed(1))] + MODEL_KW
    out = run_coco(data, ["--epochs", "1", "--ckpt", tmp_path / "ck"] + args, launcher=launcher)
    run = run_dir([data, "--epochs", "1", "--ckpt", tmp_path / "ck"] + args, script="main_coco.py")
    assert out.count("Epoch 1/1:") == 1 and out.count("IoU metric: segm") == 1  # rank 0 prints, once
    assert re.search(r"^segm: AP \d+\.\d{3} AP50 \d+\.\d{3} AP75 \d+\.\d{3} APs -?\d+\.\d{3} APm", out, re.M)
    row = metrics(run)[0]
    assert set(KEYS) <= set(row)
    line, count, dets = eval_line(run_coco(data, ["-e", "--resume", run / "checkpoint.pth.tar"] + args))
    assert count == 5 and dets == row["val_detections"] > 0 and line == row_line(row, ("bbox", "segm"))

    # --nproc 2: the script starts the same two gloo ranks itself; the run equals torchrun's bit for bit.
    out = run_coco(data, ["--epochs", "1", "--nproc", "2", "--ckpt", tmp_path / "spawned"] + args)
    assert out.count("Epoch 1/1:") == 1 and out.count("IoU metric: segm") == 1
    mine = tmp_path / "spawned" / run.name
    assert json.loads((mine / "args.json").read_text())["world_size"] == 2
    assert_same_weights(load(run / "checkpoint.pth.tar"), load(mine / "checkpoint.pth.tar"), momentum=True)
    clock = {"epoch_time", "images_per_sec"}
    assert [{k: v for k, v in r.items() if k not in clock} for r in metrics(mine)] == \
        [{k: v for k, v in r.items() if k not in clock} for r in metrics(run)]
