"""Every numeric flag of every script is checked against its range before any work: one `error:` line
naming the flag, a non-zero exit, nothing written. The table below must hold a bad value for each
numeric flag the scripts' parsers have (a new flag without one fails test_every_numeric_flag_has_cases)."""
import argparse
import importlib.util
import re

import pytest
import torch

from conftest import ROOT
from utils import UserError

SEED_LIMIT = str(2**32)  # one past utils.args.SEED_MAX

# dest -> bad values (a value may carry more flags after a space); shared by every script that has the dest (each script's own flags are in it too).
BAD = {
    # the trainers' common flags (utils.args.get_args_parser)
    "attention_param": ["0 --attention_type=simam", "nan --attention_type=simam"], "epochs": ["0"], "batch_size": ["0"], "lr": ["-0.1", "nan"],
    "momentum": ["-0.1", "1"], "weight_decay": ["nan", "-1"], "warmup_epochs": ["-1", "inf"],
    "label_smoothing": ["1", "-0.1"], "workers": ["-1"], "print_freq": ["0"], "seed": ["-1", SEED_LIMIT, str(2**64)],
    "nproc": ["0"], "save_every_minutes": ["0", "nan"],
    # the recipe's (utils.args.add_recipe_args)
    "mixup_alpha": ["-1", "inf"], "cutmix_alpha": ["nan"], "ra_magnitude": ["-1", "31"], "augmix_severity": ["0", "11"],
    "random_erase": ["1.5", "nan"], "ra_reps": ["0"], "model_ema_steps": ["0"], "model_ema_decay": ["2", "nan"],
    "norm_weight_decay": ["-1"], "bias_weight_decay": ["nan"], "clip_grad_norm": ["0", "-1", "nan"],
    "grad_accum_steps": ["0"], "lr_warmup_decay": ["0", "1.5"], "lr_min": ["-1"],
    # main_imagenet.py, scripts/eval_checkpoints.py
    "train_crop_size": ["0"], "val_resize_size": ["0"], "val_crop_size": ["0"],
    # main_cifar.py
    "test_batch_size": ["0"], "milestones": ["-1"], "gamma": ["-1", "nan", "0"],
    # main_coco.py
    "min_size": ["0"], "max_size": ["0"], "lr_base_batch": ["0"], "warmup_iters": ["-1"], "warmup_ratio": ["-0.1", "2"],
    # scripts/gradcam.py
    "max_images": ["0"], "resize": ["0"], "crop": ["0"], "dpi": ["0"],
    # scripts/benchmark.py, scripts/benchmark_loader.py
    "batch": ["0"], "size": ["0"], "warmup": ["-1"], "repeats": ["0"], "e_lambda": ["0", "nan"], "images": ["0"],
    "steps": ["0"],
    # scripts/benchmark_scale.py (benchmark_loader.py --scale)
    "classes": ["0"], "per_class": ["0"], "coco_images": ["0"], "per_image": ["0", "nan"], "fraction": ["0", "1.5"],
    "scale_workers": ["0"], "scale_batch": ["0"],
    # scripts/make_demo_data.py, scripts/prepare_imagenet.py
    "train_per_class": ["0"], "val_per_class": ["0"], "expect_classes": ["0"], "expect_train": ["0"],
    "expect_val_per_class": ["0"],
}
# Per script: how to call it so that, past the flag checks, it fails at once on a missing input (no work).
SCRIPTS = ["main_imagenet.py", "main_cifar.py", "main_coco.py", "scripts/eval_checkpoints.py", "scripts/gradcam.py",
           "scripts/benchmark.py", "scripts/benchmark_loader.py", "scripts/make_demo_data.py",
           "scripts/prepare_imagenet.py", "scripts/model_summary.py"]


def base_argv(script, tmp):
    missing = str(tmp / "missing")
    return {"main_imagenet.py": [missing, "--ckpt", tmp / "ck"],
            "main_cifar.py": ["--dataset_dir", missing, "--ckpt", tmp / "ck"],
            "main_coco.py": [missing, "--ckpt", tmp / "ck"],
            "scripts/eval_checkpoints.py": [missing, "--data", missing],
            "scripts/gradcam.py": [missing, "--images", missing, "-o", tmp / "out.png"],
            "scripts/benchmark.py": [],
            "scripts/benchmark_loader.py": [],
            "scripts/make_demo_data.py": [tmp / "demo"],
            "scripts/prepare_imagenet.py": ["--check", missing],
            "scripts/model_summary.py": ["-a", "resnet18", "--attention_type", "se"]}[script]


def load(script):
    spec = importlib.util.spec_from_file_location("flag_ranges_" + re.sub(r"\W", "_", script), ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry(module, script):
    """What to call with argv: main(), or (benchmarks) the parse_args that checks the flags, so that a
    missed check fails the test instead of starting a benchmark."""
    return module.parse_args if script.startswith("scripts/benchmark") else module.main


class _Parser(Exception):
    pass


def parser_of(module, script, tmp, monkeypatch):
    """The script's ArgumentParser, caught at its parse_args call."""
    if hasattr(module, "get_args_parser"):
        return module.get_args_parser()

    def grab(self, *args, **kwargs):
        raise _Parser(self)
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", grab)
        with pytest.raises(_Parser) as got:
            entry(module, script)([str(a) for a in base_argv(script, tmp)])
    return got.value.args[0]


def numeric_actions(parser):
    """The parser's numeric flags (argparse itself checks those with choices), once per dest."""
    seen = {}
    for a in parser._actions:
        if a.type in (int, float) and a.choices is None and a.option_strings and a.help != argparse.SUPPRESS:
            seen.setdefault(a.dest, a)
    return list(seen.values())


def error_line(call, argv, capsys):
    """Run call(argv): the one error line (argparse's `prog: error: ...` counts), with a non-zero exit."""
    try:
        call([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    except UserError as e:  # benchmark_loader.parse_args raises; its main prints it
        code = f"error: {e}"
    err = capsys.readouterr().err.strip().splitlines()
    if isinstance(code, str):  # sys.exit("error: ...")
        err, code = err + [code], 1
    lines = [line for line in err if "error:" in line]
    assert code and len(lines) == 1 and not any("Traceback" in line for line in err), (argv, code, err)
    return lines[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_is_range_checked_before_any_work(script, tmp_path, monkeypatch, capsys):
    module = load(script)
    call = entry(module, script)
    actions = numeric_actions(parser_of(module, script, tmp_path, monkeypatch))
    missing = [a.option_strings[-1] for a in actions if a.dest not in BAD]
    assert not missing, f"{script}: add bad values for {missing} to BAD"
    checked = 0
    for action in actions:
        for value in BAD[action.dest]:
            flag = action.option_strings[-1]
            line = error_line(call, [*base_argv(script, tmp_path), *f"{flag}={value}".split(" ")], capsys)
            named = any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", line) for o in action.option_strings)
            assert named, (script, flag, value, line)
            checked += 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [], script  # refused before anything is written
    assert checked >= len(actions)


def test_seed_limit_holds_for_every_consumer():
    """The largest --seed (utils.args.SEED_MAX) seeds everything the trainers seed, at any epoch a run
    can reach: the samplers add the epoch to it (the bug was 2**64 - 1 failing at epoch 2)."""
    from utils.args import SEED_MAX
    from utils.inputs.cifar import epoch_draws
    from utils.inputs.coco import epoch_generator
    from utils.inputs.data import EpochLoader, RASampler
    from utils.mixing import batch_mix
    from utils.trainer import seed_everything
    with torch.random.fork_rng(devices=[]):
        seed_everything(SEED_MAX)
    ds = type("Indices", (), {"__len__": lambda self: 8, "__getitem__": lambda self, item: item[0]})()
    epoch = 10**6
    assert len(list(EpochLoader(ds, 2, 0, SEED_MAX)(epoch))) == 4
    assert len(RASampler(300, seed=SEED_MAX, repetitions=2).draws()) == 256
    ra = RASampler(300, seed=SEED_MAX, repetitions=2)
    ra.set_epoch(epoch)
    assert len(ra.draws()) == 256
    assert len(epoch_draws(8, SEED_MAX, epoch)[0]) == 8
    epoch_generator(SEED_MAX, epoch)
    mix = batch_mix(argparse.Namespace(mixup_alpha=0.2, cutmix_alpha=1.0), 3, SEED_MAX, 0)
    images, target = mix(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), epoch, 10**6)
    assert target.shape == (2, 3)
    # A checkpoint of an older version may record a seed past the limit: refused at resume, not at epoch 2.
    from utils.distributed import DistInfo
    from utils.trainer import choose_seed
    args = argparse.Namespace(seed=None, resume="old.pth.tar")
    assert choose_seed(args, {"seed": SEED_MAX}, torch.device("cpu"), DistInfo()) == SEED_MAX
    with pytest.raises(UserError, match=r"the seed recorded in old.pth.tar must be in \[0, 4294967295\], got 18446744073709551615"):
        choose_seed(args, {"seed": 2**64 - 1}, torch.device("cpu"), DistInfo())


def test_policy_limits_are_torchvisions():
    """--ra-magnitude's and --augmix-severity's upper bounds are where torchvision's policies stop working."""
    from torchvision.transforms import v2

    from utils.args import AUGMIX_SEVERITY_MAX, RA_MAGNITUDE_MAX
    img = torch.zeros(3, 16, 16, dtype=torch.uint8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(100):
            v2.RandAugment(magnitude=RA_MAGNITUDE_MAX)(img)
    with torch.random.fork_rng(devices=[]), pytest.raises(IndexError):
        torch.manual_seed(0)
        for _ in range(100):  # an op with magnitudes (most of them) indexes past the last one
            v2.RandAugment(magnitude=RA_MAGNITUDE_MAX + 1)(img)
    v2.AugMix(severity=AUGMIX_SEVERITY_MAX)(img)
    with pytest.raises(ValueError):
        v2.AugMix(severity=AUGMIX_SEVERITY_MAX + 1)


def test_batch_not_divisible_by_nproc_is_refused_before_any_process_starts(tmp_path, monkeypatch, capsys):
    import main_imagenet
    import utils.trainer

    def no_spawn(*args, **kwargs):
        raise AssertionError("processes started")
    monkeypatch.setattr(utils.trainer, "spawn", no_spawn)
    line = error_line(main_imagenet.main, [tmp_path / "missing", "--nproc", "3", "-b", "16", "--ckpt", tmp_path / "ck"],
                      capsys)
    assert line == "error: -b 16 (the total batch) is not divisible by 3 processes"
    assert not list(tmp_path.iterdir())
