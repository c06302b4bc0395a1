"""The paper's figures: scripts/gradcam.py (Grad-CAM panels) and the lambda sweep
(scripts/lambda_sweep.sh + scripts/plot_sweep.py)."""
import csv
import importlib.util
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import ROOT
from networks import ATTENTION_CHOICES, MODELS, create_net
from utils.lifecycle.checkpoint import save_atomic


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gc = script("gradcam")


def reference_gradcam(model, x, layer, target):
    """Grad-CAM by its definition (Selvaraju et al.), with our own hook: ReLU(sum_k mean(dy/dA_k) A_k),
    min-max normalised, bilinearly upsampled to the input."""
    store = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: store.update(a=o))
    with torch.enable_grad():
        logits = model(x)
        grad, = torch.autograd.grad(logits[0, target], store["a"])
    handle.remove()
    cam = torch.relu((grad.mean((2, 3), keepdim=True) * store["a"]).sum(1)).detach()
    cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-8)
    up = torch.nn.functional.interpolate(cam[None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return up, logits.detach()


# ---------------------------------------------------------------- a model with a known answer

class TwoQuadrants(nn.Module):
    """Class 0's logit reads only the top-left quadrant of the `features` map (its red channel),
    class 1's only the bottom-right one (its green channel)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])[:, :, None, None])

    def forward(self, x):
        a = self.features(x)
        h, w = a.shape[-2] // 2, a.shape[-1] // 2
        return torch.stack([a[:, 0, :h, :w].mean((1, 2)), 2 * a[:, 1, h:, w:].mean((1, 2))], 1)


def test_map_peaks_where_the_model_looks():
    torch.manual_seed(0)
    x = 0.05 * torch.rand(1, 3, 32, 32)
    x[0, 0, 4:12, 6:14] = 1.0  # red blob: class 0's evidence, in the top-left quadrant
    x[0, 1, 20:28, 18:26] = 1.0  # green blob: class 1's, bottom-right
    model = TwoQuadrants().eval()
    blob = {0: (slice(4, 12), slice(6, 14)), 1: (slice(20, 28), slice(18, 26))}
    for target in (0, 1):
        heat, cls, prob, top1 = gc.gradcam(model, x, "features", target)
        assert cls == target and heat.shape == (32, 32)
        peak = divmod(int(heat.argmax()), 32)
        assert blob[target][0].start <= peak[0] < blob[target][0].stop
        assert blob[target][1].start <= peak[1] < blob[target][1].stop
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[blob[target]] = True
        assert heat[inside].mean() > 10 * heat[~inside].mean()
        with torch.no_grad():
            assert prob == pytest.approx(float(model(x).softmax(1)[0, target]), abs=1e-6)
    # No label: the top-1 class (green: logit 2 x mean) is the target.
    heat, cls, _, top1 = gc.gradcam(model, x, "features")
    assert cls == top1 == 1 and 20 <= int(heat.argmax()) // 32 < 28


# ---------------------------------------------------------------- every arch x attention

EXPECTED_LAYER = {"resnet18": "layer4.1", "resnet34": "layer4.2", "resnet50": "layer4.2", "resnet101": "layer4.2",
                  "resnet152": "layer4.2", "resnext50_32x4d": "layer4.2", "mobilenet_v2": "features.18",
                  "resnet20": "layer3.2", "resnet32": "layer3.4", "resnet56": "layer3.8", "resnet110": "layer3.17",
                  "resnet164": "layer3.17", "mobilenetv2": "layers.16", "preresnet20": "layer3.2",
                  "preresnet32": "layer3.4", "preresnet56": "layer3.8", "preresnet110": "layer3.17",
                  "preresnet164": "layer3.17", "wideresnet28x10": "block3.layer.3", "wideresnet40x10": "block3.layer.5"}


@pytest.mark.parametrize("arch", list(MODELS))
def test_every_arch_and_attention_matches_the_definition(arch, one_thread):
    assert set(EXPECTED_LAYER) == set(MODELS)  # a new arch needs its expected layer here
    torch.manual_seed(0)
    size = 64 if MODELS[arch][1] == "imagenet" else 16  # 2x2 maps at layer4, 4x4 at a CIFAR net's layer3
    x = torch.randn(1, 3, size, size)
    for att in ATTENTION_CHOICES:
        model = create_net(arch, att, None, num_classes=5).eval()
        layer = gc.default_layer(model)
        assert layer == EXPECTED_LAYER[arch], att
        heat, cls, prob, top1 = gc.gradcam(model, x, layer, target=3)
        assert cls == 3 and heat.shape == (size, size)
        want, logits = reference_gradcam(model, x, layer, 3)
        assert torch.allclose(heat, want, atol=1e-4), att
        probs = logits.softmax(1)[0]
        assert prob == pytest.approx(float(probs[3]), rel=1e-4)
        assert float(probs[top1]) == pytest.approx(float(probs.max()), rel=1e-5)  # ties: any of them


# ---------------------------------------------------------------- the script on checkpoints

def write_image_folder(root, classes=("h_stripes", "disc")):
    from utils.inputs.demo_data import make_demo_dataset
    return make_demo_dataset(root, classes=classes, train_per_class=1, val_per_class=2, sizes=(40, 48))


def test_script_on_our_reference_and_cifar_checkpoints(tmp_path, one_thread, capsys):
    data = write_image_folder(tmp_path / "data")
    torch.manual_seed(0)
    # Ours: a run folder whose args.json names the data (class names) and the eval crop.
    run = tmp_path / "runs" / "imagenet-resnet18-simam-param0.1-seed0"
    run.mkdir(parents=True)
    ours = create_net("resnet18", "simam", 0.1, num_classes=2)
    save_atomic({"epoch": 1, "arch": "resnet18", "attention_type": "simam", "attention_param": 0.1,
                 "state_dict": ours.state_dict(), "best_acc1": 50.0}, run / "model_best.pth.tar")
    (run / "args.json").write_text(json.dumps({"arch": "resnet18", "data": str(data), "val_resize_size": 40,
                                               "val_crop_size": 36}))
    # The reference's: only arch, `module.` keys; SE is found from the layout.
    ref = create_net("resnet18", "se", None, num_classes=2)
    save_atomic({"arch": "resnet18", "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()},
                 "best_acc": torch.tensor(1.0)}, tmp_path / "ref_se.pth.tar")
    # A CIFAR checkpoint without a run folder: class indices, 32x32 input.
    cifar = create_net("resnet20", "none", None, num_classes=10)
    save_atomic({"arch": "resnet20", "attention_type": "none", "state_dict": cifar.state_dict()},
                tmp_path / "cifar.pth.tar")

    out = tmp_path / "fig" / "gradcam.png"
    gc.main([str(run), str(tmp_path / "ref_se.pth.tar"), str(tmp_path / "cifar.pth.tar"),
             "--images", str(data / "val"), "-n", "3", "-o", str(out)])
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as img:  # 3 rows x (image + 3 checkpoints), 2.3 x 2.5 inches a panel at 100 dpi
        assert img.size == (4 * 230, 3 * 250)

    models = [gc.load_model(p) for p in (run, tmp_path / "ref_se.pth.tar", tmp_path / "cifar.pth.tar")]
    assert [(i["arch"], i["attention_type"], i["attention_param"]) for _, i in models] == \
        [("resnet18", "simam", 0.1), ("resnet18", "se", 16), ("resnet20", "none", None)]
    assert [gc.column_title(i) for _, i in models] == ["ResNet-18 + SimAM (λ=0.1)", "ResNet-18 + SE (r=16)", "resnet20"]
    files = gc.image_files([data / "val"], 3)
    assert [f.name for f in files] == ["disc_0000.JPEG", "h_stripes_0000.JPEG", "disc_0001.JPEG"]  # a class each in turn
    rows = gc.compute_panels(models, files)
    from utils.inputs.data import reference_transforms
    _, val_tf = reference_transforms(val_resize_size=40, val_crop_size=36)  # PIL Resize + CenterCrop, as --data-backend pil
    for f, row in zip(files, rows):
        truth = f.parent.name
        assert row["truth"] == truth
        p_ours, p_ref, p_cifar = row["panels"]
        assert p_ours["name"] == truth and p_ours["view"].size == (36, 36)  # the run's crop, its class names
        with torch.no_grad():
            want = ours.eval()(val_tf(Image.open(f).convert("RGB"))[None]).softmax(1)[0, ["disc", "h_stripes"].index(truth)]
        assert p_ours["prob"] == pytest.approx(float(want), rel=1e-4)
        assert p_ref["view"].size == (224, 224) and p_ref["name"].startswith("class ")  # no run folder: defaults
        assert p_cifar["view"].size == (32, 32) and p_cifar["heat"].shape == (32, 32)
        assert p_cifar["class"] == p_cifar["top1"]  # unknown classes: the prediction is the target

    labels = tmp_path / "names.txt"
    labels.write_text("".join(f"thing{i}\n" for i in range(10)))
    row = gc.compute_panels(models[2:], files[:1], labels=gc.read_labels(labels))[0]
    assert row["panels"][0]["name"] == f"thing{row['panels'][0]['class']}"


def test_bad_input_is_one_line(tmp_path):
    data = write_image_folder(tmp_path / "data")
    model = create_net("resnet18", num_classes=2)
    save_atomic({"arch": "resnet18", "attention_type": "none", "state_dict": model.state_dict()}, tmp_path / "m.pth.tar")
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    base = [str(tmp_path / "m.pth.tar"), "--crop", "64", "-o", str(tmp_path / "x.png")]
    images = ["--images", str(data / "val")]
    for flags, message in [
        (images + ["--layer", "fc"], "error: layer 'fc' gives (1, 2), not a feature map [N, C, H, W]; "
                                     "choose a conv block (default: layer4.1)"),
        (images + ["--labels", str(tmp_path / "names.txt")], "error: --labels has 3 names but "),
        (["--images", str(tmp_path / "missing.png")], f"error: image not found: {tmp_path / 'missing.png'}"),
        (images + ["-n", "0"], "error: --max-images must be at least 1, got 0"),
    ]:
        with pytest.raises(SystemExit) as e:
            gc.main(base + flags)
        assert str(e.value).startswith(message), str(e.value)
    # As a command: exit status 1 and one line on stderr, no traceback.
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gradcam.py"), *base, *images, "--layer", "layer9"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1
    assert proc.stderr == ("error: no layer 'layer9' in ResNet (default: layer4.1; close: layer4, layer3, layer2; "
                           "names as in model.named_modules())\n")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- the lambda sweep

ps = script("plot_sweep")


def fake_run(root, arch, attention, param, seed, best):
    """A run folder as the trainers write it: args.json + metrics.jsonl (best epoch in the middle)."""
    name = f"cifar100-{arch}{f'-{attention}-param{param}' if attention != 'none' else ''}-seed{seed}"
    run = root / name
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps(dict(dataset="cifar100", arch=arch, attention_type=attention,
                                                   attention_param=param, epochs=3, seed=seed, classes=100)))
    accs = [(best - 4, best + 10), (best, best + 20), (best - 1, best + 21)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(dict(epoch=i + 1, val_acc1=a1, val_acc5=a5, val_loss=1.0))
                                               + "\n" for i, (a1, a5) in enumerate(accs)))


def test_sweep_plot_and_table_have_the_right_points(tmp_path, capsys):
    best = {1e-1: [60.0, 61.0, 62.5], 1e-3: [66.0, 64.0], 1e-5: [63.25]}
    for lam, accs in best.items():
        for seed, acc in enumerate(accs):
            fake_run(tmp_path, "resnet20", "simam", lam, seed, acc)
    fake_run(tmp_path, "resnet20", "none", None, 0, 58.0)
    fake_run(tmp_path, "resnet20", "none", None, 1, 59.0)
    fake_run(tmp_path, "resnet20", "se", 16, 0, 99.0)  # another attention: not part of the sweep
    fake_run(tmp_path, "resnet56", "simam", 1e-4, 0, 70.0)

    rows = [ps.run_row(r) for r in ps.find_runs([tmp_path])]
    models = ps.sweep(rows)
    r20 = models[("cifar100", "resnet20", 100, "")]  # "": one recipe, no settings to name
    assert [r["param"] for r in r20["points"]] == [1e-5, 1e-3, 1e-1]
    assert [r["top1"] for r in r20["points"]] == pytest.approx([63.25, 65.0, statistics.mean(best[1e-1])])
    assert [r["top1_std"] for r in r20["points"]] == [None, pytest.approx(2 ** 0.5),
                                                      pytest.approx(statistics.stdev(best[1e-1]))]
    assert [r["seeds"] for r in r20["points"]] == [1, 2, 3]
    assert r20["baseline"]["top1"] == pytest.approx(58.5)

    fig = ps.make_figure(models)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1 or ln.get_marker() == "o"]
    data = sorted((list(ln.get_xdata()), list(ln.get_ydata())) for ln in lines if ln.get_marker() == "o")
    assert data == [([1e-5, 1e-3, 1e-1], pytest.approx([63.25, 65.0, 61.1666667])), ([1e-4], [70.0])]
    bars = [c for c in ax.containers if len(c.lines[0].get_xdata()) == 3][0]
    segs = bars.lines[2][0].get_segments()  # the vertical error bars: mean -+ std
    assert [s[1][1] - s[0][1] for s in segs] == pytest.approx([0, 2 * 2 ** 0.5, 2 * statistics.stdev(best[1e-1])])
    assert any(ln.get_ydata()[0] == pytest.approx(58.5) and ln.get_linestyle() == "--" for ln in ax.get_lines())

    out = tmp_path / "sweep.png"
    ps.main([str(tmp_path), "-o", str(out)])
    md = capsys.readouterr().out
    assert out.is_file()
    assert "| resnet20 (CIFAR-100) | 0.001 | 2 | **65.00 ± 1.41** | 85.00 ± 1.41 |" in md
    assert "| resnet20 (CIFAR-100) | no attention | 2 | 58.50 ± 0.71 |" in md
    assert "| resnet56 (CIFAR-100) | 0.0001 | 1 | **70.00** | 90.00 |" in md
    assert "99.00" not in md
    ps.main([str(tmp_path), "-o", str(out), "--csv"])
    got = {(r["arch"], r["attention"], r["param"]): r for r in csv.DictReader(capsys.readouterr().out.splitlines())}
    assert float(got[("resnet20", "simam", "0.1")]["top1"]) == pytest.approx(statistics.mean(best[1e-1]))


def test_sweep_without_simam_is_one_line(tmp_path):
    fake_run(tmp_path, "resnet20", "none", None, 0, 58.0)
    with pytest.raises(SystemExit, match="^error: no SimAM run among the run folders"):
        ps.main([str(tmp_path), "-o", str(tmp_path / "x.png")])


def sweep_run(tmp_path, lam, s):
    """The folder lambda_sweep.sh's run of (lambda, seed) trains in."""
    from conftest import run_dir
    return run_dir(["--dataset", "cifar10", "--dataset_dir", tmp_path / "data", "-a", "resnet20", "--epochs", "1",
                    "-b", "16", "--ckpt", tmp_path / "sweep runs ü", "--attention_type", "simam",
                    f"--attention_param={lam}", "--seed", s], script="main_cifar.py")


def test_lambda_sweep_script_trains_each_lambda_and_seed(tmp_path):
    from conftest import seed
    from test_cifar_train import FAST, write_cifar
    write_cifar(tmp_path / "data", "cifar10")
    proc = subprocess.run([str(ROOT / "scripts" / "lambda_sweep.sh"), "cifar", f"{seed(0)} {seed(1)} {seed(0)}",
                           "--dataset", "cifar10", "--dataset_dir", str(tmp_path / "data"), "-a", "resnet20", "--epochs",
                           "1", "-b", "16", "--ckpt", str(tmp_path / "sweep runs ü")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, PYTHON=sys.executable, LAMBDAS="0.1 1e-4 0.1", **FAST))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A value given twice is one run: seeds a b a and lambdas 0.1 1e-4 0.1 are 2 x 2 runs.
    assert proc.stdout.count(f"=== lambda 0.1, seed {seed(0)} ===") == 1 and proc.stdout.count("=== lambda") == 4
    accs = {}
    for lam in (0.1, 1e-4):
        for s in (seed(0), seed(1)):
            run = sweep_run(tmp_path, lam, s)
            a = json.loads((run / "args.json").read_text())
            assert (a["attention_type"], a["attention_param"], a["seed"]) == ("simam", lam, s)
            accs.setdefault(lam, []).append(json.loads((run / "metrics.jsonl").read_text())["val_acc1"])
    assert (tmp_path / "sweep runs ü" / "lambda_sweep.png").is_file()
    for lam, a in accs.items():
        line = f"| resnet20 (CIFAR-10) | {lam:g} | 2 | "
        row = next(ln for ln in proc.stdout.splitlines() if ln.startswith(line))
        assert f"{statistics.mean(a):.2f} ± {statistics.stdev(a):.2f}" in row

    # Again, for one of its runs under another spelling of its lambda (1e-1: the same run): the finished
    # run is skipped, its folder untouched, and still plotted.
    run = sweep_run(tmp_path, 0.1, seed(0))
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file() and f.name not in ("log.txt", ".lock")}
    again = subprocess.run([str(ROOT / "scripts" / "lambda_sweep.sh"), "cifar", str(seed(0)), "--dataset",
                            "cifar10", "--dataset_dir", str(tmp_path / "data"), "-a", "resnet20", "--epochs", "1", "-b", "16",
                            "--ckpt", str(tmp_path / "sweep runs ü")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHON=sys.executable, LAMBDAS="1e-1", **FAST))
    assert again.returncode == 0 and "already finished" in again.stdout, again.stderr[-3000:]
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file() and f.name not in ("log.txt", ".lock")} == before
    assert f"| resnet20 (CIFAR-10) | 0.1 | 1 | **{accs[0.1][0]:.2f}** |" in again.stdout


def test_lambda_sweep_refuses_its_own_flags():
    for argv in (["cifar", "0", "--attention_param", "1e-3"], ["mnist", "0"], ["cifar"]):
        proc = subprocess.run([str(ROOT / "scripts" / "lambda_sweep.sh"), *argv], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr, argv
