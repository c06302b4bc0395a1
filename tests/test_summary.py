"""Params/FLOPs as the paper counts them (thop 0.0.31 convention) and the summary script."""
import json
import sys

import pytest
import torch
from thop import profile

from conftest import ROOT, run_in_process
from networks import create_net
from networks.attentions import create_attention
from utils.reporting.flops import PAPER_OPS, profile_model

# The paper's table (SimAM rows; plain networks have the same figures): params M, FLOPs G.
PAPER = {
    "resnet18": (11.69, 1.82), "resnet34": (21.80, 3.67), "resnet50": (25.56, 4.11),
    "resnet101": (44.55, 7.83), "resnext50_32x4d": (25.03, 4.26), "mobilenet_v2": (3.50, 0.31),
}


@pytest.fixture(scope="module")
def rows():
    sys.path.insert(0, str(ROOT / "scripts"))
    from model_summary import summary_rows
    rows = summary_rows("imagenet", archs=list(PAPER), attentions=["none", "se", "cbam", "simam"])
    return {(r["arch"], r["attention_type"]): r for r in rows}


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
    # Per channel of M values: 8 M + 4 ops (see utils/reporting/flops.py).
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
    return run_in_process(args, script="scripts/model_summary.py")


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


def summary_main(argv, capsys):
    """scripts/model_summary.py's main in this process: (exit status, stdout, stderr)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from model_summary import main
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args,message", [
    (["-a", "resnet18", "--attention_type", "se", "--attention_param", "0"],
     "se: reduction must be an integer >= 1, got 0"),
    (["-a", "resnet18", "--attention_type", "eca", "--attention_param", "4"],
     "eca: kernel size must be an odd integer >= 1, got 4"),
    (["-a", "resnet18", "--attention_type", "srm", "--attention_param", "16"], "srm: takes no parameter"),
    (["-a", "resnet18", "--attention_param", "8"], "--attention_param needs --attention_type"),
])
def test_bad_parameters_are_one_line(args, message, capsys):
    code, out, err = summary_main(args, capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err


# ---- the later modules (ECA, GC, SRM, CoordAtt, Triplet): layers thop 0.0.31 had no rule for

def module_counts(name, c, h, w, param=None):
    """thop (our 2020 rules) on the module alone, one [1, C, H, W] input."""
    m = create_attention(name, c, param).eval()
    flops, params = profile(m, inputs=(torch.zeros(1, c, h, w),), custom_ops=PAPER_OPS, verbose=False)
    return int(flops), int(params), sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("c,h,w", [(64, 56, 56), (40, 7, 9)])
def test_module_counts_by_hand(c, h, w):
    """Conv (1d and 2d) out x (in/groups x k + bias), BN and LayerNorm 2 x in, avg-pool out x (window + 1);
    Hardswish and Sigmoid 0. Every parameter is counted (a layer without a rule would drop its own)."""
    hw = h * w
    k = 3  # ECA's adaptive size for 40 and 64 channels: int((log2 C + 1) / 2) = 3, odd
    gk = c // 16
    m = max(8, c // 32)
    expected = {
        "eca": c * (hw + 1) + c * k,
        "gc": hw * (c + 1) + gk * (c + 1) + 2 * gk + c * (gk + 1),
        "srm": c * 2 + 2 * c,
        "coordatt": c * h * (w + 1) + c * w * (h + 1) + m * (h + w) * (c + 1) + 2 * m * (h + w)
        + c * h * (m + 1) + c * w * (m + 1),
        "triplet": (2 * 49 + 2) * (c * w + h * c + h * w),
    }
    for name, flops in expected.items():
        got, thop_params, params = module_counts(name, c, h, w)
        assert got == flops, name
        assert thop_params == params > 0, name


def test_new_module_elementwise_by_hand():
    # ResNet-18 at 224: the modules see each BasicBlock's bn2 output, 2 blocks per stage.
    stages = [(64, 56), (128, 28), (256, 14), (512, 7)]
    per_module = {
        "eca": lambda c, s: c * s * s + c,
        "gc": lambda c, s: 2 * c * s * s + 5 * s * s + 5 * (c // 16) + 4,
        "srm": lambda c, s: c * (5 * s * s + 5),
        "coordatt": lambda c, s: 5 * max(8, c // 32) * 2 * s + 2 * c * s + 2 * c * s * s,
        "triplet": lambda c, s: 12 * c * s * s + 2 * (2 * c * s + s * s),
    }
    for name, rule in per_module.items():
        expected = sum(2 * rule(c, s) for c, s in stages)
        assert profile_model(create_net("resnet18", name))["attention_elementwise"] == expected, name


def test_new_modules_in_the_summary(capsys):
    code, out, _ = summary_main(["-a", "resnet50", "--attention_type", "eca", "--json"], capsys)
    (row,) = json.loads(out)
    # Plain ResNet-50 plus one adaptive ECA kernel per bottleneck: C = 256, 512, 1024 -> k = 5; 2048 -> 7.
    assert code == 0 and row["attention_param"] is None
    assert row["params"] == 25557032 + 5 * (3 + 4 + 6) + 7 * 3
    code, out, _ = summary_main(["-a", "resnet18", "--attention_type", "triplet"], capsys)
    assert code == 0 and "| resnet18 | triplet | 11.69 | 1.83 |" in out
