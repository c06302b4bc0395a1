"""Issue 18, data side: the recipe's augmentations (--auto-augment, --random-erase), repeated augmentation
(--ra-reps) and MixUp/CutMix (--mixup-alpha, --cutmix-alpha) against torchvision's definitions; every draw a
pure function of (seed, epoch, index); the defaults give exactly the pipeline they gave before. A run with every
recipe flag on, stopped by SIGTERM and resumed, is tested in test_recipes_optim.py."""
import math
import random

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from conftest import TINY, make_tiny_data, run_dir, seed
from utils.inputs.cifar import CIFAR_MEAN, CIFAR_STD, DeviceLoader, Split, epoch_draws, normalize, random_crop_flip
from utils.inputs.data import (EpochLoader, RASampler, SafeImageFolder, SampleAugment, TrainTransform, _splitmix64,
                               auto_augment_policy, collate_skipping, epoch_batches, normalize_uint8, rrc_params,
                               sample_seed)
from utils.engine import _topk_correct
from utils.mixing import BatchMix


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _image(seed=0, size=(3, 48, 56)):
    return torch.randint(0, 256, size, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _crop_flip(img, seed, size=32):
    """The paper recipe's TrainTransform, composed from its steps as they were before the recipe flags."""
    rng = random.Random(seed)
    top, left, h, w = rrc_params(img.shape[1], img.shape[2], rng)
    out = F.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    return (F.horizontal_flip(out) if rng.random() < 0.5 else out).contiguous()


def _library(seed, fn, *inputs):
    """fn(*inputs) with torch's CPU generator in the state SampleAugment seeds from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(_splitmix64(seed) >> 1)
        return fn(*inputs)


# ---- the paper recipe does not move --------------------------------------------------------------

def test_defaults_are_the_previous_pipeline():
    img = _image()
    tf = TrainTransform(32)
    assert not tf.augment
    for s in (0, 1, sample_seed(7, 3, 11)):
        out = tf(img, s)
        assert out.dtype == torch.uint8 and torch.equal(out, _crop_flip(img, s))
    # The training order: DistributedSampler's, one sample_seed per index, as before.
    sampler = DistributedSampler(range(50), num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=False)
    loader = EpochLoader(list(range(50)), 4, 0, 3, rank=1, world_size=2)
    assert isinstance(loader.sampler, DistributedSampler)
    sampler.set_epoch(2)
    order = list(sampler)
    want = [[(i, sample_seed(3, 2, i)) for i in order[b:b + 4]] for b in range(0, len(order) - len(order) % 4, 4)]
    assert epoch_batches(loader.sampler, 4, True, 3, 2) == want


def test_cifar_defaults_are_the_previous_pipeline():
    split = Split(torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (37,)))
    loader = DeviceLoader(split, 8, seed=5, rank=0, world_size=2, train=True)
    order, offsets, flips = epoch_draws(37, 5, 1)
    idx = order[0::2][:37 // 2]
    mean, std = (torch.tensor(v)[:, None, None] for v in (CIFAR_MEAN, CIFAR_STD))
    got = list(loader(1))
    assert len(got) == len(loader) == 3  # 18 images: 8 + 8 + 2
    for k, (x, y) in enumerate(got):
        i = idx[k * 8:(k + 1) * 8]
        assert torch.equal(x, normalize(random_crop_flip(split.images[i], offsets[i], flips[i]), mean, std))
        assert torch.equal(y, split.labels[i])


# ---- --auto-augment and --random-erase -------------------------------------------------------------

@pytest.mark.parametrize("policy", ["ta_wide", "ra", "augmix", "imagenet", "cifar10"])
def test_policy_is_the_library_transform_after_crop_and_flip(policy):
    img = _image(1)
    tf = TrainTransform(32, auto_augment=policy, ra_magnitude=7, augmix_severity=2)
    bl = v2.InterpolationMode.BILINEAR  # the classification reference's default --interpolation
    lib = {"ta_wide": v2.TrivialAugmentWide(interpolation=bl), "ra": v2.RandAugment(magnitude=7, interpolation=bl),
           "augmix": v2.AugMix(severity=2, interpolation=bl),
           "imagenet": v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=bl),
           "cifar10": v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, interpolation=bl)}[policy]
    assert type(auto_augment_policy(policy)) is type(lib)
    state = torch.get_rng_state()
    outs = [tf(img, s) for s in range(6)]
    assert torch.equal(torch.get_rng_state(), state)  # the global generator did not move
    for s, out in enumerate(outs):
        assert out.dtype == torch.uint8 and torch.equal(out, _library(s, lib, _crop_flip(img, s)))
        assert torch.equal(out, tf(img, s))
    assert any(not torch.equal(out, _crop_flip(img, s)) for s, out in enumerate(outs))  # the policy acts


def test_random_erase_is_torchvisions_on_the_normalized_image():
    img = _image(2)
    tf = TrainTransform(32, auto_augment="ta_wide", random_erase=1.0)
    erased = 0
    for s in range(5):
        out = tf(img, s)

        def reference(x):  # the reference's order: policy, ToTensor + Normalize, RandomErasing(value=0)
            x = v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR)(x)
            return v2.RandomErasing(p=1.0, value=0)(normalize_uint8(x[None])[0])
        want = _library(s, reference, _crop_flip(img, s))
        assert out.dtype == torch.float32 and torch.equal(out, want)
        erased += int((out == 0).all(dim=0).sum())
    assert erased > 0  # value 0 on the normalized image: the mean colour
    # p = 0.5: some samples erased, some not; the policy-free output is the normalized crop where unerased.
    tf = TrainTransform(32, random_erase=0.5)
    outs = [tf(img, s) for s in range(12)]
    same = [torch.equal(o, normalize_uint8(_crop_flip(img, s)[None])[0]) for s, o in enumerate(outs)]
    assert 0 < sum(same) < len(same)


@pytest.mark.parametrize("workers", [0, 2])
def test_augmentation_is_a_function_of_seed_epoch_index(tiny_data, workers):
    ds = SafeImageFolder(tiny_data / "train", TrainTransform(32, auto_augment="ta_wide", random_erase=0.5))
    loader = EpochLoader(ds, 4, workers, seed=11, collate_fn=collate_skipping, ra_reps=1)

    def epoch(e, start=0):
        return [(x.clone(), y.clone()) for x, y, _ in loader(e, start)]
    first = epoch(1)
    order = [i for b in epoch_batches(loader.sampler, 4, True, 11, 1) for i, _ in b]
    flat = torch.cat([x for x, _ in first])
    for pos, i in enumerate(order):  # each sample: its own image through the transform with its own seed
        assert torch.equal(flat[pos], ds.transform(ds.loader(ds.samples[i][0]), sample_seed(11, 1, i)))
    assert len({flat[p].numpy().tobytes() for p in range(len(order))}) == len(order)
    resumed = epoch(1, start=2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first[2:], resumed))
    assert not torch.equal(torch.cat([x for x, _ in epoch(2)]), flat)


# ---- --ra-reps ---------------------------------------------------------------------------------------

def _torchvision_rasampler(n, num_replicas, rank, seed, epoch, reps):
    """torchvision references/classification/sampler.py RASampler, as its definition reads."""
    num_samples = int(math.ceil(n * float(reps) / num_replicas))
    total_size = num_samples * num_replicas
    num_selected = int(math.floor(n // 256 * 256 / num_replicas))
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    indices = torch.randperm(n, generator=g).tolist()
    indices = [ele for ele in indices for _ in range(reps)]
    indices += indices[:(total_size - len(indices))]
    assert len(indices) == total_size
    indices = indices[rank:total_size:num_replicas]
    assert len(indices) == num_samples
    return indices[:num_selected], indices, num_selected


@pytest.mark.parametrize("n,reps,world", [(600, 3, 1), (600, 4, 4), (1000, 3, 2), (513, 2, 3), (300, 4, 8)])
def test_ra_sampler_is_torchvisions(n, reps, world):
    full = []
    for rank in range(world):
        s = RASampler(n, world, rank, seed=5, repetitions=reps)
        s.set_epoch(3)
        want, unselected, count = _torchvision_rasampler(n, world, rank, 5, 3, reps)
        assert list(s) == want and len(s) == count == n // 256 * 256 // world
        full += unselected
    counts = torch.bincount(torch.tensor(full), minlength=n)
    assert counts.min() >= reps and counts.sum() == math.ceil(n * reps / world) * world  # N copies (+ wrap padding)
    # epoch_batches: each copy seeded on its own; copy 0 as without repetition; every rank's list differs by epoch.
    s = RASampler(n, world, 0, seed=5, repetitions=reps)
    batches = epoch_batches(s, 8, True, 5, 3)
    pairs = s.draws()
    assert [i for b in batches for i, _ in b] == [i for i, _ in pairs][:len(pairs) - len(pairs) % 8]
    assert [sd for b in batches for _, sd in b] == [sample_seed(5, 3, i + r * n) for i, r in pairs][:len(batches) * 8]
    assert epoch_batches(s, 8, True, 5, 4) != batches


def test_ra_sampler_in_the_loaders():
    loader = EpochLoader(list(range(600)), 4, 0, seed=1, rank=1, world_size=2, ra_reps=3)
    assert isinstance(loader.sampler, RASampler) and len(loader) == 512 // 2 // 4
    loader(2, start_batch=5)  # a mid-epoch resume: the same batches, the first five sliced off
    full = epoch_batches(RASampler(600, 2, 1, 1, 3), 4, True, 1, 2)
    assert loader.batches.batches == full[5:] and len(full) == len(loader)
    assert [i for b in full for i, _ in b] == _torchvision_rasampler(600, 2, 1, 1, 2, 3)[0]
    split = Split(torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (300,)))
    cifar = DeviceLoader(split, 32, seed=2, train=True, ra_reps=4, augment=SampleAugment("cifar10"))
    assert len(cifar) == 256 // 32
    keys = cifar.keys(1)
    r = RASampler(300, 1, 0, 2, 4)
    r.set_epoch(1)
    want = [i + rep * 300 for i, rep in r.draws()]
    assert keys.tolist() == want and (keys % 300).tolist() == _torchvision_rasampler(300, 1, 0, 2, 1, 4)[0]
    full = [(x.clone(), y.clone()) for x, y in cifar(1)]
    tail = list(cifar(1, start_batch=3))
    assert len(tail) == len(full) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[3:], tail))
    x = torch.cat([b[0] for b in full])
    # Copies of one image in the epoch are augmented apart (the crop, flip and policy see different keys).
    first = keys[:4]
    assert len(set((first % 300).tolist())) == 1 and len({x[k].numpy().tobytes() for k in range(4)}) > 1


# ---- --mixup-alpha / --cutmix-alpha -----------------------------------------------------------------

@pytest.mark.parametrize("mixup,cutmix", [(0.2, 1.0), (0.4, 0.0), (0.0, 1.0)])
def test_mix_targets_sum_to_one_and_equal_the_library(mixup, cutmix):
    g = torch.Generator().manual_seed(0)
    images, target = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)
    mix = BatchMix(5, mixup, cutmix, seed=3, rank=1)
    library = v2.RandomChoice(([v2.MixUp(alpha=mixup, num_classes=5)] if mixup else [])
                              + ([v2.CutMix(alpha=cutmix, num_classes=5)] if cutmix else []))
    seen = set()
    for epoch, it in [(e, i) for e in range(3) for i in range(4)]:
        state = torch.get_rng_state()
        x, y = mix(images, target, epoch, it)
        assert torch.equal(torch.get_rng_state(), state)  # nothing else's draws move
        assert y.shape == (8, 5) and torch.allclose(y.sum(1), torch.ones(8))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mix.seed_of(epoch, it))
            want_x, want_y = library(images, target)
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
        x2, y2 = mix(images, target, epoch, it)  # a resume draws the same
        assert torch.equal(x, x2) and torch.equal(y, y2)
        # CutMix pastes pixels of the rolled batch; MixUp is lam * x + (1 - lam) * x.roll(1) everywhere,
        # lam read off the target of a sample whose neighbour has another class.
        if bool(((x == images) | (x == images.roll(1, 0))).all()):
            seen.add("cutmix")
        else:
            seen.add("mixup")
            j = int((target != target.roll(1, 0)).nonzero()[0])
            lam = float(y[j, target[j]])
            assert torch.allclose(x, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-5)
    assert seen == {k for k, a in (("mixup", mixup), ("cutmix", cutmix)) if a > 0}
    assert BatchMix(5, mixup, cutmix, seed=3, rank=0).seed_of(2, 7) != mix.seed_of(2, 7)  # ranks draw apart


def test_label_smoothing_with_probability_targets_and_train_accuracy():
    g = torch.Generator().manual_seed(1)
    logits, soft = torch.randn(6, 4, generator=g), torch.softmax(torch.randn(6, 4, generator=g), 1)
    eps = 0.1
    want = -(((1 - eps) * soft + eps / 4) * torch.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(nn.CrossEntropyLoss(label_smoothing=eps)(logits, soft), want)
    assert _topk_correct(logits, soft, (1,))[0] == (logits.argmax(1) == soft.argmax(1)).sum()


# ---- end to end ----------------------------------------------------------------------------------------

def test_runtime_refusals(tmp_path, capsys):
    import main_imagenet
    one = make_tiny_data(tmp_path / "one", train_per_class=2, val_per_class=1)
    for c in ("v_stripes", "disc"):  # leave one class
        for split in ("train", "val"):
            for f in (one / split / c).iterdir():
                f.unlink()
            (one / split / c).rmdir()
    for argv, msg in (([one, "--cutmix-alpha", "1"], "--cutmix-alpha mixes the targets of two classes"),
                      ([one, "--data-backend", "dali", "--random-erase", "0.1"],
                       "--random-erase is not implemented for --data-backend dali")):
        with pytest.raises(SystemExit) as exc:
            main_imagenet.main([str(a) for a in [*argv, *TINY, "-b", "2", "-j", "0", "--epochs", "1",
                                                 "--ckpt", tmp_path / "ck"]])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert exc.value.code == 1 and len(lines) == 1 and msg in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "ck").exists()  # refused before a run folder was made


def test_cifar_trains_with_the_data_recipe(tmp_path, capsys):
    import main_cifar
    from test_cifar_train import write_cifar
    write_cifar(tmp_path / "data", "cifar10", n_train=260, n_test=20)
    argv = ["--dataset", "cifar10", "--dataset_dir", str(tmp_path / "data"), "-a", "resnet20", "-b", "64",
            "--seed", str(seed(0)), "--epochs", "1", "--ckpt", str(tmp_path / "ck"), "--test_batch_size", "20",
            "-p", "1", "--auto-augment", "cifar10", "--random-erase", "0.5", "--ra-reps", "2",
            "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0"]
    with pytest.raises(SystemExit) as exc:
        main_cifar.main(argv)
        raise SystemExit(0)
    out = capsys.readouterr().out
    assert exc.value.code == 0, out[-2000:]
    assert "Epoch: [1][3/4]" in out  # RASampler: 260 images -> 256 an epoch, 4 batches of 64
    ck = torch.load(run_dir(argv, script="main_cifar.py") / "checkpoint.pth.tar", weights_only=True)
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
