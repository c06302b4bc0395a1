"""Params/FLOPs as the paper counts them (thop 0.0.31 convention) and the summary script."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from networks import create_net
from utils.flops import profile_model

# The paper's table (SimAM rows; plain networks have the same figures): params M, FLOPs G.
PAPER = {
    "resnet18": (11.69, 1.82), "resnet34": (21.80, 3.67), "resnet50": (25.56, 4.11),
    "resnet101": (44.55, 7.83), "resnext50_32x4d": (25.03, 4.26), "mobilenet_v2": (3.50, 0.31),
}


@pytest.fixture(scope="module")
def rows():
    sys.path.insert(0, str(ROOT / "scripts"))
    from model_summary import summary_rows
    return {(r["arch"], r["attention_type"]): r for r in summary_rows("imagenet", archs=list(PAPER))}


@pytest.mark.parametrize("arch", sorted(PAPER))
def test_figures_match_the_paper(rows, arch):
    params, flops = PAPER[arch]
    for attn in ("none", "simam"):
        r = rows[arch, attn]
        assert round(r["params"] / 1e6, 2) == params, (arch, attn)
        assert round(r["flops"] / 1e9, 2) == flops, (arch, attn)
    assert rows[arch, "none"]["params"] == rows[arch, "simam"]["params"]
    assert rows[arch, "none"]["flops"] == rows[arch, "simam"]["flops"]
    for attn in ("se", "cbam"):  # the gates' layers add parameters and counted work
        assert rows[arch, attn]["params"] > rows[arch, "none"]["params"]
        assert rows[arch, attn]["flops"] > rows[arch, "none"]["flops"]


def test_exact_counts_of_the_2020_convention(rows):
    # ResNet-50: conv + fc multiply-adds, 2 ops per BN input, (window + 1) per avg-pool output.
    assert rows["resnet50", "none"]["flops"] == 4111514624
    assert rows["resnet18", "none"]["flops"] == 1819066368
    # The reference's own CIFAR log: ResNet-20 + SimAM on CIFAR-100, 0.278 M / 0.0412 G.
    stats = profile_model(create_net("resnet20", "simam", num_classes=100), image_size=32)
    assert (round(stats["params"] / 1e6, 3), round(stats["flops"] / 1e9, 4)) == (0.278, 0.0412)


def test_simam_elementwise_by_hand():
    # ResNet-18 + SimAM at 224: SimAM sees each BasicBlock's conv2 output, 2 blocks per stage.
    # Per channel of M values: 8 M + 4 ops (see utils/flops.py).
    stages = [(64, 56), (128, 28), (256, 14), (512, 7)]
    expected = sum(2 * c * (8 * s * s + 4) for c, s in stages)
    assert profile_model(create_net("resnet18", "simam"))["attention_elementwise"] == expected
    assert profile_model(create_net("resnet18"))["attention_elementwise"] == 0


def test_profile_leaves_the_model_untouched():
    model = create_net("resnet18", "cbam").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile_model(model)
    after = model.state_dict()
    assert list(after) == list(before)  # no total_ops / total_params buffers left behind
    assert all((after[k] == before[k]).all() for k in before)
    assert model.training


def run_summary(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "model_summary.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_json_output_and_filters():
    out = run_summary("-a", "resnet18", "--attention_type", "se", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [(r["arch"], r["attention_type"]) for r in data] == [("resnet18", "se")]
    r = data[0]
    assert {"arch", "attention_type", "attention_param", "params", "flops"} <= set(r)
    assert isinstance(r["params"], int) and isinstance(r["flops"], int) and r["attention_param"] == 16
    table = run_summary("-a", "mobilenet_v2", "--attention_type", "simam")
    assert "| mobilenet_v2 | simam | 3.50 | 0.31 |" in table.stdout


def test_cifar_rows_carry_num_classes():
    out = run_summary("--dataset", "cifar", "-a", "resnet20", "--attention_type", "simam", "--json")
    data = json.loads(out.stdout)
    assert [(r["num_classes"], r["params"]) for r in data] == [(10, 272474), (100, 278324)]


@pytest.mark.parametrize("args", [["-a", "resnet19"], ["--attention_type", "nope"]])
def test_unknown_names(args):
    out = run_summary(*args)
    assert out.returncode == 2
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1 and "unknown" in out.stderr
