"""What a checkpoint knows and what is done with it: fine-tuning from it (--pretrained), its class names
checked against the data, bare weights never written over it, a mid-epoch one resumed only with its -b,
a COCO config's default backbone used only when it is what the config means, and a rank's failure under
torchrun ending in its one error line."""
import shutil
import signal
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from conftest import ROOT, THREADS, assert_same_weights, make_tiny_data, reference_layouts, run_dir, seed
from test_recipes_optim import main_in_process, stop_inside_epoch_2

from networks import create_net
from utils import UserError


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A 1000-class ResNet-18 + SimAM in the authors' released layout: `module.` keys, `arch` only."""
    net = create_net("resnet18", "simam", num_classes=1000)
    sd = net.state_dict()
    assert [[k, list(v.shape)] for k, v in sd.items()] == reference_layouts()["imagenet"]["resnet18/simam"]["state_dict"]
    path = tmp_path_factory.mktemp("released") / "simam_r18.pth.tar"
    torch.save({"epoch": 90, "arch": "resnet18", "best_acc1": torch.tensor(71.3),
                "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    return path, sd


def test_pretrained_loads_everything_but_a_classifier_of_another_class_count(released):
    from utils.lifecycle.checkpoint import load_checkpoint, load_pretrained_weights
    path, sd = released
    for arch, head in (("resnet18", ["fc.weight", "fc.bias"]),):
        model = create_net(arch, "simam", num_classes=3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert load_pretrained_weights(model, load_checkpoint(path), path) == head
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k] if k in head else sd[k]), k
    same = create_net("resnet18", "simam", num_classes=1000)
    assert load_pretrained_weights(same, load_checkpoint(path), path) == []
    with pytest.raises(UserError, match="does not fit this model.*missing keys"):
        load_pretrained_weights(create_net("resnet18", "se", num_classes=3), load_checkpoint(path), path)


FT = ["-a", "resnet18", "--attention_type", "simam", "--train-crop-size", "32", "--val-resize-size", "36",
      "--val-crop-size", "32", "-p", "1", "-b", "3", "--epochs", "2", "--seed", str(seed(0))]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """18 training images: 6 batches of 3 an epoch (a SIGTERM after the fourth of epoch 2), 3 to validate."""
    return make_tiny_data(tmp_path_factory.mktemp("small") / "data", train_per_class=6, val_per_class=1)


def test_finetune_from_1000_classes_resumes_bit_exactly(released, small_data, tmp_path, capsys, one_thread):
    """--pretrained from the 1000-class released layout onto the 3-class data: the classifier is left out in
    one line; stopped by SIGTERM inside epoch 2 and resumed, the run ends with the weights of the run that was
    not stopped. The stopped checkpoint records the class names: a renamed class folder is refused at resume
    and at -e, and so is a resume with another -b inside the epoch."""
    path, _ = released
    tiny_data = small_data
    done, cut = tmp_path / "done", tmp_path / "cut"
    code, out, err = main_in_process([tiny_data, *FT, "-j", "0", "--ckpt", done, "--pretrained", path])
    assert code == 0, err[-3000:]
    n = len(create_net("resnet18", "simam", num_classes=3).state_dict())
    assert (f"=> weights from --pretrained {path}: {n - 2} of {n} tensors; not loaded: fc.weight, fc.bias "
            f"(1000 classes there, 3 here: trained from scratch)") in out

    cmd = [sys.executable, str(ROOT / "main_imagenet.py"), str(tiny_data), *FT, "-j", "0", "--ckpt", str(cut),
           "--pretrained", str(path)]
    code, out, err = stop_inside_epoch_2(cmd)
    assert code == 128 + signal.SIGTERM, (out[-2000:], err[-2000:])
    run = run_dir([tiny_data, *FT, "--ckpt", cut, "--pretrained", path])
    ck = run / "checkpoint.pth.tar"
    mid = torch.load(ck, weights_only=True)
    assert mid["epoch"] == 1 and mid["iteration"] >= 3 and mid["classes"] == ["disc", "h_stripes", "v_stripes"]

    b8 = [*FT[:FT.index("-b")], "-b", "8", *FT[FT.index("-b") + 2:]]
    code, _, err = main_in_process([tiny_data, *b8, "-j", "0", "--ckpt", cut, "--resume", ck])
    assert code == 1 and err.strip().splitlines() == [  # another -b is another recipe (utils.recipe)
        f"error: --resume {ck} continues a run of other settings: batch_size=8 (the run: 3); resume without them "
        f"(the run's own are used), or start a new run without --resume"]

    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_data, renamed)
    for split in ("train", "val"):
        (renamed / split / "disc").rename(renamed / split / "dots")  # same count, same order: labels would shift
    for argv in ([renamed, *FT, "-j", "0", "--ckpt", cut, "--resume", ck], [renamed, "-e", "--resume", ck, "-j", "0"]):
        code, _, err = main_in_process(argv)
        assert code == 1 and err.strip().splitlines() == [
            f"error: the classes of {renamed} differ from those {ck} was trained on: class 0 is 'dots' there, "
            f"'disc' in the checkpoint (a renamed class folder shifts the labels)"], err

    code, _, err = main_in_process([tiny_data, *FT, "-j", "0", "--ckpt", cut, "--resume", ck, "--pretrained", path])
    assert code == 0, err[-3000:]
    ref, got = (torch.load(run_dir([tiny_data, *FT, "--ckpt", r, "--pretrained", path]) / "checkpoint.pth.tar",
                           weights_only=True) for r in (done, cut))
    assert (got["epoch"], got["iteration"]) == (2, 0)
    assert_same_weights(ref, got, momentum=True)
    assert ref["metrics"] == [{**r, **{k: ref["metrics"][i][k] for k in ("epoch_time", "images_per_sec")}}
                              for i, r in enumerate(got["metrics"])]


def test_bad_pretrained_is_one_line(released, tiny_data, tmp_path, capsys):
    path, _ = released
    for flags, message in (
            (["-a", "resnet34", "--attention_type", "simam"],
             f"error: --pretrained: checkpoint {path} is for arch='resnet18', but this run has arch='resnet34'"),
            (["-a", "resnet18", "--attention_type", "se"],
             f"error: --pretrained: checkpoint {path} does not fit this model (another arch or attention type?)")):
        code, out, err = main_in_process([tiny_data, *flags, "-j", "0", "--ckpt", tmp_path, "--pretrained", path])
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith(message), lines


def test_save_weights_never_replaces_a_checkpoint(tiny_data, tmp_path, capsys):
    """--save_weights onto the --resume file itself, or onto any other training checkpoint: refused, the file
    untouched. Onto a new file it writes the weights, with arch and attention from the checkpoint."""
    net = create_net("resnet18", "se", num_classes=3)
    ours = {"epoch": 1, "iteration": 0, "arch": "resnet18", "attention_type": "se", "attention_param": 16.0,
            "state_dict": net.state_dict(), "optimizer": {}, "classes": ["disc", "h_stripes", "v_stripes"]}
    ck, other = tmp_path / "checkpoint.pth.tar", tmp_path / "other.pth.tar"
    torch.save(ours, ck)
    torch.save(ours, other)
    before = ck.read_bytes(), other.read_bytes()
    for target in (ck, other):
        code, _, err = main_in_process(["--resume", ck, "--save_weights", target])
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"error: --save_weights {target} is ")
    assert "the --resume checkpoint itself" in main_in_process(["--resume", ck, "--save_weights", ck])[2]
    assert (ck.read_bytes(), other.read_bytes()) == before
    code, out, err = main_in_process(["--resume", ck, "--save_weights", tmp_path / "w.pth"])
    assert code == 0, err
    saved = torch.load(tmp_path / "w.pth", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())


def coco_args(**kw):
    base = dict(arch="resnet18", attention_type="simam", attention_param=0.1,
                pretrained_backbone="checkpoints/imagenet-resnet50-simam-param0.1/model_best.pth.tar")
    return Namespace(**{**base, **kw})


def test_coco_config_backbone_is_used_only_when_it_is_a_finished_imagenet_run(tmp_path, monkeypatch):
    """A config's default backbone: a finished run of the config's arch and attention on 1000 classes, else
    one line naming what was found. (-a resnet18 stands for the configs' resnet50 here: a lighter model.)"""
    import main_coco
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "checkpoints" / "imagenet-resnet50-simam-param0.1"
    with pytest.raises(UserError, match=r"backbone checkpoints/.*model_best.pth.tar is not there: pass "
                                        r"--pretrained-backbone PATH \(a finished ImageNet resnet18 \+ simam"):
        main_coco.check_config_backbone(coco_args())
    run.mkdir(parents=True)

    def write(classes, epoch, epochs, arch="resnet18"):
        net = create_net("resnet18", "simam", 0.1, num_classes=classes)
        ck = {"epoch": epoch, "iteration": 0, "arch": arch, "attention_type": "simam", "attention_param": 0.1,
              "state_dict": net.state_dict(), "args": {"epochs": epochs}}
        torch.save(ck, run / "checkpoint.pth.tar")
        torch.save(ck, run / "model_best.pth.tar")

    write(10, 1, 1)  # the README's demo run
    with pytest.raises(UserError, match=r"is a 10-class model \(ImageNet's has 1000\): pass --pretrained-backbone"):
        main_coco.check_config_backbone(coco_args())
    write(1000, 1, 90, arch="resnet34")
    with pytest.raises(UserError, match=r"is arch='resnet34' \(the config has 'resnet18'\); from an unfinished run "
                                        r"\(at epoch 1/90\)"):
        main_coco.check_config_backbone(coco_args())
    write(1000, 90, 90)
    main_coco.check_config_backbone(coco_args())  # what the config means: used


def test_torchrun_failure_ends_in_the_ranks_one_line(tmp_path):
    """scripts/train.sh starts the ranks through scripts/torchrun_quiet.py: a rank's `error:` line is the last
    word (torchrun adds a ~30-line traceback), and the exit code is the rank's."""
    assert "scripts/torchrun_quiet.py" in (ROOT / "scripts" / "train.sh").read_text()
    rank = tmp_path / "rank.py"
    rank.write_text("import sys\nprint('error: something the trainer says', file=sys.stderr)\nsys.exit(1)\n")
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": THREADS}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "torchrun_quiet.py"), "--standalone",
                           "--nproc_per_node=1", str(rank)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == ["error: something the trainer says"], proc.stderr


def test_gradcam_takes_sizes_names_and_lambda_from_the_checkpoint(tmp_path, capsys):
    """scripts/gradcam.py: the run's validation sizes and class names from the checkpoint; a given lambda or
    crop that differs from the record is said in one line and used."""
    import importlib.util
    from PIL import Image
    from utils.reporting.models import load_model
    spec = importlib.util.spec_from_file_location("gradcam", ROOT / "scripts" / "gradcam.py")
    gradcam = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gradcam)
    names = ["disc", "h_stripes", "v_stripes"]
    path = tmp_path / "model_best.pth.tar"  # no args.json beside it: the checkpoint's own record
    torch.save({"epoch": 2, "arch": "resnet18", "attention_type": "simam", "attention_param": 0.1, "classes": names,
                "state_dict": create_net("resnet18", "simam", 0.1, num_classes=3).state_dict(),
                "args": {"val_resize_size": 36, "val_crop_size": 32, "data": str(tmp_path / "gone")}}, path)
    _, info = load_model(path)
    assert info["attention_param"] == 0.1 and gradcam.class_names(info) == names
    image = Image.new("RGB", (50, 40))
    assert gradcam.preprocess(info)[0](image).size == (32, 32)
    assert capsys.readouterr().err == ""
    assert gradcam.preprocess(info, crop=28)[0](image).size == (28, 28)
    assert capsys.readouterr().err.strip() == f"note: {path}: --crop 28 given; its run was validated with 32"
    _, info = load_model(path, attention_param=0.5)
    assert info["attention_param"] == 0.5
    assert capsys.readouterr().err.strip() == f"note: {path}: --attention_param 0.5 given; it was trained with 0.1"
