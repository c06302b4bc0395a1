"""The uint8 input pipeline (utils/inputs/data.py): equivalence with the previous float path, the crop
distribution against torchvision's RandomResizedCrop, per-sample seeding and mid-epoch starts,
unreadable images, and the move to the device (engine._unpack)."""
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from utils.inputs.data import (IMAGENET_MEAN, IMAGENET_STD, UNREADABLE, EpochLoader, SafeImageFolder, TrainTransform,
                               ValTransform, collate_skipping, normalize_uint8, pil_loader, reference_transforms,
                               rrc_params, sample_seed, tensor_loader)
from utils.engine import _unpack, evaluate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision.io's decoders


def photo_like(path, h=75, w=100, seed=0, **save):
    """A smooth random image (JPEG-friendly, like a photo) saved at `path`."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    img.save(path, **save)
    return path


# ---- outputs against the previous path -------------------------------------------------------

def test_tensor_path_matches_the_pil_path_for_the_same_crop(tmp_path):
    """decode_jpeg + v2 on uint8 vs PIL decode + crop/resize + ToTensor: within 1/255 after resizing;
    the pil backend is the old path exactly; on-device normalization equals ToTensor + Normalize."""
    path = photo_like(tmp_path / "a.JPEG", 150, 200, quality=90)
    pil, t = pil_loader(path), tensor_loader(path)
    assert t.dtype == torch.uint8 and t.shape == (3, 150, 200)
    old_normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    tf = TrainTransform(64)
    for seed in range(6):
        (top, left, h, w), flip = tf.params(150, 200, seed)
        old = TF.resized_crop(pil, top, left, h, w, [64, 64], antialias=True)
        if flip:
            old = TF.hflip(old)
        old = TF.to_tensor(old)  # float in [0, 1], the previous path before Normalize
        new = tf(t, seed)
        assert new.dtype == torch.uint8 and new.shape == (3, 64, 64)
        assert (new.float() / 255 - old).abs().max() <= 1 / 255 + 1e-7
        assert torch.equal(tf(pil, seed).float() / 255, old)  # pil backend: identical pixels
        # uint8 -> device normalization: bit-identical to the CPU's ToTensor + Normalize of those pixels
        ref = old_normalize(TF.to_tensor(TF.to_pil_image(new)))
        got = normalize_uint8(new[None])[0]
        assert torch.equal(got, ref)
        assert torch.equal(normalize_uint8(new[None], torch.bfloat16)[0], ref.to(torch.bfloat16))
    v_old = reference_transforms(64, 72, 64)[1](pil)
    v_new = ValTransform(72, 64)(t)
    assert v_new.shape == (3, 64, 64)
    assert (normalize_uint8(v_new[None])[0] - v_old).abs().max() <= (1 / 255) / min(IMAGENET_STD) + 1e-6


def test_decoder_falls_back_to_pil_for_non_jpeg_and_grayscale(tmp_path):
    png = photo_like(tmp_path / "png_named.JPEG", format="PNG")
    gray = tmp_path / "gray.JPEG"
    Image.open(photo_like(tmp_path / "c.JPEG")).convert("L").save(gray)
    for p in (png, gray):
        t = tensor_loader(p)
        assert t.shape == (3, 75, 100)
        assert torch.equal(t, TF.pil_to_tensor(pil_loader(p)))
    (tmp_path / "junk.JPEG").write_bytes(b"not an image")
    with pytest.raises(Exception):
        tensor_loader(tmp_path / "junk.JPEG")


# ---- crop distribution -----------------------------------------------------------------------

def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b)).max()


def ks_critical(n, m, alpha=1e-3):
    return math.sqrt(-0.5 * math.log(alpha / 2)) * math.sqrt((n + m) / (n * m))


def crop_features(params, height, width):
    """Per crop: area fraction, log aspect, and the relative positions of the window."""
    p = np.array(params, dtype=float)
    top, left, h, w = p.T
    return {"scale": h * w / (height * width), "log_ratio": np.log(w / h),
            "top": (top + 0.5) / (height - h + 1), "left": (left + 0.5) / (width - w + 1)}


@pytest.mark.parametrize("height,width", [(375, 500), (500, 333), (60, 1000)])  # last: often the fallback
def test_crop_distribution_matches_torchvision_random_resized_crop(height, width):
    n = 4000
    ours = [rrc_params(height, width, random.Random(sample_seed(0, 0, i))) for i in range(n)]
    torch.manual_seed(0)
    img = torch.empty(1, height, width)
    theirs = [transforms.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]
    a, b = crop_features(ours, height, width), crop_features(theirs, height, width)
    crit = ks_critical(n, n)
    for key in a:
        assert ks_statistic(a[key], b[key]) < crit, key
    # The same statistic rejects a nearby wrong distribution (scale 0.2-1), so the test can fail.
    wrong = [rrc_params(height, width, random.Random(i), scale=(0.2, 1.0)) for i in range(n)]
    if height == 375:
        assert ks_statistic(crop_features(wrong, height, width)["scale"], b["scale"]) > crit


def test_flips_are_fair_and_seeds_unrelated():
    flips = [TrainTransform(8).params(100, 100, sample_seed(3, 1, i))[1] for i in range(4000)]
    assert abs(sum(flips) / 4000 - 0.5) < 4 * 0.5 / math.sqrt(4000)
    assert len({sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(300)}) == 2700


# ---- seeding and mid-epoch starts ------------------------------------------------------------

class CountingFolder(SafeImageFolder):
    calls = 0

    def __getitem__(self, index):
        type(self).calls += 1
        return super().__getitem__(index)


@pytest.mark.parametrize("workers", [0, 2])
def test_start_batch_gives_the_tail_of_an_uninterrupted_epoch(tiny_data, workers):
    ds = CountingFolder(tiny_data / "train", TrainTransform(16))
    full = list(EpochLoader(ds, 5, workers, seed=7, collate_fn=collate_skipping)(2))
    assert len(full) == 24 // 5
    for k in (1, 3):
        CountingFolder.calls = 0
        resumed = EpochLoader(ds, 5, workers, seed=7, collate_fn=collate_skipping)  # a fresh process's loader
        assert len(resumed) == len(full)
        tail = list(resumed(2, start_batch=k))
        assert len(tail) == len(full) - k
        for x, y in zip(tail, full[k:]):
            assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
        if workers == 0:  # the first k batches were not loaded
            assert CountingFolder.calls == (len(full) - k) * 5
    # The same images whatever -j or the process: each is a function of (seed, epoch, index) only.
    sampler = EpochLoader(ds, 5, 0, seed=7).sampler
    sampler.set_epoch(2)
    first = next(iter(sampler))
    assert torch.equal(full[0][0][0], ds[(first, sample_seed(7, 2, first))][0])
    other = list(EpochLoader(ds, 5, 0, seed=7, collate_fn=collate_skipping)(3))
    assert not torch.equal(other[0][0], full[0][0])


def test_sample_images_do_not_depend_on_the_number_of_processes(tiny_data):
    ds = SafeImageFolder(tiny_data / "train", TrainTransform(16))

    def by_index(world):
        seen = {}
        for rank in range(world):
            for images, _, _ in EpochLoader(ds, 2, 0, seed=1, rank=rank, world_size=world, collate_fn=collate_skipping)(0):
                seen.update({img.sum().item(): img for img in images})
        return seen

    one, two = by_index(1), by_index(2)
    common = set(one) & set(two)
    assert len(common) >= 12 and all(torch.equal(one[k], two[k]) for k in common)


def test_sampler_order_is_the_distributed_samplers_own():
    """utils.inputs.data.sampler_order (numpy) yields what DistributedSampler yields, for every size,
    rank count (padding repeated once or several times, or cut), rank, epoch and seed."""
    from torch.utils.data import DistributedSampler

    from conftest import seed
    from utils.inputs.data import sampler_order
    for n in (1, 2, 3, 7, 64, 1001):
        for world in (1, 2, 3, 8):
            for rank in range(world):
                for shuffle, drop_last in ((True, False), (True, True), (False, False)):
                    s = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle,
                                           seed=seed(n), drop_last=drop_last)
                    for epoch in (0, 3):
                        s.set_epoch(epoch)
                        got = sampler_order(s)
                        assert got.dtype == np.int64 and got.tolist() == list(s), (n, world, rank, shuffle, drop_last)


# ---- unreadable images -----------------------------------------------------------------------

def test_validation_evaluates_each_readable_image_once_and_counts_files(tmp_path):
    from conftest import make_tiny_data
    data = make_tiny_data(tmp_path / "data", train_per_class=4, val_per_class=3)
    files = sorted((data / "val").rglob("*.JPEG"))
    for f in files[1:3]:  # two unreadable files in a row
        f.write_bytes(b"junk")
    val = SafeImageFolder(data / "val", ValTransform(36, 32), evaluate_once=True)
    items = [val[i] for i in range(len(val))]
    assert [it[1] == UNREADABLE for it in items] == [False, True, True] + [False] * 6
    assert [p for it in items for p in it[2]] == [str(f) for f in files[1:3]]  # each bad file once

    class Ident(torch.nn.Module):  # logits: the class of each image's mean red level, to count hits
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 3).float() + 0 * x.mean()

    for workers, batch in ((0, 4), (2, 4), (0, 1)):  # batch 1: batches with no readable image at all
        res = evaluate(Ident(), EpochLoader(val, batch, workers, 0, train=False, collate_fn=collate_skipping)(), "cpu")
        assert res["count"] == len(files) - 2 and res["skipped"] == 2
        assert res["acc1"] == pytest.approx(100 * 1 / 7)  # class 0 = the first 3 files; one of them readable

    train = SafeImageFolder(data / "train", TrainTransform(16))
    bad = sorted((data / "train").rglob("*.JPEG"))[4:6]
    for f in bad:
        f.write_bytes(b"junk")
    batches = list(EpochLoader(train, 4, 0, 0, collate_fn=collate_skipping)(0))
    assert sorted(p for b in batches for p in b[2]) == sorted(map(str, bad))  # files, not skip events
    assert all(len(b[0]) == 4 and (b[1] != UNREADABLE).all() for b in batches)  # training keeps replacements


# ---- to the device ---------------------------------------------------------------------------

def test_unpack_normalizes_uint8_drops_unreadable_and_passes_floats_through():
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (3, 3, 4, 5), dtype=torch.uint8, generator=g)
    target = torch.tensor([0, UNREADABLE, 2])
    images, t, skipped = _unpack((u8, target, ["bad"]), torch.device("cpu"), channels_last=True)
    ref = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(u8[[0, 2]].float() / 255)
    assert torch.equal(images, ref) and images.is_contiguous(memory_format=torch.channels_last)
    assert t.tolist() == [0, 2] and skipped == ["bad"]
    half, _, _ = _unpack((u8, target), torch.device("cpu"), False, amp_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, ref.to(torch.bfloat16))
    x = torch.randn(2, 3, 4, 5)
    images, _, _ = _unpack((x, torch.tensor([1, 0])), torch.device("cpu"), channels_last=False)
    assert images is x


@pytest.mark.parametrize("version, forkserver", [((3, 11, 7), True), ((3, 10, 14), True), ((3, 9, 19), True),
                                                 ((3, 8, 19), True), ((3, 11, 9), True), ((3, 11, 0), True),
                                                 ((3, 11, 10), False), ((3, 10, 15), False), ((3, 9, 20), False),
                                                 ((3, 8, 20), False), ((3, 12, 0), False), ((3, 12, 4), False),
                                                 ((3, 13, 0), False), ((3, 14, 0), False)])
def test_workers_come_from_a_fork_server_where_a_fork_can_hang(tiny_data, monkeypatch, version, forkserver):
    """CPython gh-112275: before 3.11.10 / 3.10.15 / 3.9.20 / 3.8.20 a child forked while a native thread
    (gloo's, nccl's) was entering Python can wait for ever on a lock; a torchrun rank hung so in this
    suite. 3.12.0 on re-create that lock first in the child (never affected). There, under a process
    group, the workers are forked by a single-threaded fork server; in a single process (no such thread)
    and elsewhere the platform's default stays."""
    import sys

    from utils.lifecycle.processes import worker_start_method
    monkeypatch.setattr(sys, "version_info", (*version, "final", 0))
    context = worker_start_method(1, process_group=True)
    assert (context is not None and context.get_start_method() == "forkserver") == forkserver
    assert worker_start_method(1, process_group=False) is None and worker_start_method(0, process_group=True) is None
    monkeypatch.undo()
    ds = SafeImageFolder(tiny_data / "train", TrainTransform(16))
    loader = EpochLoader(ds, 5, 1, seed=7, collate_fn=collate_skipping)
    assert loader.loader.multiprocessing_context is worker_start_method(1)  # what this interpreter needs
    assert EpochLoader(ds, 5, 0, seed=7).loader.multiprocessing_context is None  # -j 0 starts no process


def test_the_fork_server_ignores_the_signals_the_workers_ignore(tiny_data, monkeypatch):
    """A terminal's Ctrl-C or scancel signals every process of the group, the workers' fork server too:
    it must live on (the main process alone decides, and may still need workers), as the workers do."""
    import re
    import signal
    import sys
    from multiprocessing import forkserver
    from pathlib import Path
    import torch.distributed as dist
    monkeypatch.setattr(sys, "version_info", (3, 11, 7, "final", 0))  # an interpreter that needs the server
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # in a DDP rank
    loader = EpochLoader(SafeImageFolder(tiny_data / "train", TrainTransform(16)), 5, 1, seed=7,
                         collate_fn=collate_skipping)
    monkeypatch.undo()
    assert loader.loader.multiprocessing_context.get_start_method() == "forkserver"
    images = next(iter(loader(0)))[0]
    assert torch.equal(images, next(iter(EpochLoader(loader.loader.dataset, 5, 0, seed=7, collate_fn=collate_skipping)(0)))[0])
    status = Path(f"/proc/{forkserver._forkserver._forkserver_pid}/status").read_text()
    ignored = int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    assert [s.name for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) if not ignored >> (s - 1) & 1] == []


def test_sample_index_lists_what_torchvisions_image_folder_lists(tmp_path):
    """SafeImageFolder's flat index (utils.inputs.data.SampleIndex) gives ImageFolder's samples and
    targets, item for item (subfolders, upper-case and non-ASCII names, non-images left out), slices
    included; and it pickles for a worker start as descriptors, not as the paths."""
    import pickle
    from multiprocessing import context, reduction

    from torchvision import datasets
    for i, rel in enumerate(["b/x.jpg", "b/sub/y.JPEG", "b/sub/deeper/z.png", "a/é-1.jpeg", "a/0.jpg",
                             "c/q.JPG", "c/notes.txt"]):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        photo_like(tmp_path / rel, 16, 16, seed=i, format="PNG")
    ours, ref = SafeImageFolder(tmp_path), datasets.ImageFolder(tmp_path)
    assert list(ours.samples) == ref.samples and len(ours.samples) == 6
    assert ours.targets.tolist() == ref.targets and ours.classes == ref.classes
    assert [ours.samples[i] for i in range(-6, 6)] == ref.samples * 2
    assert list(ours.samples[1:5:2]) == ref.samples[1:5:2] and list(ours.samples[::-1]) == ref.samples[::-1]
    assert torch.equal(ours[(3, 5)][0], SafeImageFolder(tmp_path)[(3, 5)][0])

    class Popen:  # a worker being started (multiprocessing's spawning popen): file descriptors travel apart
        fds = []

        def duplicate_for_child(self, fd):
            self.fds.append(fd)
            return fd

        def DupFd(self, fd):
            return fd

    small = pickle.dumps(ours)
    context.set_spawning_popen(Popen())
    try:
        for_worker = reduction.ForkingPickler.dumps(ours)
    finally:
        context.set_spawning_popen(None)
    assert len(Popen.fds) == 3 and len(for_worker) < len(small) - 6 * len("x.jpg")
    assert list(pickle.loads(small).samples) == ref.samples
