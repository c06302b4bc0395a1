"""make_table on CIFAR runs: several seeds of one setting become mean +- sample std."""
import csv
import importlib.util
import json
import statistics

import pytest

from conftest import ROOT


def make_table():
    spec = importlib.util.spec_from_file_location("make_table", ROOT / "scripts" / "make_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_run(root, seed, best, attention="simam", param=None):
    """A run folder as main_cifar.py writes it: args.json + metrics.jsonl (3 epochs, best in the middle)."""
    name = f"cifar100-resnet20{'-' + attention + '-param0.0001' if attention != 'none' else ''}-seed{seed}"
    run = root / name
    run.mkdir(parents=True)
    args = dict(dataset="cifar100", arch="resnet20", attention_type=attention, attention_param=param,
                epochs=3, seed=seed, seed_used=seed, classes=100)
    (run / "args.json").write_text(json.dumps(args))
    accs = [(best - 5, best - 1), (best, best + 20), (best - 2, best + 21)]
    (run / "metrics.jsonl").write_text("".join(
        json.dumps(dict(epoch=i + 1, val_acc1=a1, val_acc5=a5, val_loss=1.0)) + "\n" for i, (a1, a5) in enumerate(accs)))
    return run


def test_seeds_become_mean_and_sample_std(tmp_path, capsys):
    bests = [69.5, 70.25, 68.0]
    for seed, best in enumerate(bests):
        fake_run(tmp_path, seed, best)
    fake_run(tmp_path, 0, 67.0, attention="none")

    make_table().main([str(tmp_path), "--csv"])
    rows = {r["attention"]: r for r in csv.DictReader(capsys.readouterr().out.splitlines())}
    simam = rows["simam"]
    assert simam["dataset"] == "cifar100" and int(simam["seeds"]) == 3 and int(simam["classes"]) == 100
    assert float(simam["top1"]) == pytest.approx(statistics.mean(bests))
    assert float(simam["top1_std"]) == pytest.approx(statistics.stdev(bests))  # ddof = 1
    assert float(simam["top5"]) == pytest.approx(statistics.mean(b + 20 for b in bests))  # the best epoch's top-5
    assert int(simam["params"]) == 278324 and int(simam["flops"]) == 41220352  # at 32x32, 100 classes
    # The reference's one CIFAR log (lambda 1e-4): 69.83.
    assert float(simam["paper_top1"]) == 69.83
    assert float(simam["diff_top1"]) == pytest.approx(statistics.mean(bests) - 69.83)
    assert int(rows["none"]["seeds"]) == 1 and rows["none"]["top1_std"] == ""

    make_table().main([str(tmp_path)])
    md = capsys.readouterr().out
    line = next(ln for ln in md.splitlines() if "SimAM" in ln)
    assert f"{statistics.mean(bests):.2f} ± {statistics.stdev(bests):.2f}" in line
    assert "ResNet-20" in line or "resnet20 (CIFAR-100)" in line

    make_table().main([str(tmp_path), "--per-seed", "--csv"])
    per_seed = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert sorted(float(r["top1"]) for r in per_seed if r["attention"] == "simam") == sorted(bests)


def test_later_modules_are_labelled_and_ordered(tmp_path, capsys):
    """ECA/GC/SRM/CoordAtt/Triplet rows: labels (a None parameter too), the table's order, their params."""
    for i, (att, param) in enumerate([("triplet", None), ("coordatt", None), ("srm", None), ("gc", 8.0),
                                      ("eca", None), ("eca", 3.0), ("se", 16.0), ("none", None)]):
        fake_run(tmp_path / str(i), 0, 60.0 + i, attention=att, param=param)
    make_table().main([str(tmp_path / str(i)) for i in range(8)])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "(CIFAR-100)" in ln]
    labels = [ln.split(" | ")[1] for ln in lines]
    assert labels == ["none", "SE (r=16)", "ECA (k=adaptive)", "ECA (k=3)", "GC (r=8)", "SRM", "CoordAtt (r=32)",
                      "Triplet"]
    # SRM: a [C, 2] channel-wise FC and a BN per block, C = 16/32/64 in 3 blocks each, on ResNet-20's 0.278 M.
    from networks import create_net
    plain = sum(p.numel() for p in create_net("resnet20", num_classes=100).parameters())
    srm = next(ln for ln in lines if "| SRM |" in ln)
    assert f"{(plain + 3 * 4 * (16 + 32 + 64)) / 1e6:.3f} M" in srm
