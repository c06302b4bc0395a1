"""The training parts in-process: schedules, samplers, the loop, checkpoints, configs, argument errors."""
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DistributedSampler

import main_imagenet
from conftest import ROOT, TINY, make_tiny_data, seed
from networks import create_net
from utils import UserError
from utils.args import get_args_parser, parse_args
from utils.recipe import run_name
from utils.lifecycle.checkpoint import load_checkpoint, load_model_weights, rng_state, save_atomic, set_rng_state
from utils.inputs.data import EpochLoader, SafeImageFolder, ShardSampler, collate_skipping, imagenet_transforms
from utils.engine import NonFiniteLossError, evaluate, train_one_epoch
from utils.schedule import lr_at


# ---- schedules -------------------------------------------------------------------------------

@pytest.mark.parametrize("epoch,expected", [(0, 0.1), (29, 0.1), (30, 0.01), (59, 0.01), (60, 1e-3), (99, 1e-4)])
def test_step_schedule_is_x01_every_30_epochs(epoch, expected):
    for it in (0, 17, 99):
        assert lr_at(epoch, it, 100, 0.1, 100) == pytest.approx(expected)


def test_cifar_milestones():
    lrs = [lr_at(e, 0, 10, 0.1, 164, milestones=(81, 122)) for e in (80, 81, 121, 122)]
    assert lrs == pytest.approx([0.1, 0.01, 0.01, 0.001])


def test_cosine_is_per_iteration_and_reaches_zero():
    assert lr_at(0, 0, 100, 0.05, 150, cos=True) == 0.05
    assert lr_at(75, 0, 100, 0.05, 150, cos=True) == pytest.approx(0.025)
    assert lr_at(149, 99, 100, 0.05, 150, cos=True) == pytest.approx(0.05 * (1 + math.cos(math.pi * 149.99 / 150)) / 2)
    assert lr_at(10, 30, 100, 0.05, 150, cos=True) < lr_at(10, 29, 100, 0.05, 150, cos=True)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_reference_cosine_shift_matches_its_scheduler_calls():
    """The reference called CosineAnnealingLR.step() before training each epoch."""
    epochs = 12
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for e in range(epochs):
        sched.step()
        for it in (0, 5):
            assert lr_at(e, it, 10, 0.05, epochs, cos=True, ref_shift=True) == pytest.approx(opt.param_groups[0]["lr"])


def test_warmup_ramps_linearly_into_the_schedule():
    lrs = [lr_at(e, it, 10, 0.1, 90, warmup_epochs=2) for e in range(3) for it in range(10)]
    assert lrs[0] == pytest.approx(0.1 / 20) and lrs[9] == pytest.approx(0.1 * 10 / 20)
    assert lrs[19] == pytest.approx(0.1) and lrs[20:] == pytest.approx([0.1] * 10)
    assert all(a < b for a, b in zip(lrs[:19], lrs[1:20]))


# ---- samplers and loaders --------------------------------------------------------------------

@pytest.mark.parametrize("n,world", [(7, 2), (10, 3), (2, 4), (1000, 8)])
def test_shard_sampler_covers_every_index_exactly_once(n, world):
    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    # DistributedSampler pads with duplicates, which is why validation does not use it.
    padded = [list(DistributedSampler(range(n), world, r, shuffle=False)) for r in range(world)]
    assert sum(map(len, padded)) == math.ceil(n / world) * world


def test_training_order_and_augmentation_depend_only_on_seed_and_epoch(tiny_data):
    train_tf, _ = imagenet_transforms(32, 36, 32)
    ds = SafeImageFolder(tiny_data / "train", train_tf)

    def epoch_batches(epoch, seed):
        loader = EpochLoader(ds, 8, 2, seed, collate_fn=collate_skipping)
        return [b[0] for b in loader(epoch)]

    a, b = epoch_batches(1, seed=5), epoch_batches(1, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], epoch_batches(2, seed=5)[0])
    assert not torch.equal(a[0], epoch_batches(1, seed=6)[0])


def test_a_resumed_epoch_starts_at_its_batch_without_loading_the_others(tiny_data):
    """loader(epoch, start_batch=k): the uninterrupted epoch's batches k, k+1, ... (same samples in
    the same order), and the first k batches are never read."""
    _, val_tf = imagenet_transforms(32, 36, 32)
    ds = SafeImageFolder(tiny_data / "train", val_tf)  # no random augmentation: whole batches compare
    loader = EpochLoader(ds, 4, 0, seed=5, collate_fn=collate_skipping)
    full = list(loader(3))
    read = []
    ds.loader = lambda path, real=ds.loader: read.append(path) or real(path)
    rest = list(loader(3, start_batch=2))
    assert len(loader) == len(full) == 6 and len(rest) == 4 and len(read) == 16
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(rest, full[2:]))


# ---- the loop --------------------------------------------------------------------------------

def test_an_epoch_is_plain_sgd_steps_and_reports_their_mean_loss(tiny_data, one_thread):
    """train_one_epoch against the same steps written out by hand on a copy of the model (same
    batches, same lr): equal weights bit for bit and the mean loss of its steps, whatever they are."""
    import copy
    from torch.nn import functional as F
    from utils.engine import _unpack
    torch.manual_seed(seed(0))
    _, val_tf = imagenet_transforms(32, 36, 32)
    ds = SafeImageFolder(tiny_data / "train", val_tf)
    loader = EpochLoader(ds, 8, 0, seed=seed(0), collate_fn=collate_skipping)
    model = create_net("resnet18", "simam", 0.1, num_classes=3)
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    lr_fn = lambda e, i: 0.01 / (1 + e + i)  # noqa: E731  (a different lr every step)
    cpu = torch.device("cpu")
    for e in range(2):
        got = train_one_epoch(model, loader(e), torch.nn.CrossEntropyLoss(), opt, lr_fn, e, cpu)
        twin.train()
        losses = []
        for i, batch in enumerate(loader(e)):
            images, target, _ = _unpack(batch, cpu, False)
            twin_opt.param_groups[0]["lr"] = lr_fn(e, i)
            loss = F.cross_entropy(twin(images), target)
            twin_opt.zero_grad()
            loss.backward()
            twin_opt.step()
            losses.append(loss.item() * len(target))
        assert got["images"] == len(ds) == 24 and len(losses) == 3
        assert math.isclose(got["loss"], sum(losses) / 24, rel_tol=1e-12)
        for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
            assert torch.equal(a, b)
    val = evaluate(model, EpochLoader(ds, 5, 0, 0, train=False, collate_fn=collate_skipping)(), "cpu")
    assert val["count"] == len(ds) == 24 and math.isfinite(val["loss"])


def test_evaluation_of_a_float64_model_stays_float64():
    """Logits are cast to float32 only when autocast made them half; float64 ones keep their digits."""
    from torch.nn import functional as F
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7)).double()
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64) * 30  # large logits: float32 would lose ~1e-7
    y = torch.randint(0, 7, (6,))
    val = evaluate(model, [(x[:4], y[:4]), (x[4:], y[4:])], torch.device("cpu"))
    with torch.no_grad():
        want = F.cross_entropy(model(x), y).item()
    assert math.isclose(val["loss"], want, rel_tol=1e-14), (val["loss"], want)


def test_non_finite_loss_raises():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    data = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0]))]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match="loss is nan"):
        train_one_epoch(model, data, torch.nn.CrossEntropyLoss(), opt, lambda e, i: 0.1, 0, torch.device("cpu"))


# ---- checkpoints -----------------------------------------------------------------------------

WRITER = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from utils.lifecycle.checkpoint import save_atomic
for i in range(1, 10**6):
    print("writing", i, flush=True)
    save_atomic({"i": i, "w": torch.full((3_000_000,), float(i))}, sys.argv[1])
"""


def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    for delay in (0.0, 0.004, 0.011):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(ROOT)], stdout=subprocess.PIPE, text=True)
        while proc.stdout.readline().split() != ["writing", "3"]:
            pass
        time.sleep(delay)  # somewhere inside writing checkpoint 3 (each takes tens of ms)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ck = torch.load(path, weights_only=True)
        assert ck["i"] >= 2 and torch.equal(ck["w"], torch.full((3_000_000,), float(ck["i"])))


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(3)
    save_atomic({"rng": rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert __import__("random").random() == expected[1] and __import__("numpy").random.rand() == expected[2]


def test_weights_of_another_attention_are_refused_with_the_difference_named():
    sd = create_net("resnet18", "se", num_classes=3).state_dict()
    with pytest.raises(UserError, match=r"does not fit .*missing keys \(e.g. layer1.0.conv2.0.weight\)"):
        load_model_weights(create_net("resnet18", "simam", num_classes=3), {"state_dict": sd}, "x.pth")


def test_run_name_follows_the_reference():
    assert run_name("imagenet", "resnet50", "simam", 0.1, None) == "imagenet-resnet50-simam-param0.1"
    assert run_name("imagenet", "resnet18", "se", 16, 0) == "imagenet-resnet18-se-param16.0-seed0"
    assert run_name("imagenet", "mobilenet_v2", "none", None, 3) == "imagenet-mobilenet_v2-seed3"


# ---- configs and argument errors ---------------------------------------------------------------

def test_config_values_are_defaults_and_flags_override(tmp_path):
    cfg = tmp_path / "r50.toml"
    cfg.write_text('arch = "resnet50"\nattention_type = "simam"\nattention_param = 0.1\nepochs = 100\n'
                   'batch_size = 256\ncos_lr = true\nweight_decay = 4e-5\n')
    args = parse_args(get_args_parser(), ["--config", str(cfg), "--epochs", "3"])
    assert (args.arch, args.attention_type, args.attention_param, args.epochs) == ("resnet50", "simam", 0.1, 3)
    assert args.cos_lr is True and args.weight_decay == 4e-5 and args.batch_size == 256


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main_imagenet.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code != 0 and len(err) == 1, err
    return err[0]


def test_bad_arguments_give_one_clear_line(tiny_data, tmp_path, capsys):
    empty = make_tiny_data(tmp_path / "data", train_per_class=2, val_per_class=1)
    for f in (empty / "train" / "disc").iterdir():
        f.unlink()
    cfg = tmp_path / "bad.toml"
    cfg.write_text('arch = "resnet18"\nbogus_key = 1\n')
    cases = [
        ([tmp_path / "none"], "data folder not found"),
        ([tmp_path], "data folder not found: " + str(tmp_path / "val")),
        ([empty], f"class folder has no images: {empty / 'train' / 'disc'}"),
        ([tiny_data, "--resume", tmp_path / "missing.pth"], "--resume checkpoint not found"),
        ([tiny_data, "-a", "resnet19"], "unknown arch 'resnet19'"),
        ([tiny_data, "--attention_type", "nope"], "unknown attention type 'nope'"),
        ([tiny_data, "--config", cfg], "unknown key 'bogus_key'"),
        ([tiny_data, "-e"], "-e needs --resume"),
        ([tiny_data, "--amp", "fp8"], "invalid choice: 'fp8'"),
        ([tiny_data, "--epochs", "ten"], "invalid int value: 'ten'"),
    ]
    for argv, expected in cases:
        assert expected in run_main(TINY + argv, capsys), argv


def test_gpu_ids_follow_the_reference_syntax():
    from utils.args import parse_gpu_ids
    assert parse_gpu_ids("0,1,2,3") == [0, 1, 2, 3] and parse_gpu_ids("1") == [1]
    assert parse_gpu_ids("-1") == [] and parse_gpu_ids(None) is None
    with pytest.raises(UserError, match="--gpu expects"):
        parse_gpu_ids("cuda:0")


def test_checkpoint_identity_names_the_differing_setting():
    from utils.lifecycle.checkpoint import check_identity
    ours = {"arch": "resnet50", "attention_type": "simam", "attention_param": 0.1}
    check_identity(ours, "c.pth", "resnet50", "simam", 0.1)
    check_identity({"arch": "resnet50"}, "ref.pth", "resnet50", "simam", 0.1)  # reference: arch only
    with pytest.raises(UserError, match="attention_param=0.1, but this run has attention_param=0.0001"):
        check_identity(ours, "c.pth", "resnet50", "simam", 1e-4)
    with pytest.raises(UserError, match="arch='resnet50', but this run has arch='resnet101'"):
        check_identity(ours, "c.pth", "resnet101", "simam", 0.1)
