"""Issue 18, the optimizer side: EMA, weight-decay groups, gradient clipping and accumulation, warm-up and
torchvision's per-epoch schedule, the tv2 configs; each against its definition, torch's own schedulers or a
loop written here. Then the trainer: the paper recipe unmoved and a SIGTERM resume with everything on."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from conftest import ROOT, THREADS, TINY, assert_same_weights, run_cli, run_dir, run_in_process, seed
from utils import UserError
from utils.engine import Stepper, train_one_epoch
from utils.optim import NORM_CLASSES, ExponentialMovingAverage, ema_decay, make_optimizer, param_groups
from utils.schedule import lr_at, schedule_from_args


def tiny_net(bn=True):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.ReLU(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def batches(n, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- EMA

@pytest.mark.parametrize("ema_steps, warmup", [(1, 0), (2, 0), (1, 1)])
def test_ema_is_the_recursive_average_of_the_weights(one_thread, ema_steps, warmup):
    """avg_0 = w at the first update, then avg = d * avg + (1 - d) * w at optimizer steps 0, S, 2S... of
    each epoch, parameters and buffers (BatchNorm statistics) alike; copies during warm-up epochs."""
    model, d = tiny_net(), 0.75
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    ema = ExponentialMovingAverage(model, d)
    step = Stepper(opt, ema=ema, ema_steps=ema_steps, warmup_epochs=warmup)
    data = batches(5, 4)
    want, fresh = None, True
    for epoch in range(2):
        train_one_epoch(model, data, nn.CrossEntropyLoss(), opt, lambda e, i: 0.1, epoch, torch.device("cpu"),
                        stepper=step, print_freq=100)
    # The same training by hand, and the average of the weights after the updating steps.
    model2 = tiny_net()
    opt2 = torch.optim.SGD(model2.parameters(), 0.1, momentum=0.9)
    for epoch in range(2):
        for i, (x, y) in enumerate(data):
            opt2.zero_grad()
            nn.functional.cross_entropy(model2(x), y).backward()
            opt2.step()
            if i % ema_steps == 0:
                w = {k: v.detach().clone() for k, v in model2.state_dict().items()}
                if fresh:  # the first update, or the first after a warm-up epoch's (n_averaged reset to 0)
                    want = w
                else:
                    want = {k: d * want[k] + (1 - d) * w[k] if w[k].is_floating_point()
                            else (d * want[k] + (1 - d) * w[k]).to(w[k].dtype) for k in w}
                fresh = epoch < warmup
    got = {k.removeprefix("module."): v for k, v in ema.state_dict().items() if k != "n_averaged"}
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k].double(), want[k].double(), rtol=1e-6, atol=1e-7), k
    assert not torch.equal(got["0.weight"], model.state_dict()["0.weight"])  # an average, not the weights


def test_ema_with_decay_zero_is_the_model(one_thread):
    model = tiny_net()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    ema = ExponentialMovingAverage(model, 0.0)
    train_one_epoch(model, batches(3, 4), nn.CrossEntropyLoss(), opt, lambda e, i: 0.1, 1, torch.device("cpu"),
                    stepper=Stepper(opt, ema=ema), print_freq=100)
    assert int(ema.n_averaged) == 3
    for k, v in model.state_dict().items():
        assert torch.equal(ema.module.state_dict()[k], v), k


def test_ema_decay_is_adjusted_as_torchvision():
    # torchvision: alpha = min(1, (1 - D) * world_size * per-GPU batch * S / epochs); decay = 1 - alpha.
    adjust = 8 * 128 * 32 / 600
    assert ema_decay(0.99998, 32, 600, 8, 128) == 1.0 - min(1.0, (1.0 - 0.99998) * adjust)
    assert ema_decay(0.99998, 32, 600, 8, 128) == pytest.approx(1 - 2e-5 * adjust, abs=1e-12)
    assert ema_decay(0.9, 32, 1, 8, 128) == 0.0  # alpha clamped to 1: the EMA is the model
    # a gradient-accumulation step sees N batches: the same images per EMA update as an N times larger batch
    assert ema_decay(0.99998, 32, 600, 8, 64, accum_steps=2) == ema_decay(0.99998, 32, 600, 8, 128)


# ---------------------------------------------------------------- weight decay groups

@pytest.mark.parametrize("attention", ["gc", "srm"])  # GC has a LayerNorm, SRM a BatchNorm1d
def test_norm_and_bias_groups(attention):
    from networks import create_net
    model = create_net("resnet18", attention, None, num_classes=10)
    owner = {}
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            owner[id(p)] = (m, pname)
    in_attention_norm = [n for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d))]
    assert in_attention_norm  # the attention's own norms are there to be grouped

    groups = param_groups(model, 1e-4, norm_weight_decay=0.0, bias_weight_decay=2e-5)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0, 2e-5]
    other, norm, bias = ({id(p) for p in g["params"]} for g in groups)
    for p in model.parameters():
        m, name = owner[id(p)]
        want = bias if name == "bias" else norm if isinstance(m, NORM_CLASSES) else other
        assert id(p) in want and sum(id(p) in g for g in (other, norm, bias)) == 1, (type(m), name)
    assert any(isinstance(owner[i][0], (nn.LayerNorm, nn.BatchNorm1d)) for i in norm)

    # norm only: a norm's bias stays with the norm (torchvision's order of precedence: custom key, norm, other)
    groups = param_groups(model, 1e-4, norm_weight_decay=0.0)
    assert len(groups) == 2 and {id(p) for p in groups[1]["params"]} == {
        id(p) for m in model.modules() if isinstance(m, NORM_CLASSES) for p in m.parameters(recurse=False)}
    # bias only: norms' weights are "other"
    groups = param_groups(model, 1e-4, bias_weight_decay=0.0)
    assert len(groups) == 2 and all(owner[id(p)][1] == "bias" for p in groups[1]["params"])


def test_default_optimizer_is_one_group_as_before():
    from networks import create_net
    from main_imagenet import get_args_parser
    from utils.args import parse_args
    model = create_net("resnet18", "gc", None, num_classes=10)
    opt = make_optimizer(model, parse_args(get_args_parser(), []))
    assert len(opt.param_groups) == 1
    g = opt.param_groups[0]
    assert [id(p) for p in g["params"]] == [id(p) for p in model.parameters()]
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.1, 0.9, 1e-4)


# ---------------------------------------------------------------- clipping, accumulation

def test_clip_grad_norm_scales_the_gradient_to_the_norm(one_thread):
    """clip: g * min(1, X / (||g|| + 1e-6)), ||g|| the 2-norm over every parameter's gradient."""
    model, x, y, clip, lr = tiny_net(bn=False), *batches(1, 8)[0], 0.05, 0.5
    w0 = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    assert norm > clip  # the clip bites
    scale = min(1.0, clip / (float(norm) + 1e-6))
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr)
    Stepper(opt, clip_grad_norm=clip)(nn.functional.cross_entropy(model(x), y), model, 0, 0, 1)
    for p, w, g in zip(model.parameters(), w0, grads):
        assert torch.allclose(p.detach(), w - lr * scale * g, atol=1e-7)


@pytest.mark.parametrize("n_batches, accum", [(6, 2), (5, 2), (7, 3)])
def test_grad_accumulation_equals_the_larger_batch(one_thread, n_batches, accum):
    """Without BatchNorm, N micro-batches of B are one batch of N*B (the epoch's last group: what is left);
    the schedule is asked for optimizer steps 0..steps-1."""
    data = batches(n_batches, 4)
    model, ref = tiny_net(bn=False), tiny_net(bn=False)
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-3)
    asked = []

    def lr_fn(epoch, it):
        asked.append(it)
        return 0.1 * (1 + it)  # a different lr every optimizer step

    step = Stepper(opt, accum_steps=accum)
    tr = train_one_epoch(model, data, nn.CrossEntropyLoss(), opt, lr_fn, 0, torch.device("cpu"), stepper=step,
                         print_freq=100)
    steps = math.ceil(n_batches / accum)
    assert step.steps(n_batches) == steps and sorted(set(asked)) == list(range(steps))
    assert tr["images"] == 4 * n_batches

    ref_opt = torch.optim.SGD(ref.parameters(), 0.1, momentum=0.9, weight_decay=1e-3)
    for k in range(steps):
        group = data[k * accum:(k + 1) * accum]
        x, y = torch.cat([b[0] for b in group]), torch.cat([b[1] for b in group])
        for g in ref_opt.param_groups:
            g["lr"] = 0.1 * (1 + k)
        ref_opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_grad_scaler_path_unscales_before_clipping(one_thread):
    """Under a GradScaler (fp16's; here on the CPU) accumulation and clipping act on the unscaled gradients:
    the same weights as without a scaler, up to float rounding (the scale is a power of two)."""
    data = batches(4, 4)
    models = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)):
        model = tiny_net(bn=False)
        opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
        train_one_epoch(model, data, nn.CrossEntropyLoss(), opt, lambda e, i: 0.1, 0, torch.device("cpu"),
                        print_freq=100, stepper=Stepper(opt, scaler, accum_steps=2, clip_grad_norm=0.05))
        models.append(model)
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(models[0][0].weight, tiny_net(bn=False)[0].weight)  # it trained


def test_stops_only_between_accumulation_groups(one_thread):
    model = tiny_net(bn=False)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    asked = []
    tr = train_one_epoch(model, batches(7, 2), nn.CrossEntropyLoss(), opt, lambda e, i: 0.1, 0, torch.device("cpu"),
                         stepper=Stepper(opt, accum_steps=3), print_freq=100,
                         boundary=lambda done, get_sums: asked.append(done) or done == 6)
    assert asked == [3, 6] and tr["interrupted"] and tr["iteration"] == 6


# ---------------------------------------------------------------- schedules

def test_default_warmup_ramp_is_unchanged():
    iters, w = 7, 2.5
    for epoch in range(4):
        for it in range(iters):
            done = epoch * iters + it + 1
            want = 0.4 * (1 + math.cos(math.pi * (epoch + it / iters) / 10)) / 2
            if done < w * iters:
                want *= done / (w * iters)
            assert lr_at(epoch, it, iters, 0.4, 10, cos=True, warmup_epochs=w) == want


@pytest.mark.parametrize("method", ["linear", "constant"])
def test_per_iteration_warmup_follows_torch_warmup_schedulers(method):
    """--lr-warmup-decay with the per-iteration schedules: LinearLR / ConstantLR stepped every iteration."""
    iters, warm, lr = 4, 2, 0.3
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr)
    sched = (torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=warm * iters) if method == "linear"
             else torch.optim.lr_scheduler.ConstantLR(opt, factor=0.1, total_iters=warm * iters))
    for t in range(4 * iters):
        epoch, it = divmod(t, iters)
        assert lr_at(epoch, it, iters, lr, 90, warmup_epochs=warm, warmup_method=method,
                     warmup_decay=0.1) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), t
        opt.step()
        sched.step()


def torch_per_epoch_lrs(lr, epochs, warmup, method, decay, lr_min):
    """torchvision's train.py: SequentialLR(warm-up, CosineAnnealingLR), stepped once per epoch."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr)
    main = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs - warmup, eta_min=lr_min)
    warm = (torch.optim.lr_scheduler.LinearLR(opt, start_factor=decay, total_iters=warmup) if method == "linear"
            else torch.optim.lr_scheduler.ConstantLR(opt, factor=decay, total_iters=warmup))
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, main], milestones=[warmup])
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.filterwarnings("ignore::UserWarning")  # SequentialLR's own deprecation notice about step(epoch)
@pytest.mark.parametrize("method, decay, lr_min", [("linear", "0.01", "0"), ("constant", "0.2", "0.001")])
def test_per_epoch_schedule_is_torchvisions(method, decay, lr_min):
    from main_imagenet import get_args_parser
    from utils.args import parse_args
    args = parse_args(get_args_parser(), ["--lr", "0.5", "--epochs", "40", "--warmup-epochs", "5",
                                          "--lr-scheduler", "cosineannealinglr", "--lr-warmup-method", method,
                                          "--lr-warmup-decay", decay, "--lr-min", lr_min])
    lr_fn = schedule_from_args(args, 13)
    want = torch_per_epoch_lrs(0.5, 40, 5, method, float(decay), float(lr_min))
    for epoch in range(40):
        assert {lr_fn(epoch, it) for it in (0, 6, 12)} == {lr_fn(epoch, 0)}  # constant within the epoch
        assert lr_fn(epoch, 0) == pytest.approx(want[epoch], rel=1e-9, abs=1e-15), epoch


TV2 = sorted((ROOT / "configs" / "imagenet" / "tv2").glob("resnet50_*.toml"))


def test_tv2_configs_are_torchvisions_resnet50_recipe():
    from main_imagenet import get_args_parser
    from utils.args import parse_args
    assert [f.stem for f in TV2] == ["resnet50_cbam", "resnet50_eca", "resnet50_none", "resnet50_se", "resnet50_simam"]
    for f in TV2:
        text = f.read_text()
        assert "80.858" in text and "pytorch.org/blog" in text  # the source and the published top-1
        a = parse_args(get_args_parser(), ["--config", str(f)])
        want = dict(arch="resnet50", attention_type=f.stem.split("_")[1], epochs=600, batch_size=1024, lr=0.5,
                    momentum=0.9, weight_decay=2e-5, norm_weight_decay=0.0, bias_weight_decay=None,
                    label_smoothing=0.1, mixup_alpha=0.2, cutmix_alpha=1.0, auto_augment="ta_wide",
                    random_erase=0.1, ra_reps=4, model_ema=True, model_ema_steps=32, model_ema_decay=0.99998,
                    train_crop_size=176, val_resize_size=232, val_crop_size=224, lr_scheduler="cosineannealinglr",
                    warmup_epochs=5, lr_warmup_method="linear", lr_warmup_decay=0.01, lr_min=0.0, cos_lr=False,
                    clip_grad_norm=None, grad_accum_steps=1, ckpt="checkpoints/tv2")
        assert {k: getattr(a, k) for k in want} == want, f
        # the paper's module settings, as the paper configs have them
        paper = parse_args(get_args_parser(), ["--config", str(ROOT / "configs" / "imagenet" / f.name)])
        assert a.attention_param == paper.attention_param, f
    a = parse_args(get_args_parser(), ["--config", str(TV2[0])])
    lrs = [schedule_from_args(a, 1251)(e, 0) for e in range(600)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR's notice about step(epoch)
        want = torch_per_epoch_lrs(0.5, 600, 5, "linear", 0.01, 0.0)
    assert lrs == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert lrs[0] == pytest.approx(0.005) and lrs[5] == 0.5


# ---------------------------------------------------------------- bad values

@pytest.mark.parametrize("argv, message", [
    (["--grad-accum-steps", "0"], "--grad-accum-steps must be at least 1"),
    (["--model-ema-steps", "0"], "--model-ema-steps must be at least 1"),
    (["--model-ema-decay", "1.5"], "--model-ema-decay must be in [0, 1]"),
    (["--clip-grad-norm", "0"], "--clip-grad-norm must be a finite number > 0"),
    (["--norm-weight-decay", "nan"], "--norm-weight-decay must be a finite number >= 0"),
    (["--bias-weight-decay", "-0.1"], "--bias-weight-decay must be a finite number >= 0"),
    (["--lr-warmup-decay", "0"], "--lr-warmup-decay must be in (0, 1]"),
    (["--lr-min", "0.1"], "--lr-min goes with --lr-scheduler"),
    (["--lr-scheduler", "cosineannealinglr", "--lr-min", "-1"], "--lr-min must be a finite number >= 0"),
    (["--lr-scheduler", "cosineannealinglr", "--cos_lr"], "choose one"),
    (["--lr-scheduler", "cosineannealinglr", "--warmup-epochs", "2.5"], "--warmup-epochs must be a whole number"),
    (["--use-ema"], "--use-ema goes with --save_weights"),
])
def test_bad_values_are_one_line_errors(argv, message):
    from main_imagenet import TASK, get_args_parser
    from utils.args import parse_args
    from utils.trainer import check_args
    with pytest.raises(UserError, match=re.escape(message)):
        check_args(parse_args(get_args_parser(), argv), TASK)


def main_in_process(argv):
    """main_imagenet.py's main() here (no interpreter start-up): (exit code, stdout, stderr)."""
    proc = run_in_process(argv)
    return proc.returncode, proc.stdout, proc.stderr


def test_bad_value_on_the_command_line_and_use_ema_without_an_ema(tiny_data, tmp_path, capsys):
    code, out, err = main_in_process([tiny_data, "--grad-accum-steps", "0"])
    assert code == 1 and err.strip().splitlines() == ["error: --grad-accum-steps must be at least 1, got 0"]
    torch.save({"state_dict": tiny_net().state_dict()}, tmp_path / "plain.pth")
    code, out, err = main_in_process(["--resume", tmp_path / "plain.pth", "--save_weights", tmp_path / "w.pth",
                                      "--use-ema"])
    assert code == 1 and err.strip().splitlines() == [
        f"error: {tmp_path / 'plain.pth'} holds no EMA weights (trained without --model-ema)"]
    assert not (tmp_path / "w.pth").exists()


# ---------------------------------------------------------------- the trainer

def test_paper_recipe_is_a_plain_sgd_loop(tiny_data, tmp_path, one_thread):
    """Every recipe flag at its default: the trainer's weights after 2 epochs are those of the plainest loop
    over the same batches (SGD, cross-entropy, the step schedule's constant lr), bit for bit."""
    from main_imagenet import datasets, get_args_parser
    from networks import create_net
    from utils.args import parse_args
    from utils.inputs.data import collate_skipping, imagenet_loader
    from utils.engine import _unpack
    from utils.trainer import seed_everything
    argv = [str(tiny_data), *TINY, "-b", "8", "--epochs", "2", "--seed", str(seed(3)), "-j", "0", "--ckpt", str(tmp_path)]
    proc = run_cli(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(run_dir(argv) / "checkpoint.pth.tar", weights_only=True)
    assert got.get("model_ema") is None and len(got["optimizer"]["param_groups"]) == 1

    args = parse_args(get_args_parser(), argv)
    train_set, _ = datasets(args)
    seed_everything(seed(3))
    model = create_net("resnet18", num_classes=3).train()
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    loader = imagenet_loader(train_set, 8, 0, seed(3), collate_fn=collate_skipping)
    for epoch in range(2):
        for batch in loader(epoch):
            images, target, _ = _unpack(batch, torch.device("cpu"), False)
            opt.zero_grad()
            nn.functional.cross_entropy(model(images), target).backward()
            opt.step()
    assert_same_weights(got, {"state_dict": model.state_dict(), "optimizer": opt.state_dict()}, momentum=True)


EVERYTHING = ["--mixup-alpha", "0.2", "--cutmix-alpha", "1.0", "--label-smoothing", "0.1", "--auto-augment", "ta_wide",
              "--random-erase", "0.1", "--ra-reps", "2", "--model-ema", "--model-ema-steps", "1",
              "--model-ema-decay", "0.9", "--norm-weight-decay", "0", "--bias-weight-decay", "0",
              "--clip-grad-norm", "1", "--grad-accum-steps", "2", "--warmup-epochs", "1", "--lr-warmup-decay", "0.1",
              "--sync-bn", "-j", "2", "-p", "1", "-b", "16", "--lr", "0.02", "--seed", str(seed(0)), "--epochs", "2"]


def stop_inside_epoch_2(cmd, sig=signal.SIGTERM, timeout=300):
    """Run `cmd`; SIGTERM once epoch 2 has done 3 batches (whatever the epoch's length)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=THREADS)  # as run_cli: the runs compared must agree
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            m = re.match(r"Epoch: \[2\]\[\s*(\d+)/", line)
            if m and int(m.group(1)) >= 3:
                proc.send_signal(sig)
                break
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, "".join(lines) + out, err


def test_sigterm_resume_is_bit_exact_with_every_recipe_feature(recipe_data, tmp_path, capsys, one_thread):
    """Issue 18's every flag at once (the data side's too): a run with -j 0, and one with -j 2 stopped by a
    SIGTERM inside epoch 2 and resumed, end with the same weights, momentum, EMA and metrics. Then the EMA's reporting: the epoch
    line and metrics.jsonl show both, model_best says which won, -e evaluates both, --use-ema exports it."""
    done, cut = tmp_path / "done", tmp_path / "cut"
    tiny_data = recipe_data
    proc = run_in_process([tiny_data, *TINY, *EVERYTHING, "-j", "0", "--ckpt", done])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: --sync-bn does nothing in a single process" in proc.stdout
    code, out, err = stop_inside_epoch_2([sys.executable, str(ROOT / "main_imagenet.py"), str(tiny_data), *TINY,
                                          *EVERYTHING, "--ckpt", str(cut)])
    assert code == 128 + signal.SIGTERM, (out[-2000:], err[-2000:])
    assert "stopped by SIGTERM at epoch 2, iteration" in out, out[-2000:]
    run, ref_run = (run_dir([tiny_data, *TINY, *EVERYTHING, "--ckpt", c]) for c in (cut, done))
    mid = torch.load(run / "checkpoint.pth.tar", weights_only=True)
    assert mid["epoch"] == 1 and mid["iteration"] >= 3 and mid["iteration"] % 2 == 0  # a whole accumulation group
    assert mid["model_ema"] is not None
    proc = run_cli([tiny_data, *TINY, *EVERYTHING, "--ckpt", cut, "--resume", run / "checkpoint.pth.tar"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ref, got = (torch.load(r / "checkpoint.pth.tar", weights_only=True) for r in (ref_run, run))
    assert got["epoch"] == 2 and got["iteration"] == 0
    assert_same_weights(ref, got, momentum=True)
    assert ref["model_ema"].keys() == got["model_ema"].keys()
    for k, v in ref["model_ema"].items():
        assert torch.equal(v, got["model_ema"][k]), k
    assert [g["weight_decay"] for g in got["optimizer"]["param_groups"]] == [1e-4, 0.0, 0.0]
    read = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (ref_run, run)]
    assert read[0] == [{**r, **{k: read[0][i][k] for k in ("epoch_time", "images_per_sec")}}
                       for i, r in enumerate(read[1])]
    rows = read[1]
    keys = ("val_acc1", "val_acc5", "val_loss", "val_ema_acc1", "val_ema_acc5", "val_ema_loss")
    assert all(k in r for r in rows for k in keys)

    # model_best: the better of the model and its EMA, and which one it was
    scores = [(max(r["val_acc1"], r["val_ema_acc1"]), r["epoch"],
               "ema" if r["val_ema_acc1"] > r["val_acc1"] else "model") for r in rows]
    best_score = max(s[0] for s in scores)
    first_best = next(s for s in scores if s[0] == best_score)
    best = torch.load(run / "model_best.pth.tar", weights_only=True)
    assert (best["best_acc1"], best["best_epoch"], best["best_of"]) == first_best
    assert f"best {first_best[0]:.3f} ({first_best[2]})" in proc.stdout

    code, out, err = main_in_process([tiny_data, *TINY, "-e", "--resume", run / "checkpoint.pth.tar", "-j", "0"])
    assert code == 0, err[-3000:]
    model_line, ema_line = (ln for ln in out.splitlines() if ln.startswith(" * "))
    assert f"Acc@1 {rows[-1]['val_acc1']:.3f}" in model_line and f"Loss {rows[-1]['val_loss']:.4f}" in model_line
    assert ema_line.startswith(" * EMA Acc@1") and f"Acc@1 {rows[-1]['val_ema_acc1']:.3f}" in ema_line
    assert f"Loss {rows[-1]['val_ema_loss']:.4f}" in ema_line

    out = tmp_path / "ema.pth"
    code, _, err = main_in_process(["--resume", run / "checkpoint.pth.tar", *TINY[:2], "--save_weights", out,
                                    "--use-ema"])
    assert code == 0, err[-3000:]
    exported = torch.load(out, weights_only=True)
    assert exported.keys() == got["state_dict"].keys()
    for k, v in exported.items():
        assert torch.equal(v, got["model_ema"]["module." + k]), k


# ---------------------------------------------------------------- make_table

def fake_recipe_run(root, name, seed, accs, config=None, **recipe):
    """A run folder as main_imagenet.py writes it (args.json, metrics.jsonl); accs: (top1, top5[, ema1, ema5])."""
    run = root / name
    run.mkdir(parents=True)
    args = dict(arch="resnet18", attention_type="simam", attention_param=0.1, epochs=len(accs), seed=seed,
                seed_used=seed, classes=1000, config=config)
    args.update(dict(mixup_alpha=0.0, model_ema=False, ra_reps=1), **recipe)
    (run / "args.json").write_text(json.dumps(args))
    rows = [dict(epoch=i + 1, val_acc1=a[0], val_acc5=a[1], val_loss=1.0,
                 **(dict(val_ema_acc1=a[2], val_ema_acc5=a[3], val_ema_loss=1.0) if len(a) > 2 else {}))
            for i, a in enumerate(accs)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_make_table_shows_recipe_runs_apart_with_their_ema(tmp_path, capsys):
    import csv
    import statistics
    from test_make_table_seeds import make_table
    tv2 = "configs/imagenet/tv2/resnet50_simam.toml"
    # two seeds of a tv2 run: the model's best epoch and the EMA's best epoch differ
    fake_recipe_run(tmp_path, "tv2-a", 0,
                    [(70.0, 90.0, 69.0, 89.0), (72.0, 91.0, 71.0, 92.0), (71.0, 93.0, 73.0, 94.0)], config=tv2, model_ema=True, mixup_alpha=0.2)
    fake_recipe_run(tmp_path, "tv2-b", 1, [(74.0, 92.0, 75.0, 95.0), (73.0, 90.0, 74.0, 90.0), (72.5, 89.0, 73.5, 89.0)],
                    config=tv2, model_ema=True, mixup_alpha=0.2)
    fake_recipe_run(tmp_path, "clip", 0, [(60.0, 80.0)], clip_grad_norm=1.0)  # a recipe flag, no EMA
    fake_recipe_run(tmp_path, "paper", 0, [(71.0, 89.0)])  # the paper's recipe

    make_table().main([str(tmp_path), "--csv"])
    paper_csv, recipe_csv = capsys.readouterr().out.strip().split("\n\n")
    paper = list(csv.DictReader(paper_csv.splitlines()))
    assert [r["source"].split("/")[-1] for r in paper] == ["paper"] and float(paper[0]["paper_top1"]) == 71.31
    recipe = {r["recipe"]: r for r in csv.DictReader(recipe_csv.splitlines())}
    assert not any(k.startswith(("paper", "diff")) for k in recipe["tv2"])
    t = recipe["tv2"]
    assert int(t["seeds"]) == 2
    assert float(t["top1"]) == pytest.approx(statistics.mean([72.0, 74.0]))  # each seed's best model epoch
    assert float(t["top5"]) == pytest.approx(statistics.mean([91.0, 92.0]))
    assert float(t["ema_top1"]) == pytest.approx(statistics.mean([73.0, 75.0]))  # each seed's best EMA epoch
    assert float(t["ema_top5"]) == pytest.approx(statistics.mean([94.0, 95.0]))
    assert float(t["ema_top1_std"]) == pytest.approx(statistics.stdev([73.0, 75.0]))
    assert float(recipe["modern"]["top1"]) == 60.0 and recipe["modern"]["ema_top1"] == ""

    make_table().main([str(tmp_path)])
    md = capsys.readouterr().out
    paper_md, recipe_md = md.split("Modern recipes (no paper column)")
    assert "71.31" in paper_md and "tv2" not in paper_md
    line = next(ln for ln in recipe_md.splitlines() if "| tv2 |" in ln)
    assert "74.00 ± 1.41" in line and "94.50 ± 0.71" in line and "71.31" not in recipe_md


def test_ddp_ranks_agree_on_the_ema(tiny_data, tmp_path, capsys, one_thread):
    """A 2-process gloo run with EMA, gradient accumulation and clipping: its validation of the EMA (each rank
    half of the images, sums all-reduced) equals a single-process evaluation of the EMA rank 0 saved, so every
    rank evaluated the same average (BatchNorm statistics included)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    argv = [tiny_data, *TINY, "-b", "4", "--lr", "0.01", "-j", "0", "--seed", seed(1), "--epochs", "1",
            "--ckpt", tmp_path,
            "--model-ema", "--model-ema-steps", "1", "--model-ema-decay", "0.5", "--grad-accum-steps", "2",
            "--clip-grad-norm", "1", "--norm-weight-decay", "0"]
    proc = run_cli(argv, launcher=launcher, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = run_dir(argv)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    code, out, err = main_in_process([tiny_data, *TINY, "-j", "0", "-e", "--resume", run / "checkpoint.pth.tar"])
    assert code == 0, err[-3000:]
    model_line, ema_line = (ln for ln in out.splitlines() if ln.startswith(" * "))
    for line, key in ((model_line, "val"), (ema_line, "val_ema")):
        m = re.search(r"Acc@1 (\d+\.\d{3}) Acc@\d (\d+\.\d{3}) Loss (\d+\.\d+)", line)
        assert m and m.group(1) == f"{row[key + '_acc1']:.3f}" and m.group(2) == f"{row[key + '_acc5']:.3f}", line
        assert float(m.group(3)) == pytest.approx(row[key + "_loss"], rel=1e-4)
