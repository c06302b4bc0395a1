"""Every bad input is one `error:` line and a non-zero exit, and nothing on disk changes silently."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import main_imagenet
from conftest import ROOT, TINY, main_in_process, make_tiny_data
from utils import UserError



@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest's, for every test of this file
    yield


def main(argv, code=1):
    return main_in_process(argv, code)


def error(argv):
    _, err = main(argv)
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1 and not any("Traceback" in line for line in err), err
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("bad") / "data")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One epoch without --seed (a seed is drawn and recorded)."""
    ckpt = tmp_path_factory.mktemp("trained")
    with pytest.raises(SystemExit) as exc:
        main_imagenet.main([str(a) for a in [data, *TINY, "-b", "8", "-j", "0", "--epochs", "1", "--ckpt", ckpt]])
        raise SystemExit(0)
    assert exc.value.code == 0
    (run,) = ckpt.iterdir()  # no --seed: the folder has no seed suffix
    return run


def test_bad_numbers_and_folders(data, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    cases = [
        (["--lr", "-1"], "--lr must be a finite number >= 0, got -1.0"),
        (["--wd", "nan"], "--wd must be a finite number >= 0"),
        (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
        (["--ckpt", afile / "runs"], f"cannot write the run folder {afile / 'runs'}"),
        (["--amp", "fp16"], "--amp fp16 needs a GPU"),
        (["--save-every-minutes", "0"], "--save-every-minutes must be a finite number > 0"),
        (["-b", "1", "--ckpt", tmp_path / "b1"], "-b 1: 1 image(s) per process meet a 1x1 feature map"),
    ]
    for extra, expected in cases:
        assert expected in error([data, *TINY, "-j", "0", *extra]), extra


def test_module_parameters_are_checked_by_each_module(data, tmp_path, capsys):
    cases = [("se", "0", "se: reduction must be an integer >= 1, got 0"),
             ("se", "-1", "se: reduction must be an integer >= 1"),
             ("cbam", "2.5", "cbam: reduction must be an integer >= 1, got 2.5"),
             ("simam", "0", "simam: lambda must be a finite number > 0"),
             ("simam", "inf", "simam: lambda must be a finite number > 0"),
             ("eca", "4", "eca: kernel size must be an odd integer >= 1, got 4"),
             ("srm", "16", "srm: takes no parameter")]
    for att, param, expected in cases:
        err = error([data, *TINY, "--attention_type", att, "--attention_param", param, "--ckpt", tmp_path])
        assert err.startswith("error: --attention_param: ") and expected in err, (att, param, err)
    assert not list(tmp_path.iterdir())  # refused before any folder is made


def test_config_values_are_type_checked(data, tmp_path, capsys):
    cases = [('cos_lr = "false"', 'cos_lr = \'false\' is a string, expected a boolean'),
             ("epochs = 1.5", "epochs = 1.5 is a float, expected an integer"),
             ("batch_size = true", "batch_size = True is a boolean, expected an integer"),
             ("seed = 1.5", "seed = 1.5 is a float, expected an integer"),
             ('lr = "0.1"', "lr = '0.1' is a string, expected a number"),
             ("arch = [1]", "arch = [1] is a list, expected a string")]
    for line, expected in cases:
        cfg = tmp_path / "c.toml"
        cfg.write_text(line + "\n")
        assert expected in error([data, "--config", cfg]), line
    cfg.write_text("lr = 1\nwarmup_epochs = 2\ncos_lr = true\n")  # an integer where a number is due is fine
    args = main_imagenet.parse_args(main_imagenet.get_args_parser(), ["--config", str(cfg)])
    assert (args.lr, args.warmup_epochs, args.cos_lr) == (1, 2, True)


def test_directory_symlink_loop_is_refused_and_reported(tmp_path, capsys):
    looped = make_tiny_data(tmp_path / "data", train_per_class=2, val_per_class=1)
    os.symlink("..", looped / "train" / "disc" / "again")
    err = error([looped, *TINY, "-j", "0", "--ckpt", tmp_path / "ck"])
    assert "directory symlink loop" in err and str(looped / "train" / "disc" / "again") in err
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_imagenet.py"), "--check", str(looped),
                            "--expect-classes", "3"], capture_output=True, text=True)
    assert check.returncode == 1 and "directory symlink loop" in check.stdout + check.stderr


def test_nan_weights_are_refused_naming_the_tensor(data, trained, tmp_path, capsys):
    ck = torch.load(trained / "checkpoint.pth.tar", weights_only=True)
    ck["state_dict"]["layer2.0.bn1.running_var"][3] = float("nan")
    bad = tmp_path / "nan.pth.tar"
    torch.save(ck, bad)
    err = error([data, *TINY, "-j", "0", "-e", "--resume", bad])
    assert "non-finite" in err and "layer2.0.bn1.running_var" in err


def test_gpu_without_cuda_says_so_and_acc_label_names_k(data, trained, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --gpu 0 is honoured, nothing to warn about")
    out, err = main([data, *TINY, "-j", "0", "--gpu", "0", "-e", "--resume", trained / "checkpoint.pth.tar"],
                    code=0)
    assert any("--gpu 0: CUDA is not available" in line for line in err), err
    assert "Acc@3 " in out and "Acc@5" not in out  # 3 classes: top-5 is top-3


def test_resume_without_seed_keeps_the_recorded_seed(data, trained, tmp_path, capsys):
    run = tmp_path / trained.name
    shutil.copytree(trained, run)
    seed = torch.load(run / "checkpoint.pth.tar", weights_only=True)["seed"]
    main([data, *TINY, "-b", "8", "-j", "0", "--epochs", "2", "--ckpt", tmp_path,
          "--resume", run / "checkpoint.pth.tar"], code=0)
    assert json.loads((run / "args.json").read_text())["seed_used"] == seed
    assert torch.load(run / "checkpoint.pth.tar", weights_only=True)["seed"] == seed
    # A different --seed is another run: refused, not silently mixed.
    err = error([data, *TINY, "-j", "0", "--seed", str(seed + 1), "--epochs", "3",
                 "--resume", run / "checkpoint.pth.tar", "--ckpt", tmp_path / "other"])
    assert f"trained with seed {seed}" in err


def test_non_finite_validation_loss_stops_before_saving(data, trained, tmp_path, capsys, monkeypatch):
    run = tmp_path / trained.name
    shutil.copytree(trained, run)
    before = {n: (run / n).read_bytes() for n in ("checkpoint.pth.tar", "metrics.jsonl")}
    real = main_imagenet.TASK.evaluate

    def nan_loss(*a, **k):
        return dict(real(*a, **k), loss=float("nan"))
    monkeypatch.setattr(main_imagenet.TASK, "evaluate", nan_loss)
    err = error([data, *TINY, "-b", "8", "-j", "0", "--epochs", "2", "--ckpt", tmp_path,
                 "--resume", run / "checkpoint.pth.tar"])
    assert "validation loss is nan at epoch 2" in err and "last good checkpoint kept" in err
    assert {n: (run / n).read_bytes() for n in before} == before


def test_one_class_gets_a_warning(tmp_path, capsys):
    from utils.inputs.demo_data import make_demo_dataset
    one = make_demo_dataset(tmp_path / "one", classes=("disc",), train_per_class=4, val_per_class=2, sizes=(40, 40))
    out, _ = main([one, *TINY, "-b", "2", "-j", "0", "--epochs", "1", "--ckpt", tmp_path / "ck"], code=0)
    assert "warning: the data has 1 class" in out


@pytest.mark.parametrize("other_thread", [False, True])
def test_ctrl_c_during_a_save_finishes_the_file_then_interrupts(tmp_path, monkeypatch, other_thread):
    # other_thread: a live thread that does not block signals (torch and loaders start such threads);
    # the kernel may hand the process-directed signal to it rather than to the saving main thread.
    import threading
    from utils.lifecycle.checkpoint import save_atomic
    real_save = torch.save
    release = threading.Event()
    if other_thread:
        threading.Thread(target=release.wait, daemon=True).start()

    def save_and_get_interrupted(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of writing
        real_save(obj, f)
    monkeypatch.setattr(torch, "save", save_and_get_interrupted)
    # Python's own Ctrl-C handler, as in a terminal: a pytest started in the background (`make test &`,
    # some CI shells) inherits SIGINT ignored, and the save rightly leaves an ignored signal alone.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    path = tmp_path / "c.pth.tar"
    try:
        with pytest.raises(KeyboardInterrupt):
            save_atomic({"w": torch.arange(10)}, path)
    finally:
        signal.signal(signal.SIGINT, previous)
        release.set()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(10))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth.tar"]


def test_user_error_inside_cli_main_is_one_line(capsys):
    from utils import cli_main

    def boom():
        raise UserError("first line\nsecond line")
    with pytest.raises(SystemExit) as exc:
        cli_main(boom)
    assert exc.value.code == 1 and capsys.readouterr().err == "error: first line\n"
