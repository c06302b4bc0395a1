"""Reproducing the paper's table: the 24 configs, the launchers (skip / resume), the results table,
the curves and checkpoint evaluation, end to end on tiny generated data (CPU)."""
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import seed  # noqa: E402
from main_imagenet import get_args_parser  # noqa: E402
from main_imagenet import main as train_main  # noqa: E402
from networks import create_net  # noqa: E402
from utils import UserError  # noqa: E402
from utils.args import parse_args  # noqa: E402
from utils.inputs.demo_data import make_demo_dataset  # noqa: E402
from utils.reporting.runs import PAPER, read_run  # noqa: E402

CONFIGS = ROOT / "configs" / "imagenet"
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "mobilenet_v2")
ATTS = ("none", "se", "cbam", "simam", "eca", "gc", "srm", "coordatt", "triplet")
# Tiny overrides of the real configs: 32 px crops, 8-image batches, a learning rate that suits them.
TINY = ["--epochs", "2", "-b", "4", "--lr", "0.01", "--train-crop-size", "32", "--val-resize-size", "36",
        "--val-crop-size", "32", "-p", "100", "-j", "0", "--seed", str(seed(0))]
RUN_NONE, RUN_SIMAM = f"imagenet-resnet18-seed{seed(0)}", f"imagenet-resnet18-simam-param0.1-seed{seed(0)}"


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- configs

def test_configs_carry_the_papers_recipe():
    files = sorted(CONFIGS.glob("*.toml"))
    assert {f.stem for f in files} == {f"{a}_{t}" for a in ARCHS for t in ATTS} and len(files) == 54
    for f in files:
        arch, att = f.stem.rsplit("_", 1)
        raw = tomllib.loads(f.read_text())
        args = parse_args(get_args_parser(), ["--config", str(f)])  # the trainer's own merge
        assert (args.arch, args.attention_type) == (arch, att), f
        params = {"none": None, "se": 16, "cbam": 16, "simam": 0.1, "eca": None, "gc": 16, "srm": None, "coordatt": 32,
                  "triplet": None}
        assert raw.get("attention_param") == params[att], f
        assert (args.batch_size, args.momentum, args.train_crop_size, args.val_resize_size,
                args.val_crop_size, args.warmup_epochs, args.label_smoothing) == (256, 0.9, 224, 256, 224, 0, 0), f
        if arch == "mobilenet_v2":
            assert (args.epochs, args.lr, args.cos_lr, args.weight_decay) == (150, 0.05, True, 4e-5), f
        else:  # step schedule: the trainer's default x0.1 every 30 epochs
            assert (args.epochs, args.lr, args.cos_lr, args.weight_decay) == (100, 0.1, False, 1e-4), f


def test_mobilenet_v2_configs_replay_the_references_per_epoch_cosine():
    """The reference stepped CosineAnnealingLR(T_max=epochs) *before* each epoch: epoch e trained at
    t = e + 1, constant within the epoch, the last epoch at lr 0. Its values come from torch's own
    scheduler here; the trainer's schedule must give them at every iteration of every epoch."""
    import warnings
    from utils.schedule import schedule_from_args
    files = sorted(CONFIGS.glob("mobilenet_v2_*.toml"))
    assert len(files) == 9
    for f in files:
        args = parse_args(get_args_parser(), ["--config", str(f)])
        assert args.cos_lr and args.cos_ref_shift, f
        iters = 5004  # ImageNet's full batches at 256 (any count: the reference's lr is per epoch)
        lr_fn = schedule_from_args(args, iters)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr, momentum=args.momentum)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
        for epoch in range(args.epochs):
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": the reference's order
                warnings.simplefilter("ignore", UserWarning)
                sched.step()
            want = opt.param_groups[0]["lr"]
            for it in (0, 1, iters // 2, iters - 1):
                assert math.isclose(lr_fn(epoch, it), want, rel_tol=1e-12, abs_tol=1e-15), (f.name, epoch, it)
        assert lr_fn(args.epochs - 1, 0) == 0 and lr_fn(0, 0) < args.lr


def test_flags_override_config_and_unknown_keys_are_named(tmp_path, capsys):
    cfg = CONFIGS / "resnet50_simam.toml"
    args = parse_args(get_args_parser(), ["--config", str(cfg), "--epochs", "3", "--wd", "5e-5"])
    assert (args.epochs, args.weight_decay, args.lr, args.attention_param) == (3, 5e-5, 0.1, 0.1)
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text() + "learning_rate = 0.2\n")
    with pytest.raises(UserError, match="learning_rate"):
        parse_args(get_args_parser(), ["--config", str(bad)])
    with pytest.raises(SystemExit) as e:  # the CLI: one line naming the key, status 1
        train_main(["--config", str(bad), "--ckpt", str(tmp_path)])
    assert e.value.code == 1 and "learning_rate" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end on tiny data

@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Runs the two ResNet-18 configs (none, SimAM) through scripts/reproduce_imagenet.sh.

    Beforehand, in this process: the SimAM run finishes both epochs (the launcher must skip it) and
    the plain run stops after one (the launcher must resume it for the second). Data, configs and
    runs live in folders whose names hold spaces and non-ASCII letters (CONFIGS one a line).
    """
    tmp = tmp_path_factory.mktemp("reproduce")
    data = make_demo_dataset(tmp / "my data é", classes=("h_stripes", "v_stripes", "disc"),
                             train_per_class=4, val_per_class=2, sizes=(40, 40))
    runs = tmp / "my runs ü"
    configs = tmp / "con figs"
    configs.mkdir()
    for name in ("resnet18_none.toml", "resnet18_simam.toml"):
        (configs / name).write_bytes((CONFIGS / name).read_bytes())
    flags = TINY + ["--ckpt", str(runs)]
    train_main([str(data), "--config", str(CONFIGS / "resnet18_simam.toml"), *flags])
    train_main([str(data), "--config", str(CONFIGS / "resnet18_none.toml"), *flags, "--epochs", "1"])
    simam_rows = (runs / RUN_SIMAM / "metrics.jsonl").read_text()
    env = dict(os.environ, WORKERS="0", CHECK_ARGS="--expect-classes 3 --expect-val-per-class 2 --expect-train 12",
               CONFIGS=f"{configs / 'resnet18_none.toml'}\n{configs / 'resnet18_simam.toml'}\n",
               PYTHON=sys.executable)
    proc = subprocess.run([str(ROOT / "scripts" / "reproduce_imagenet.sh"), str(data), *flags],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"data": data, "runs": runs, "out": proc.stdout, "simam_rows": simam_rows}


def test_reproduce_skips_finished_resumes_interrupted_and_records_settings(e2e):
    runs, out = e2e["runs"], e2e["out"]
    assert f"resnet18_none.toml: resuming from {runs / RUN_NONE / 'checkpoint.pth.tar'}" in out
    assert f"resnet18_simam.toml: finished ({runs / RUN_SIMAM}); skipping" in out
    assert [r["epoch"] for r in rows_of(runs / RUN_NONE)] == [1, 2]
    assert "resumed from" in (runs / RUN_NONE / "log.txt").read_text()
    assert (runs / RUN_SIMAM / "metrics.jsonl").read_text() == e2e["simam_rows"]  # untouched
    settings = json.loads((runs / RUN_NONE / "args.json").read_text())
    # config values (wd, momentum) merged with the command line's overrides (epochs, lr, batch)
    assert (settings["weight_decay"], settings["momentum"], settings["cos_lr"]) == (1e-4, 0.9, False)
    assert (settings["epochs"], settings["lr"], settings["batch_size"]) == (2, 0.01, 4)
    assert settings["config"].endswith("resnet18_none.toml")


def test_results_table_from_real_runs(e2e, capsys):
    runs = e2e["runs"]
    md = (runs / "results.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("| ResNet-18")]
    assert len(lines) == 2 and "| none |" in lines[0] and "SimAM (λ=0.1)" in lines[1]
    # 3-class runs are not ImageNet-1k: the paper's columns stay empty rather than compare apples with pears.
    assert "| – | – | – | – |" in lines[0] and "| – | – | – | – |" in lines[1]

    script("make_table").main([str(runs), "--csv"])
    table = {r["source"]: r for r in map(dict, csv.DictReader(capsys.readouterr().out.splitlines()))}
    assert table == {r["source"]: r for r in csv.DictReader((runs / "results.csv").open())}
    for name, att in ((RUN_NONE, "none"), (RUN_SIMAM, "simam")):
        row, metrics = table[str(runs / name)], rows_of(runs / name)
        best = max(metrics, key=lambda r: r["val_acc1"])
        assert float(row["top1"]) == pytest.approx(best["val_acc1"]) and float(row["top5"]) == pytest.approx(best["val_acc5"])
        assert row["epochs"] == "2/2"
        n_params = sum(p.numel() for p in create_net("resnet18", att, 0.1, num_classes=3).parameters())
        assert int(row["params"]) == n_params and int(row["classes"]) == 3
        assert row["paper_top1"] == row["diff_top1"] == ""


def test_curves_png_from_real_runs(e2e, tmp_path):
    runs = [e2e["runs"] / RUN_NONE, e2e["runs"] / RUN_SIMAM]
    plot_curves = script("plot_curves")
    fig = plot_curves.make_figure([read_run(r) for r in runs])
    acc, loss, lr = fig.axes
    labels = [line.get_label() for line in acc.lines]
    assert labels[0].startswith(f"ResNet-18, seed {seed(0)}: val (best")
    assert labels[3] == f"ResNet-18 + SimAM (λ=0.1), seed {seed(0)}: train"
    for k, run in enumerate(runs):  # the plotted values are the runs' metrics
        rows = rows_of(run)
        assert list(acc.lines[2 * k].get_ydata()) == [r["val_acc1"] for r in rows]
        assert list(acc.lines[2 * k + 1].get_ydata()) == [r["train_acc1"] for r in rows]
        assert list(loss.lines[2 * k].get_ydata()) == [r["val_loss"] for r in rows]
        assert list(lr.lines[k].get_ydata()) == [r["lr"] for r in rows]
    assert acc.get_ylabel() and loss.get_ylabel() and lr.get_xlabel().startswith("epoch")

    out = tmp_path / "curves.png"
    plot_curves.main([*map(str, runs), "-o", str(out)])
    from PIL import Image
    with Image.open(out) as im:
        assert im.size == (1080, 1200)
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50  # lines and text, not a blank canvas


def test_lr_drops_are_found_in_step_schedules_only():
    step = [{"epoch": e, "lr": 0.1 * 0.1 ** ((e - 1) // 30)} for e in range(1, 101)]
    lr_drops = script("plot_curves").lr_drops
    assert lr_drops(step) == [31, 61, 91]
    cos = [{"epoch": e, "lr": 0.05 * (1 + math.cos(math.pi * (e - 1) / 150)) / 2} for e in range(1, 151)]
    assert lr_drops(cos) == []


def test_eval_checkpoints_ours_and_reference_format(e2e, tmp_path, capsys):
    run = e2e["runs"] / RUN_SIMAM
    ours = torch.load(run / "model_best.pth.tar", map_location="cpu", weights_only=True)
    ref = tmp_path / "ref_simam_r18.pth.tar"  # the authors' layout: module. keys, arch only, best_acc tensor
    torch.save({"epoch": ours["epoch"], "arch": "resnet18", "best_acc": torch.tensor(ours["best_acc1"]),
                "state_dict": {"module." + k: v for k, v in ours["state_dict"].items()}}, ref)
    script("eval_checkpoints").main([str(run), str(ref), "--data", str(e2e["data"]), "-b", "4", "-j", "0",
                                     "--val-resize-size", "36", "--val-crop-size", "32", "--csv"])
    captured = capsys.readouterr()
    rows = list(csv.DictReader(captured.out.splitlines()))
    best = max(r["val_acc1"] for r in rows_of(run))
    assert len(rows) == 2 and {r["attention"] for r in rows} == {"simam"}  # inferred for the reference file
    assert {float(r["param"]) for r in rows} == {0.1}
    for r in rows:  # the same weights, data and transforms as the trainer's evaluation
        assert float(r["top1"]) == pytest.approx(best)
    assert "does not record SimAM's lambda" in captured.err

    with pytest.raises(SystemExit, match="fit"):  # a mismatched type is named, not a traceback
        script("eval_checkpoints").main([str(ref), "--data", str(e2e["data"]), "--attention_type", "se", "-j", "0"])


def test_paper_figures_only_for_the_papers_lambda():
    from utils.reporting.runs import table_row
    rows = {p: table_row("resnet50", "simam", p, 77.0, 93.0, "100/100", "run", num_classes=1000) for p in (0.1, 1e-4)}
    tv = table_row("resnet18", "none", None, 70.0, 89.0, "100/100", "run", num_classes=1000)
    assert (tv["paper_top1"], tv["paper_top5"], tv["paper_source"]) == (PAPER[("resnet18", "none")][0], None, "torchvision")
    assert (rows[0.1]["paper_top1"], rows[0.1]["paper_top5"]) == (77.45, 93.66)
    assert rows[0.1]["diff_top1"] == pytest.approx(77.0 - 77.45) and rows[0.1]["params"] == 25_557_032
    assert rows[1e-4]["paper_top1"] is None and rows[1e-4]["diff_top1"] is None


def test_read_run_ignores_a_half_written_last_line(tmp_path):
    (tmp_path / "args.json").write_text(json.dumps({"arch": "resnet18", "epochs": 3}))
    row = {"epoch": 1, "lr": 0.1, "val_acc1": 5.0, "val_acc5": 20.0}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n" + '{"epoch": 2, "lr"')
    r = read_run(tmp_path)
    assert r["rows"] == [row] and r["best"] == row


def test_eval_takes_the_runs_settings_from_its_checkpoint(e2e, tmp_path, capsys):
    """`-e --resume RUN/model_best.pth.tar` and `eval_checkpoints.py RUN` with no other flag: the arch, SimAM and
    its lambda, the data folder and the 36/32 validation sizes come from the checkpoint, and the figure is the one
    the run logged for its best epoch. A given size that differs is said in one line (and used)."""
    run = e2e["runs"] / RUN_SIMAM
    best = torch.load(run / "model_best.pth.tar", map_location="cpu", weights_only=True)
    logged = next(r for r in rows_of(run) if r["epoch"] == best["best_epoch"])
    train_main(["-e", "--resume", str(run / "model_best.pth.tar")])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith(" * "))
    assert f"Acc@1 {logged['val_acc1']:.3f} " in line, line
    loss = float(line.split("Loss ")[1].split()[0])  # at 256/224 instead of 36/32 it would be another number
    assert loss == pytest.approx(logged["val_loss"], rel=1e-3, abs=1e-3)

    script("eval_checkpoints").main([str(run), "-j", "0", "--csv"])
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [float(r["top1"]) for r in rows] == [pytest.approx(logged["val_acc1"])]

    script("eval_checkpoints").main([str(run), "-j", "0", "--csv", "--val-crop-size", "28"])
    err = capsys.readouterr().err
    assert f"note: {run / 'model_best.pth.tar'}: --val-crop-size 28 given; its run was validated with 32" in err
